"""fora/models/host_memory.py: --unmap_freed_memory sets glibc's mmap threshold (a fresh process each)."""

import sys

import pytest

from support import run_script

# Loads the tiny model in 4-bit with the --unmap_freed_memory given, then allocates a 3 MB block and
# prints whether glibc served it with mmap (mallinfo2's count of mmapped blocks went up).
MMAP_PROBE = """
import ctypes, sys, torch
from fora.args import ModelArguments, parse_args
from fora.models.load import load_model
(args,) = parse_args((ModelArguments,), sys.argv[2:])
load_model(sys.argv[1], torch.float32, quantization_bit=4, unmap_freed_memory=args.unmap_freed_memory)
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
torch.empty(8 << 20, dtype=torch.uint8)  # freed at once: glibc's default then keeps blocks up to 8 MB in its heap
before = libc.mallinfo2().hblks
block = torch.empty(3 << 20, dtype=torch.uint8)
print(libc.mallinfo2().hblks - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("flag, mmapped", [([], "1"), (["--unmap_freed_memory", "False"], "0")])
def test_unmap_freed_memory_flag_sets_the_mmap_threshold(tiny_model, flag, mmapped):
    """A fresh process each: the threshold is process-wide and cannot be unset."""
    result = run_script(sys.executable, "-c", MMAP_PROBE, str(tiny_model), *flag)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == mmapped



# A fresh interpreter without torch (the threshold is process-wide), told by its argument whether to ask first:
# a freed 8 MB block raises glibc's own threshold to 8 MB, so a 3 MB block then comes from its heap, unless asked.
THRESHOLD_PROBE = """
import ctypes, sys
from fora.models.host_memory import release_freed_memory, return_large_frees_to_system
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "ask":
    return_large_frees_to_system()
del bytearray(8 << 20)[:]
before = libc.mallinfo2().hblks
block = bytearray(3 << 20)
print(libc.mallinfo2().hblks - before)
del block
release_freed_memory()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_large_blocks_come_from_mmap_once_asked():
    for ask, mmapped in (("ask", "1"), ("leave", "0")):
        result = run_script(sys.executable, "-c", THRESHOLD_PROBE, ask)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.split() == [mmapped], ask
