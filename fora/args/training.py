"""HF `TrainingArguments` plus the seeds' flags that transformers 5 removed.

The seeds' command lines predate transformers 5, which dropped `warmup_ratio`, `overwrite_output_dir`,
`group_by_length` and `logging_dir` from `TrainingArguments`; they are kept here with their old meaning
and mapped onto what transformers 5 offers. bf16/fp16 arrive already decided (fora.precision).
"""

import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from fora.errors import UserError
from fora.io import read_json
from fora.memory.device import AVAILABLE_MEMORY_VARIABLE
from fora.precision import Precision


@dataclass
class TrainArguments(TrainingArguments):
    """HF `TrainingArguments` plus the seeds' flags that transformers 5 removed."""

    warmup_ratio: float | None = field(
        default=None, metadata={"help": "Fraction of the total steps spent warming up the learning rate."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow --output_dir to hold a previous run; without it such a run is kept."}
    )
    group_by_length: bool = field(
        default=True,
        metadata={"help": "Batch records of similar length together (shuffled groups) so little is padding."},
    )
    logging_dir: str | None = field(
        default=None, metadata={"help": "TensorBoard log folder (default OUTPUT_DIR/runs)."}
    )
    supervised_logits: bool = field(
        default=True,
        metadata={
            "help": "Apply the output layer and loss only at positions whose label is trained (same loss, "
            "less work), on the architectures where a test proves it equal to the model's own loss; others get "
            "full logits and the log says so. False: logits over the whole vocabulary at every position, as plain "
            "transformers does."
        },
    )
    trust_checkpoint: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint even if its pickled files (optimizer, DeepSpeed states) hold objects "
            "beyond tensors, plain data and the few classes honest checkpoints need. Unpickling such a file can run "
            "code: pass it only for a checkpoint you wrote yourself."
        },
    )
    gradient_checkpointing: str = field(
        default="auto",
        metadata={
            "help": "Recompute each layer's activations in backward instead of keeping them: far less memory, one more "
            "forward pass per step. auto (default): on when the run's memory estimate (estimate_memory.py, the same flags) "
            "exceeds the memory free on its device (CUDA: free GPU memory; CPU: available RAM within the cgroup's limit; "
            f"the environment variable {AVAILABLE_MEMORY_VARIABLE} sets it, e.g. 24GB), off otherwise; the log says which "
            "and why. true / false force it.",
            "nargs": "?",
            "const": "true",
        },
    )
    report_to: None | str | list[str] = field(
        default="tensorboard", metadata={"help": "Where metrics go: tensorboard (default), none, or other HF integrations."}
    )
    # Not a flag: what fora.precision decided from --torch_dtype, --bf16 and --fp16 (set by fora.args.parse_args).
    precision: Precision | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        checkpointing = gradient_checkpointing_choice(self.gradient_checkpointing)
        # Decided here when forced; "auto" stays until fora.memory.decide resolves it, before the model is built.
        # transformers 5 reads `activation_checkpointing` (gradient_checkpointing is its deprecated alias).
        self.gradient_checkpointing, self.activation_checkpointing = None, checkpointing is True
        if self.learning_rate < 0:
            raise UserError(f"--learning_rate must not be negative, got {self.learning_rate}")
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise UserError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = self.warmup_ratio  # transformers 5 reads a float < 1 as a ratio
        if self.group_by_length:
            self.train_sampling_strategy = "group_by_length"
        self.logging_dir = self.logging_dir or os.path.join(self.output_dir or "trainer_output", "runs")
        os.environ["TENSORBOARD_LOGGING_DIR"] = self.logging_dir
        if isinstance(self.deepspeed, str) and not self.deepspeed.startswith("{"):
            read_json(self.deepspeed, "--deepspeed")
        if not torch.cuda.is_available():
            # accelerate forms a multi-process group (gloo) on CPU only when told it runs on CPU.
            self.use_cpu = True
        super().__post_init__()
        self.gradient_checkpointing = checkpointing

    def use_gradient_checkpointing(self, on: bool) -> None:
        """Resolve --gradient_checkpointing (auto, or forced) to `on`, under both of transformers' names for it."""
        self.gradient_checkpointing = self.activation_checkpointing = on


def gradient_checkpointing_choice(value) -> bool | str:
    """--gradient_checkpointing as given: True, False, or "auto"."""
    choice = str(value).strip().lower()
    if choice in ("auto", "true", "false", "yes", "no", "1", "0"):
        return {"auto": "auto", "true": True, "yes": True, "1": True}.get(choice, False)
    raise UserError(f"--gradient_checkpointing must be auto, true or false, got {value!r}")

