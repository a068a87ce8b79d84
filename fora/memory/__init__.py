"""The memory a training run needs, estimated before it runs (estimate_memory.py, and --gradient_checkpointing auto).

    architectures  a model's shape from its config; the built-in table of the model scripts' architectures
    census         what the run trains, counted on the model built on the meta device with the method attached
    estimate       bytes per line (weights, adapter, gradients, optimizer states, activations, loss, overhead)
    plan           from the run's flags and data to what the estimate reads
    decide         what the estimate decides: gradient checkpointing on or off, the largest batch, the cheapest change
                   that fits, the one-line out-of-memory error
    report         estimate_memory.py: the table or JSON
    device         memory sizes, and the memory free on this machine's device
How it is measured against real runs: docs/memory.md.
"""
