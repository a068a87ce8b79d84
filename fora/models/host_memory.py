"""Host memory under a quantized base on the CPU: glibc's malloc keeps freed blocks mapped, so the peak of a
4/8-bit run grows with the temporaries of quantizing, dequantizing and backward. These two functions hand
such memory back to the system (through ctypes: glibc has no Python interface; no-ops elsewhere).
docs/benchmarks.md measures what each costs and saves; `--unmap_freed_memory` chooses.
"""


def return_large_frees_to_system(threshold: int = 1 << 20) -> None:
    """Have glibc's malloc serve blocks of `threshold` bytes or more with mmap, so freeing one unmaps it.

    By default glibc raises its mmap threshold to the size of each large block freed (up to 32 MB),
    so after loading, the per-layer temporaries of quantizing, dequantizing and backward come from
    malloc's heaps, and freed ones stay resident: the 4-bit run's resident memory grows step after step
    without holding any more live tensors. Setting the threshold (M_MMAP_THRESHOLD) fixes it and turns
    that adjustment off. The price is a page fault per 4 KB of every new large block, which slows steps
    (docs/benchmarks.md measures both sides), hence the `--unmap_freed_memory` flag. Process-wide and for
    the rest of the process; no-op outside glibc. Used where the model lives in host memory (quantized on CPU).
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def release_freed_memory() -> None:
    """Give memory that Python and glibc's malloc hold but no longer use back to the system.

    Loading, quantizing and preparing a model free many mid-sized buffers (from several threads,
    so several malloc arenas); glibc keeps them mapped until malloc_trim.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
