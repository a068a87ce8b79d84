"""fora/memory/device.py: memory sizes, and the memory free on this machine (the environment variable first)."""

import pytest

from fora.errors import UserError
from fora.memory.device import AVAILABLE_MEMORY_VARIABLE, GiB, available_memory, cgroup_room, gib, parse_size, resident_memory


@pytest.mark.parametrize("text, size", [("24GB", 24 * GiB), ("16 GiB", 16 * GiB), ("1500MB", 1500 * 2**20), ("8e9", 8 * 10**9),
                                        ("0.5g", GiB // 2), ("2TB", 2 * 2**40)])
def test_sizes(text, size):
    assert parse_size(text, "--device_memory") == size


def test_a_bad_size_names_the_flag():
    with pytest.raises(UserError, match=r"--device_memory 24 bananas: not a memory size"):
        parse_size("24 bananas", "--device_memory")


def test_the_environment_variable_sets_the_available_memory(monkeypatch):
    monkeypatch.setenv(AVAILABLE_MEMORY_VARIABLE, "3GB")
    assert available_memory(cuda=False) == (3 * GiB, f"{AVAILABLE_MEMORY_VARIABLE}=3GB")


def test_this_machines_memory(monkeypatch):
    monkeypatch.delenv(AVAILABLE_MEMORY_VARIABLE, raising=False)
    free, source = available_memory(cuda=False)
    assert 0 < free and source in ("available RAM", "RAM left under this process's cgroup limit")
    room = cgroup_room()
    assert room is None or room >= 0
    assert 10 * 2**20 < resident_memory() < free + resident_memory()
    assert gib(3 * GiB // 2) == "1.50"
