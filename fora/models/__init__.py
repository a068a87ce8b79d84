"""Models: find and load the base (dtype, 4/8-bit, device), its tokenizer, remote-code compatibility, and what
prediction and chat load from an adapter or model folder."""
