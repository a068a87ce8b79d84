"""Flags that choose the fine-tuning method and its adapter."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fora.errors import UserError
from fora.io import read_json

FinetuningType = Literal["lora", "fora", "full"]


def as_csv(value) -> str | None:
    """A list from a JSON/YAML file as the comma-separated string the flag takes."""
    return ",".join(value) if isinstance(value, list) else value


@dataclass
class FinetuningArguments:
    finetuning_type: FinetuningType = field(
        default="lora", metadata={"help": "lora, fora (Fusion of low-Rank Adaptation, fora/tuners/fora.py) or full."}
    )
    use_lora: bool = field(
        default=True, metadata={"help": "False = full fine-tuning of every weight (same as --finetuning_type full)."}
    )
    lora_config: str | None = field(
        default=None,
        metadata={
            "help": "JSON file with {lora_r, lora_alpha, lora_dropout, lora_target_modules, modules_to_save}; "
            "flags given on the command line win over it. See configs/."
        },
    )
    lora_rank: int | None = field(default=None, metadata={"help": "Adapter rank r (default 8)."})
    lora_alpha: float | None = field(default=None, metadata={"help": "Scaling numerator: s = alpha / r (default 2 r)."})
    lora_dropout: float | None = field(
        default=None,
        metadata={
            "help": "Dropout on the adapter input (default 0, as in PEFT and LLaMA-Factory: on a CPU drawing its "
            "random masks costs a noticeable share of a step)."
        },
    )
    lora_target: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated names of the linear layers to adapt (e.g. q_proj,v_proj). Default: every "
            "linear layer inside the Transformer blocks, found by walking the model (not the output head)."
        },
    )
    modules_to_save: str | None = field(
        default=None, metadata={"help": "Comma-separated modules trained in full and saved with the adapter."}
    )
    fora_mid_ratio: float = field(
        default=0.25, metadata={"help": "FoRA mid width m = max(2, floor(mid_ratio * d_in))."}
    )

    def __post_init__(self):
        if not self.use_lora:
            self.finetuning_type = "full"
        file_values = self._read_lora_config() if self.lora_config else {}
        defaults = {
            "lora_rank": file_values.get("lora_r", 8),
            "lora_dropout": file_values.get("lora_dropout", 0.0),
            "lora_target": as_csv(file_values.get("lora_target_modules")),
            "modules_to_save": as_csv(file_values.get("modules_to_save")),
        }
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.lora_alpha is None:
            self.lora_alpha = file_values.get("lora_alpha", 2 * self.lora_rank)
        if self.lora_rank < 1:
            raise UserError(f"--lora_rank must be at least 1, got {self.lora_rank}")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 < self.fora_mid_ratio <= 1:
            raise UserError(f"--fora_mid_ratio must be in (0, 1], got {self.fora_mid_ratio}")

    def _read_lora_config(self) -> dict:
        path = Path(self.lora_config)
        values = read_json(path, "--lora_config")
        if not isinstance(values, dict):
            raise UserError(f"--lora_config {path}: expected a JSON object of lora_r, lora_alpha, ...")
        known = {"lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "modules_to_save"}
        unknown = set(values) - known
        if unknown:
            raise UserError(f"--lora_config {path}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        return values

