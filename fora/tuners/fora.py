"""FoRA (Fusion of low-Rank Adaptation, Li et al. 2025) as a PEFT LoRA variant.

FoRA replaces LoRA's two factors with five. For a frozen linear layer W0 (d_out x d_in), rank r,
scaling s = lora_alpha / r, mid width m = max(2, floor(mid_ratio * d_in)) and x' = dropout(x):

    h = W0 x + s * D (A x' + E A x' + C B A x')        i.e.  dW = s * D (I_r + E + C B) A

with A: r x d_in, B: m x r, C: r x m, E: r x r, D: d_out x r (nn.Linear layout, out x in).
A, C and E start Kaiming-uniform (a = sqrt(5), nn.Linear's default); B and D start at zero, so
dW = 0 at initialisation.

The adapter is built only through PEFT's public extension points: `ForaConfig` registers FoRA layer
classes for nn.Linear and bitsandbytes' Linear4bit / Linear8bitLt; those layers are PEFT's own LoRA
layers, which delegate forward, merge and unmerge to `ForaLinearVariant`. PEFT's `lora_A` holds A,
`lora_B` holds B (r -> m), and the layers add `lora_C`, `lora_D`, `lora_E`, so `save_pretrained`
writes all five matrices. Load with `load_fora_config` + `PeftModel.from_pretrained(..., config=cfg)`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch
from peft import LoraConfig
from peft.import_utils import is_bnb_4bit_available, is_bnb_available
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from torch import nn

from fora.tuners.lora_fast import NoInputCastUnderAutocast, add_scaled_product


class ForaLinearVariant(LoraVariant):
    """The FoRA math for one adapter of a LoRA linear layer (plain, 4-bit or 8-bit base)."""

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, config: ForaConfig, **kwargs) -> None:
        if not hasattr(module, "lora_C"):  # first FoRA adapter on this layer
            module.lora_C, module.lora_D, module.lora_E = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        r = module.r[adapter_name]
        m = max(2, math.floor(config.mid_ratio * module.in_features))
        # PEFT has already placed lora_A on the base layer's device and (float) dtype; follow it.
        like = module.lora_A[adapter_name].weight
        factory = {"device": like.device, "dtype": like.dtype}
        module.lora_B[adapter_name] = nn.Linear(r, m, bias=False, **factory)  # replaces PEFT's r -> d_out B
        module.lora_C[adapter_name] = nn.Linear(m, r, bias=False, **factory)
        module.lora_D[adapter_name] = nn.Linear(r, module.out_features, bias=False, **factory)
        module.lora_E[adapter_name] = nn.Linear(r, r, bias=False, **factory)
        if config.init_lora_weights:  # False keeps nn.Linear's random init everywhere, as in PEFT (for tests)
            nn.init.zeros_(module.lora_B[adapter_name].weight)
            nn.init.zeros_(module.lora_D[adapter_name].weight)
            nn.init.kaiming_uniform_(module.lora_C[adapter_name].weight, a=math.sqrt(5))
            nn.init.kaiming_uniform_(module.lora_E[adapter_name].weight, a=math.sqrt(5))

    @staticmethod
    def delta_weight(module: LoraLayer, adapter: str) -> torch.Tensor:
        """dW = s * D (I + E + C B) A in the adapter's dtype; computed in fp32, as half-precision matmuls
        are slow on CPU and would round the small products before they reach the base weight."""
        A, B, C, D, E = (getattr(module, f"lora_{name}")[adapter].weight.float() for name in "ABCDE")
        core = torch.eye(A.shape[0], device=A.device) + E + C @ B
        delta = module.scaling[adapter] * (D @ core @ A)
        return delta.to(module.lora_A[adapter].weight.dtype)

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        delta = ForaLinearVariant.delta_weight(module, active_adapter)
        return orig_weight + delta.to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += ForaLinearVariant.delta_weight(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        delta = ForaLinearVariant.delta_weight(module, active_adapter)
        return orig_weight.data - delta.to(orig_weight.dtype)

    @staticmethod
    def forward(
        module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs
    ) -> torch.Tensor:
        # Every PEFT layer calls this whenever the adapter is active and unmerged, autocast or not. The caller
        # has already cast x to lora_A's dtype (bnb layers skip that under CUDA autocast, which casts per matmul).
        A, B, C, D, E = (getattr(module, f"lora_{name}")[active_adapter] for name in "ABCDE")
        ax = A(module.lora_dropout[active_adapter](x))
        return add_scaled_product(result, ax + E(ax) + C(B(ax)), D.weight, module.scaling[active_adapter])


class _ForaLayer(NoInputCastUnderAutocast):
    """What a FoRA layer adds to its PEFT LoRA parent; forward, merge and unmerge are inherited unchanged."""

    # Registers C, D, E as adapter weights: trainable, moved with the adapter, saved and loaded.
    adapter_layer_names = LoraLayer.adapter_layer_names + ("lora_C", "lora_D", "lora_E")
    # PEFT's bnb layers hard-code their variant lookup (DoRA / aLoRA / Arrow only) instead of reading
    # `lora_variants`; use the generic lookup that does, so FoRA is also chosen on quantized bases.
    resolve_lora_variant = LoraLayer.resolve_lora_variant

    @property
    def lora_variants(self):
        # Only FoRA: a plain-LoRA adapter (or FoRA combined with DoRA etc.) on this layer is refused by PEFT.
        return {("use_fora",): ForaLinearVariant}

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        # For PEFT helpers that read a layer's dW directly (convert_to_lora, add_weighted_adapter's SVD mode).
        return ForaLinearVariant.delta_weight(self, adapter)


class ForaLinear(_ForaLayer, LoraLinear):
    pass


# bnb's quantized layers subclass nn.Linear and PEFT's custom dispatch takes the first isinstance match,
# so they must come before nn.Linear. bitsandbytes is optional: without it only nn.Linear is adapted.
_CUSTOM_MODULES: dict[type[nn.Module], type[nn.Module]] = {}
if is_bnb_available():
    import bitsandbytes as bnb
    from peft.tuners.lora import bnb as lora_bnb

    class ForaLinear8bitLt(_ForaLayer, lora_bnb.Linear8bitLt):
        pass

    _CUSTOM_MODULES[bnb.nn.Linear8bitLt] = ForaLinear8bitLt
    if is_bnb_4bit_available():

        class ForaLinear4bit(_ForaLayer, lora_bnb.Linear4bit):
            pass

        _CUSTOM_MODULES[bnb.nn.Linear4bit] = ForaLinear4bit
_CUSTOM_MODULES[nn.Linear] = ForaLinear


@dataclass
class ForaConfig(LoraConfig):
    """LoraConfig for FoRA adapters; saved as a LoRA adapter_config.json plus `use_fora` and `mid_ratio`.

    Plain PEFT (PeftModel.from_pretrained without `config=`) reads that file as a LoraConfig and then fails
    loudly on the shape of lora_B (m x r saved, d_out x r expected); use `load_fora_config` to load.
    Targets must be nn.Linear or bnb Linear4bit / Linear8bitLt; other layer types (Embedding, Conv1D, ...)
    raise "Invalid or unsupported variant combination" when PEFT builds the adapter.
    """

    mid_ratio: float = field(
        default=0.25,
        metadata={
            "help": "FoRA middle width as a fraction of the input size: m = max(2, floor(mid_ratio * d_in))."
        },
    )
    use_fora: bool = field(
        default=True,
        metadata={"help": "Marks the adapter as FoRA (five factors); always True.", "is_lora_variant": True},
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.use_fora:
            raise ValueError("ForaConfig(use_fora=False) is not FoRA; use peft.LoraConfig for plain LoRA.")
        if not self.mid_ratio > 0:
            raise ValueError(f"mid_ratio must be > 0, got {self.mid_ratio}.")
        # These options assume LoRA's two-factor layout (bias on B, transposed or data-driven B A init).
        if self.lora_bias or self.fan_in_fan_out or self.init_lora_weights not in (True, False):
            raise ValueError("FoRA does not support lora_bias, fan_in_fan_out or a custom init_lora_weights.")
        self._register_custom_module(_CUSTOM_MODULES)

    @classmethod
    def from_peft_type(cls, **kwargs) -> ForaConfig:
        # PeftConfig.from_pretrained picks the class from peft_type ("LORA") and would drop FoRA's fields.
        return cls(**kwargs)


def load_fora_config(adapter_dir: str | os.PathLike) -> ForaConfig | None:
    """The ForaConfig saved in adapter_dir, or None when its adapter_config.json is not a FoRA adapter.

    Pass it on: `PeftModel.from_pretrained(base, adapter_dir, config=cfg, is_trainable=...)`.
    """
    with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as f:
        if not json.load(f).get("use_fora"):
            return None
    return ForaConfig.from_pretrained(adapter_dir)
