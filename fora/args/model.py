"""Flags that choose and load the base model."""

from dataclasses import dataclass, field
from typing import Literal

from fora.memory.architectures import BUILT_IN
from fora.precision import DtypeChoice


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Base model: a local folder with config.json and weights (any AutoModelForCausalLM). "
            "Default: the embedded SmolLM2-135M-Instruct, converted once to models/SmolLM2-135M-Instruct. "
            f"estimate_memory.py also takes a built-in architecture's name, offline: {', '.join(BUILT_IN)}."
        },
    )
    torch_dtype: DtypeChoice = field(
        default="auto",
        metadata={
            "help": "dtype the base weights are loaded in. 'auto' = the dtype --bf16/--fp16 train in; with neither "
            "flag, the machine's native half precision (--bf16 on CUDA with bf16 and on CPUs with native bf16, --fp16 "
            "on older GPUs), else float32. --torch_dtype float32 trains in full precision. Without CUDA, float16 "
            "becomes bfloat16 (float32 on CPUs without native bf16), with one warning."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run the model's own Python code from its folder (Baichuan, ChatGLM need it). Off by default."},
    )
    quantization_bit: Literal[4, 8] | None = field(
        default=None,
        metadata={
            "help": "Load the base in 4-bit NF4 (4) or 8-bit (8) with bitsandbytes, for QLoRA. "
            "train_qlora.py defaults to 4."
        },
    )
    unmap_freed_memory: bool = field(
        default=True,
        metadata={
            "help": "With a 4/8-bit base on CPU: have glibc unmap every freed block of 1 MB or more instead of "
            "keeping it in its heap. Peak memory stays lower, but every new activation is page-faulted in again, "
            "which makes steps slower (measured in docs/benchmarks.md); --unmap_freed_memory False trades the "
            "memory for the speed. No effect on GPU or with an unquantized base."
        },
    )
