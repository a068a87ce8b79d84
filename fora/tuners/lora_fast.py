"""PEFT LoRA layers that add the adapter's output to the base output inside one matrix multiply.

PEFT's LoRA layer computes `result + lora_B(lora_A(x)) * scaling`: three passes over an output-sized
tensor (the product, the scaling, the sum) and one more in backward (scaling the gradient). On a
CPU those passes over a batch x length x 1536 activation cost as much as the rank-8 products. Here
the scaling goes into the small (out x r) factor and the sum into `addmm`: one pass. The adapter,
its weights and its saved files are PEFT's own; only the forward differs, so a saved adapter loads
in plain PEFT unchanged. Registered for nn.Linear and bitsandbytes 4-bit targets (`use_addmm_layers`).
"""

import torch
from peft import LoraConfig
from peft.import_utils import is_bnb_4bit_available
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from torch import nn


def add_scaled_product(result: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """result + scaling * F.linear(hidden, weight), as one addmm over the flattened rows.

    `result` is promoted to hidden's dtype first, as `result + product` would promote it.
    """
    # (r x out), scaling the factor, not the output. Made row-major because addmm's backward gives the
    # factor's gradient the factor's layout: for a transposed one it computes grad^T @ hidden, an
    # (out x rows) @ (rows x r) product that runs slower on a CPU than hidden^T @ grad.
    product_weight = (weight * scaling).t().contiguous()
    rows = torch.addmm(result.to(hidden.dtype).reshape(-1, result.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), product_weight)
    return rows.view(*result.shape[:-1], rows.shape[-1])


class NoInputCastUnderAutocast:
    """For PEFT LoRA layers: under autocast, the input keeps its dtype on its way into the adapter.

    PEFT casts a layer's input to the adapter weights' dtype (float32 adapters on a bf16 base), and
    autocast casts it straight back to bf16 for the adapter's matmuls: two lossless passes over an
    input-sized tensor per adapted layer, and two more in backward (a visible share of a bf16 step on a
    CPU, docs/benchmarks.md). Without autocast the cast is needed for the dtypes to match, and stays.
    """

    def _cast_input_dtype(self, x, dtype):
        if x is not None and torch.is_autocast_enabled(x.device.type):
            return x
        return super()._cast_input_dtype(x, dtype)


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


class AddmmLoraLinear(NoInputCastUnderAutocast, LoraLinear):
    @property
    def lora_variants(self):
        # Plain LoRA gets the addmm forward; DoRA and the other variants keep PEFT's.
        return {**super().lora_variants, (): AddmmLoraVariant}


if is_bnb_4bit_available():  # bitsandbytes is optional, as in fora.tuners.fora
    from peft.tuners.lora import bnb as peft_bnb

    class AddmmLoraLinear4bit(NoInputCastUnderAutocast, peft_bnb.Linear4bit):
        """PEFT's LoRA layer over a bitsandbytes 4-bit layer, with the addmm forward.

        PEFT's 4-bit forward clones the base output before adding to it (bitsandbytes outputs modified in
        place once broke backward); addmm writes a new tensor, so that clone, one more pass over the output,
        is not needed. Several active adapters, merged or disabled ones, DoRA and per-row adapter batches
        take PEFT's forward.
        """

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            active = [name for name in self.active_adapters if name in self.lora_A]
            if args or kwargs or self.disable_adapters or self.merged or len(active) != 1 or active[0] in self.lora_variant:
                return super().forward(x, *args, **kwargs)
            result = self.base_layer(x)
            x = self._cast_input_dtype(x, self.lora_A[active[0]].weight.dtype)  # as PEFT: the adapter's dtype
            return AddmmLoraVariant.forward(self, active[0], x, result).to(result.dtype)


def use_addmm_layers(config: LoraConfig, quantized_4bit: bool = False) -> LoraConfig:
    """Have `get_peft_model(model, config)` build AddmmLoraLinear for nn.Linear targets and, in a
    4-bit model, AddmmLoraLinear4bit for its bitsandbytes 4-bit ones.

    Not for 8-bit models: PEFT's custom dispatch takes the first isinstance match, and bitsandbytes'
    quantized layers subclass nn.Linear (hence the 4-bit class first); 8-bit layers keep PEFT's own.
    """
    custom = {}
    if quantized_4bit:
        import bitsandbytes as bnb  # a 4-bit model means bitsandbytes is there

        custom[bnb.nn.Linear4bit] = AddmmLoraLinear4bit
    config._register_custom_module({**custom, nn.Linear: AddmmLoraLinear})
    return config
