"""Precision, decided here and nowhere else: the dtype a model computes in, for every path.

- training: `training_precision(--torch_dtype, --bf16, --fp16)`, called once by the argument parser
  before `TrainingArguments` exists (its DeepSpeed "auto" values and accelerate's mixed precision read
  bf16/fp16), gives a `Precision`: the dtype the base loads in and the Trainer's mixed precision;
- prediction and chat: `inference_dtype(--torch_dtype, run record, checkpoint)`;
- merging: `merged_dtype(--dtype, base folder)`, the dtype the merged weights are saved in;
- which parameters train in float32: `keep_trainable_in_float32`.
Without CUDA, half precision becomes bf16 on CPUs that multiply it natively, else float32
(`runnable_dtype`, the one place that knows it); fp16 never runs on a CPU.
"""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

DtypeName = Literal["float32", "bfloat16", "float16"]
DtypeChoice = Literal["auto", "float32", "bfloat16", "float16"]  # a flag's choices: "auto" decides by the rules above
DTYPE_NAMES: tuple[str, ...] = DtypeName.__args__
MixedPrecision = Literal["bf16", "fp16"]


@dataclass(frozen=True)
class Precision:
    """What a training run computes in."""

    dtype: DtypeName  # the base's weights (the compute dtype under a 4/8-bit base)
    mixed: MixedPrecision | None  # the Trainer's autocast (--bf16 / --fp16), None = none
    chosen: str | None = None  # why, when no flag asked for it
    replaced: str | None = None  # which flags this machine cannot run, and what runs instead

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def report(self) -> None:
        """Say once, in the run's log, what was replaced (a warning) and what was chosen."""
        if self.replaced:
            print(f"warning: {self.replaced}", file=sys.stderr)
        if self.chosen:
            print(f"Precision: {self.chosen}")


def cpu_has_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AVX512-BF16/AMX); emulated bf16 is far slower than fp32."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def native_half(cuda: bool | None = None) -> DtypeName | None:
    """The half precision this machine computes in natively: bf16 (CUDA with bf16, or such a CPU), fp16 on
    older GPUs, none on CPUs without bf16. `cuda`: the run's device has CUDA (default: this machine's answer;
    True here without one, for an estimate of a GPU run: a GPU this machine cannot see is taken to have bf16)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda and torch.cuda.is_available():
        # The hardware's answer: V100 and T4 emulate bf16 (slowly) and compute fp16 natively.
        return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
    if cuda:
        return "bfloat16"
    return "bfloat16" if cpu_has_bf16() else None


def runnable_dtype(name: DtypeName, cuda: bool | None = None) -> DtypeName:
    """`name`, except half precision without CUDA: bf16 where the CPU has it natively, else float32.
    `cuda`: the run's device has CUDA (default: this machine's answer)."""
    if (torch.cuda.is_available() if cuda is None else cuda) or name == "float32":
        return name
    return "bfloat16" if cpu_has_bf16() else "float32"


def training_precision(torch_dtype: DtypeChoice, bf16: bool, fp16: bool, cuda: bool | None = None) -> Precision:
    """The precision of a training run from its flags.

    No flag at all (--torch_dtype auto, neither --bf16 nor --fp16): the machine's native half precision.
    Without CUDA, --fp16 (and --bf16 on a CPU without it) and a half --torch_dtype become what the CPU runs.
    --torch_dtype auto loads the base in the dtype the Trainer computes in. `cuda`: the run's device has CUDA
    (default: this machine's answer; the memory estimate of a GPU run made elsewhere passes True).
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    chosen, replaced = None, []
    if torch_dtype == "auto" and not (bf16 or fp16):
        half = native_half(cuda)
        if half:
            bf16, fp16 = half == "bfloat16", half == "float16"
            chosen = (f"--{'bf16' if bf16 else 'fp16'}, this machine's native half precision (no precision flag given; "
                      "--torch_dtype float32 trains in full precision)")
    if not cuda and (fp16 or (bf16 and not cpu_has_bf16())):
        replaced.append("--fp16" if fp16 else "--bf16")
        fp16, bf16 = False, cpu_has_bf16()
    if torch_dtype != "auto" and runnable_dtype(torch_dtype, cuda) != torch_dtype:
        replaced.append(f"--torch_dtype {torch_dtype}")
        torch_dtype = runnable_dtype(torch_dtype, cuda)
    if torch_dtype == "auto":
        torch_dtype = "bfloat16" if bf16 else "float16" if fp16 else "float32"
    return Precision(
        torch_dtype, "bf16" if bf16 else "fp16" if fp16 else None, chosen,
        f"no CUDA here; {' and '.join(replaced)} -> {runnable_dtype('bfloat16')} on this CPU" if replaced else None,
    )


def inference_dtype(requested: DtypeChoice, recorded: DtypeName | None, checkpoint: str | None = None) -> DtypeName:
    """Prediction's and chat's dtype: --torch_dtype; 'auto' = the one recorded at training; without a record
    (a merged or base model), on CUDA the dtype `checkpoint` is stored in, else float32 (exact, and on a CPU
    without native bf16 the fast one)."""
    if requested == "auto":
        requested = recorded or (stored_dtype(checkpoint) if torch.cuda.is_available() and checkpoint else None) or "float32"
    return runnable_dtype(requested)


def merged_dtype(requested: DtypeChoice, base: str) -> torch.dtype:
    """merge_lora.py --dtype; 'auto' = the dtype the base checkpoint is stored in (float32 when it does not say)."""
    return getattr(torch, requested if requested != "auto" else stored_dtype(base) or "float32")


def stored_dtype(folder: str) -> DtypeName | None:
    """The dtype a local checkpoint's config.json says its weights are stored in, if it says."""
    from fora.io import read_json

    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        return None
    config = read_json(config_file)
    stored = config.get("dtype") or config.get("torch_dtype")
    return stored if stored in DTYPE_NAMES else None


def keep_trainable_in_float32(model, precision: Precision, deepspeed: bool) -> int:
    """Under --fp16 without DeepSpeed, every trainable parameter in float32: the Trainer's GradScaler refuses to
    unscale fp16 gradients, so fp16 weights that train (full fine-tuning, PEFT's modules_to_save copies) stop
    it at the first step. The frozen base stays in fp16 and autocast computes in fp16; DeepSpeed keeps its own
    float32 master weights. Returns how many parameters were converted."""
    if precision.mixed != "fp16" or deepspeed:
        return 0
    converted = [param for param in model.parameters() if param.requires_grad and param.dtype != torch.float32]
    for param in converted:
        param.data = param.data.float()
    return len(converted)
