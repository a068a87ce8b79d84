"""Flags that choose the fine-tuning method and its adapter: every method through PEFT's own config (LoRA and its
variants, FoRA, LoHa, LoKr, IA3, AdaLoRA, OFT, prefix and prompt tuning), or freezing all but some layers, or
training everything. What each method allows (a 4-bit base, merging, federated averaging) is in
fora/tuners/methods.py, which refuses a combination it does not allow before anything loads."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fora.errors import UserError
from fora.io import read_json

FinetuningType = Literal["lora", "fora", "loha", "lokr", "ia3", "adalora", "oft", "prefix", "prompt", "freeze", "full"]
LoraInit = Literal["default", "gaussian", "pissa", "olora"]


def as_csv(value) -> str | None:
    """A list from a JSON/YAML file as the comma-separated string the flag takes."""
    return ",".join(value) if isinstance(value, list) else value


@dataclass
class FinetuningArguments:
    finetuning_type: FinetuningType = field(
        default="lora",
        metadata={
            "help": "The method. lora: two low-rank factors per linear layer (PEFT). fora: Fusion of low-Rank Adaptation, "
            "five factors (fora/tuners/fora.py). loha / lokr: the update as a Hadamard / Kronecker product of low-rank "
            "factors (LyCORIS). ia3: learned scaling vectors on keys, values and the feed-forward input, the fewest "
            "parameters. adalora: LoRA whose rank per layer is pruned during training to a budget (--adalora_target_rank). "
            "oft: an orthogonal rotation of each weight (--oft_block_size). prefix: P-tuning v2, trained key/value "
            "prefixes in every layer (--num_virtual_tokens, --prefix_projection; on ChatGLM2/3 the model's own). "
            "prompt: trained virtual tokens before the input. freeze: the base's last --freeze_trainable_layers layers "
            "train, the rest stays frozen. full: every weight trains."
        },
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
    use_dora: bool = field(
        default=False,
        metadata={
            "help": "LoRA: DoRA (weight-decomposed LoRA): the weight's magnitude and direction train apart, the "
            "direction through LoRA. Closer to full fine-tuning at low rank; slower steps. Merges like LoRA."
        },
    )
    use_rslora: bool = field(
        default=False,
        metadata={
            "help": "LoRA: rank-stabilized scaling s = lora_alpha / sqrt(r) instead of lora_alpha / r, so the update "
            "keeps its size as the rank grows (useful at ranks of 64 and more)."
        },
    )
    init_lora_weights: LoraInit = field(
        default="default",
        metadata={
            "help": "LoRA: how the factors start. default: A Kaiming-uniform, B zero, so training starts from the base. "
            "gaussian: A normal. pissa: A and B from the weight's principal singular vectors and the base keeps the "
            "residual, training the weight's main directions first. olora: from the weight's QR decomposition. With "
            "pissa and olora the saved adapter is converted to a plain LoRA of the original base (twice the rank), "
            "so prediction and merging load it on the base as it is; not on a 4/8-bit base."
        },
    )
    loraplus_lr_ratio: float | None = field(
        default=None,
        metadata={
            "help": "LoRA+: factor B learns this many times faster than A (16 in the paper), which speeds up "
            "convergence at the same --learning_rate. Unset: one rate for both."
        },
    )
    adalora_target_rank: int | None = field(
        default=None,
        metadata={
            "help": "AdaLoRA: the average rank the layers are pruned to by the end of training, starting from "
            "--lora_rank (default: half of it)."
        },
    )
    oft_block_size: int = field(
        default=32,
        metadata={"help": "OFT: the size of the orthogonal blocks each weight is rotated by; it must divide the layers' input size."},
    )
    num_virtual_tokens: int = field(
        default=16,
        metadata={"help": "prefix / prompt: trained virtual tokens (prefix: per layer, as keys and values)."},
    )
    prefix_projection: bool = field(
        default=False,
        metadata={
            "help": "prefix: train the prefixes through a two-layer MLP (P-tuning v2's reparameterisation: more "
            "parameters while training, steadier on small data)."
        },
    )
    freeze_trainable_layers: int = field(
        default=2,
        metadata={"help": "freeze: the number of layers that train, the last ones (negative: the first ones)."},
    )
    freeze_trainable_modules: str = field(
        default="all",
        metadata={
            "help": "freeze: within those layers, the modules that train: all, or comma-separated names of a layer's "
            "children (e.g. mlp,self_attn)."
        },
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
        lora_only = {"use_dora": self.use_dora, "use_rslora": self.use_rslora, "init_lora_weights": self.init_lora_weights != "default",
                     "loraplus_lr_ratio": self.loraplus_lr_ratio is not None}
        for flag in [name for name, given in lora_only.items() if given]:
            if self.finetuning_type != "lora":
                raise UserError(f"--{flag} is a LoRA variant; it goes with --finetuning_type lora, not {self.finetuning_type}")
        if self.loraplus_lr_ratio is not None and self.loraplus_lr_ratio <= 0:
            raise UserError(f"--loraplus_lr_ratio must be positive, got {self.loraplus_lr_ratio}")
        if self.use_dora and self.init_lora_weights in ("pissa", "olora"):
            raise UserError(f"--use_dora with --init_lora_weights {self.init_lora_weights}: choose one")
        for name in ("num_virtual_tokens", "oft_block_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.freeze_trainable_layers == 0:
            raise UserError("--freeze_trainable_layers 0 trains nothing; give the number of layers that train")
        if self.adalora_target_rank is None:
            self.adalora_target_rank = max(1, self.lora_rank // 2)
        if not 1 <= self.adalora_target_rank <= self.lora_rank:
            raise UserError(f"--adalora_target_rank must be between 1 and --lora_rank {self.lora_rank}, got {self.adalora_target_rank}")

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

