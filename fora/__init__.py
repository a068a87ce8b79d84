"""Shared internals of the FoRA toolkit: data, templates, model loading, training glue, generation, metrics."""

import logging

# On CPUs with AVX512-BF16, bitsandbytes warns when imported that it cannot fetch an optional kernel from the
# Hugging Face Hub, then uses its built-in one; the stray line would precede every one-line error.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
