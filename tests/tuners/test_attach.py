"""fora/tuners/attach.py: adapters on every quantized layer, and the dtypes PEFT's preparation leaves."""

import bitsandbytes as bnb
import pytest
import torch
from peft.tuners.lora import LoraLayer

from fora.args import FinetuningArguments
from fora.models.load import load_model
from fora.tuners.attach import attach_adapter
from fora.tuners.fora import ForaLinear4bit
from support import BLOCK_LINEARS, blocks


@pytest.mark.parametrize("finetuning_type", ["lora", "fora"])
def test_adapters_on_every_4bit_layer(tiny_model, finetuning_type):
    model = load_model(str(tiny_model), torch.bfloat16, quantization_bit=4)
    model = attach_adapter(model, FinetuningArguments(finetuning_type=finetuning_type, lora_rank=4))
    quantized = [m for m in blocks(model).modules() if isinstance(m, bnb.nn.Linear4bit)]
    wrapped = [m for m in blocks(model).modules() if isinstance(m, LoraLayer)]
    assert len(quantized) == len(wrapped) == BLOCK_LINEARS
    assert {id(m.get_base_layer()) for m in wrapped} == {id(m) for m in quantized}
    if finetuning_type == "fora":
        assert all(isinstance(m, ForaLinear4bit) for m in wrapped)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    # bf16 has fp32's range: the embeddings and the output layer keep bf16 rather than an fp32 copy
    base = model.get_base_model()
    assert base.get_input_embeddings().weight.dtype == torch.bfloat16
    assert base.get_output_embeddings().weight.dtype == torch.bfloat16
    assert {p.dtype for name, p in model.named_parameters() if "lora_" not in name} == {torch.uint8, torch.bfloat16}
    # and the model still trains: a forward/backward reaches every adapter
    ids = torch.tensor([[1, 50, 60, 70, 80, 2]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_fp16_base_keeps_pefts_fp32_upcast(tiny_model):
    """fp16's range is narrow: there PEFT's fp32 copies of embeddings, output layer and norms stay."""
    model = load_model(str(tiny_model), torch.float16, quantization_bit=4)
    model = attach_adapter(model, FinetuningArguments(lora_rank=4))
    assert {p.dtype for name, p in model.named_parameters() if "lora_" not in name} == {torch.uint8, torch.float32}
