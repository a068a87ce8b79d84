"""Data: read a file → normalise its format to conversations → render with a template → encode and mask →
the tokenized dataset (cached) → padded batches."""
