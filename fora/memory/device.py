"""Memory sizes, and how much memory the run's device has free: CUDA's free memory, or on a CPU the available RAM
within the process's cgroup limit; the environment variable FORA_AVAILABLE_MEMORY sets it instead (e.g. 24GB)."""

import os
import re
from pathlib import Path

from fora.errors import UserError

AVAILABLE_MEMORY_VARIABLE = "FORA_AVAILABLE_MEMORY"
GiB = 2**30
UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
         "g": GiB, "gb": GiB, "gib": GiB, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_size(text: str, flag: str) -> int:
    """Bytes of a size such as 24GB, 16GiB, 1500MB or 8e9. GB and MB count in powers of 1024, as GPU and RAM
    sizes are quoted (a "24 GB" card holds 24 GiB)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not match or match.group(2) not in UNITS:
        raise UserError(f"{flag} {text}: not a memory size (e.g. 24GB, 16GiB, 1500MB)")
    return int(float(match.group(1)) * UNITS[match.group(2)])


def gib(size: int) -> str:
    return f"{size / GiB:.2f}"


def available_memory(cuda: bool) -> tuple[int, str]:
    """Bytes free for a run on this machine's device, and where the figure comes from."""
    given = os.environ.get(AVAILABLE_MEMORY_VARIABLE)
    if given:
        return parse_size(given, AVAILABLE_MEMORY_VARIABLE), f"{AVAILABLE_MEMORY_VARIABLE}={given}"
    if cuda:
        import torch

        free, _ = torch.cuda.mem_get_info()
        return free, f"free memory of {torch.cuda.get_device_name()}"
    available = meminfo("MemAvailable")
    limit = cgroup_room()
    if limit is not None and limit < available:
        return limit, "RAM left under this process's cgroup limit"
    return available, "available RAM"


def meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0]) * 1024
    raise RuntimeError(f"/proc/meminfo has no {field}")


def cgroup_room() -> int | None:
    """What the process's memory cgroup still allows (its limit less what it uses, reclaimable page cache not
    counted as used), or None without a limit. cgroup v2 and v1."""
    for limit_file, usage_file, stat_file, inactive in (
        ("memory.max", "memory.current", "memory.stat", "inactive_file"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat", "total_inactive_file"),
    ):
        root = Path("/sys/fs/cgroup")
        limit_path, usage_path = root / limit_file, root / usage_file
        if not limit_path.is_file() or not usage_path.is_file():
            continue
        limit = limit_path.read_text().strip()
        if limit == "max" or int(limit) >= 2**60:  # no limit ("max", or v1's page-rounded maximum)
            return None
        stat = dict(line.split() for line in (root / stat_file).read_text().splitlines() if line.count(" ") == 1)
        used = int(usage_path.read_text()) - int(stat.get(inactive, 0))
        return max(0, int(limit) - used)
    return None


def resident_memory() -> int:
    """This process's resident memory now (VmRSS), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmRSS")
