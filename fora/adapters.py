"""PEFT LoRA layers that add the adapter's output to the base output inside one matrix multiply.

PEFT's LoRA layer computes `result + lora_B(lora_A(x)) * scaling`: three passes over an output-sized
tensor (the product, the scaling, the sum) and one more in backward (scaling the gradient). On a
CPU those passes over a batch x length x 1536 activation cost as much as the rank-8 products. Here
the scaling goes into the small (out x r) factor and the sum into `addmm`: one pass. The adapter,
its weights and its saved files are PEFT's own; only the forward differs, so a saved adapter loads
in plain PEFT unchanged. Registered for unquantized nn.Linear targets (`use_addmm_layers`).
"""

import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from torch import nn


def add_scaled_product(result: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """result + scaling * F.linear(hidden, weight), as one addmm over the flattened rows.

    `result` is promoted to hidden's dtype first, as `result + product` would promote it.
    """
    product_weight = (weight * scaling).t()  # (r x out): scaling the factor, not the output
    rows = torch.addmm(result.to(hidden.dtype).reshape(-1, result.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), product_weight)
    return rows.view(*result.shape[:-1], rows.shape[-1])


class AddmmLoraVariant(LoraVariant):
    """Plain LoRA whose forward is one addmm; merging is PEFT's own delta weight."""

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, **kwargs) -> None:
        pass  # PEFT has created lora_A and lora_B already

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight.data - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        hidden = lora_A(module.lora_dropout[active_adapter](x))
        if lora_B.bias is not None:  # lora_bias: addmm has room for one addend only
            return result + lora_B(hidden) * module.scaling[active_adapter]
        return add_scaled_product(result, hidden, lora_B.weight, module.scaling[active_adapter])


class AddmmLoraLinear(LoraLinear):
    @property
    def lora_variants(self):
        # Plain LoRA gets the addmm forward; DoRA and the other variants keep PEFT's.
        return {**super().lora_variants, (): AddmmLoraVariant}


def use_addmm_layers(config: LoraConfig) -> LoraConfig:
    """Have `get_peft_model(model, config)` build AddmmLoraLinear for nn.Linear targets.

    Only for unquantized models: PEFT's custom dispatch matches by isinstance, and bitsandbytes'
    quantized layers subclass nn.Linear.
    """
    config._register_custom_module({nn.Linear: AddmmLoraLinear})
    return config
