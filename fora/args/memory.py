"""Flags of estimate_memory.py beyond training's own: it parses train_lora.py's flags (or the same argument file), so
the estimate is that run's, and these say where the run goes and how to answer."""

from dataclasses import dataclass, field
from typing import Literal

from fora.errors import UserError
from fora.memory.device import AVAILABLE_MEMORY_VARIABLE


@dataclass
class MemoryArguments:
    device: Literal["auto", "cuda", "cpu"] = field(
        default="auto",
        metadata={
            "help": "The device the run will train on: cuda (a GPU, also from a machine without one: what precision "
            "the flags give there, the CUDA context instead of this process's memory), cpu, or auto: this machine's."
        },
    )
    device_memory: str | None = field(
        default=None,
        metadata={
            "help": "Memory of one device to fit the run in, e.g. 24GB, 80GiB, 1500MB (GB = GiB, as cards and RAM are "
            f"quoted). Default: what this machine's device has free (CUDA's free memory; on a CPU the available RAM within "
            f"the cgroup's limit), or ${AVAILABLE_MEMORY_VARIABLE}."
        },
    )
    num_devices: int | None = field(
        default=None,
        metadata={
            "help": "Processes (GPUs) the run is launched on: with --deepspeed, ZeRO partitions optimizer states "
            "(stage 1), gradients (2) and weights (3) across them. Default: $WORLD_SIZE, else 1."
        },
    )
    qlora: bool = field(
        default=False,
        metadata={
            "help": "The run is train_qlora.py's: --quantization_bit 4 unless given and, on CUDA without --optim or "
            "--deepspeed, its paged 8-bit AdamW."
        },
    )
    json: bool = field(
        default=False,
        metadata={"help": "Print the estimate as one JSON object (total_bytes is the total), for scripts."},
    )

    def __post_init__(self):
        if self.num_devices is not None and self.num_devices < 1:
            raise UserError(f"--num_devices must be at least 1, got {self.num_devices}")
