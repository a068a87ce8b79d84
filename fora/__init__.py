"""Shared internals of the FoRA toolkit: data, templates, model loading, training glue, generation, metrics."""
