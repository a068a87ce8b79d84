"""fora/models/load.py: 4-bit (NF4) and 8-bit bases as loaded, the pread path, and the 4-bit forward that stays the training one."""

import bitsandbytes as bnb
import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from fora import errors as fora_errors
from fora.args import FinetuningArguments
from fora.models import load as model_loading
from fora.models.load import load_model
from fora.tuners.attach import attach_adapter
from support import BLOCK_LINEARS, blocks


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_4bit_layers_after_loading(tiny_model, compute_dtype):
    model = load_model(str(tiny_model), compute_dtype, quantization_bit=4)
    layers = [m for m in blocks(model).modules() if isinstance(m, nn.Linear)]
    assert len(layers) == BLOCK_LINEARS
    for layer in layers:
        assert isinstance(layer, bnb.nn.Linear4bit)
        assert isinstance(layer.weight, bnb.nn.Params4bit) and layer.weight.dtype == torch.uint8
        state = layer.weight.quant_state
        assert state.quant_type == "nf4" and state.nested  # NF4 with double quantization
        assert state.dtype == compute_dtype and layer.compute_dtype == compute_dtype
        assert layer.weight.numel() * 2 == layer.in_features * layer.out_features  # two 4-bit codes a byte
    # The output layer and the embeddings stay in the compute dtype, unquantized.
    assert type(model.get_output_embeddings()) is nn.Linear
    assert model.get_input_embeddings().weight.dtype == compute_dtype
    assert model.config.quantization_config.bnb_4bit_quant_type == "nf4" and model.is_loaded_in_4bit


def test_pread_loading_equals_transformers_own(tiny_model, monkeypatch):
    """The CPU path reads the checkpoint with pread; transformers' mmap path (kept for remote code and
    .bin checkpoints) must give the very same quantized model."""
    ids = torch.tensor([[1, 50, 60, 70, 80, 2]])
    ours = load_model(str(tiny_model), torch.float32, quantization_bit=4)
    monkeypatch.setattr(model_loading, "_load_quantized_without_mmap", lambda *args: None)
    theirs = load_model(str(tiny_model), torch.float32, quantization_bit=4)
    assert ours.name_or_path == theirs.name_or_path == str(tiny_model)
    assert ours.generation_config.to_dict() == theirs.generation_config.to_dict()
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_4bit_inference_is_the_training_forward_and_reading_the_state_leaves_the_base_alone(tiny_model, monkeypatch, capsys):
    """bitsandbytes, on CPUs with AVX512-BF16, repacks a 4-bit layer at its first eval-mode forward (then
    computing in bf16 with bf16 scales, whatever the compute dtype) and re-quantizes the scales whenever
    the state dict is read: scores then drifted each time an adapter was loaded. load_model turns that
    off, saying so once; on other CPUs there is nothing to turn off."""
    monkeypatch.setattr(fora_errors, "_noted", set())
    load_model(str(tiny_model), torch.float32, quantization_bit=4)
    model = load_model(str(tiny_model), torch.float32, quantization_bit=4)
    assert capsys.readouterr().err.count("packed bf16 path") == (1 if bnb.functional.has_avx512bf16() else 0)
    assert all(not m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 2]])
    with torch.no_grad():
        model.train()  # the training forward (the tiny model has no dropout)
        trained = model(input_ids=ids).logits
        model.eval()
        first = model(input_ids=ids).logits
        state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        again = model(input_ids=ids).logits
    assert torch.equal(first, trained) and torch.equal(again, first)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_8bit_path_loads_int8_layers(tiny_model):
    model = load_model(str(tiny_model), torch.float32, quantization_bit=8)
    layers = [m for m in blocks(model).modules() if isinstance(m, nn.Linear)]
    assert len(layers) == BLOCK_LINEARS
    assert all(isinstance(m, bnb.nn.Linear8bitLt) and m.weight.dtype == torch.int8 for m in layers)
    model = attach_adapter(model, FinetuningArguments(lora_rank=4))
    assert len([m for m in model.modules() if isinstance(m, LoraLayer)]) == BLOCK_LINEARS


@pytest.mark.parametrize("local_rank, on_device, quantization_bit, expected", [
    ("1", True, None, {"": "cuda:1"}), (None, True, None, {"": "cuda:0"}), ("1", False, 4, {"": "cuda:1"}),
    ("1", False, None, None),
])
def test_on_cuda_a_model_loads_straight_onto_the_launchers_gpu(tiny_model, monkeypatch, local_rank, on_device,
                                                               quantization_bit, expected):
    """Prediction and chat (on_device) and a quantized base load onto this process's GPU (LOCAL_RANK), never into
    host memory first; a model for the Trainer loads on the CPU, for the Trainer to place. CUDA is faked, so
    transformers' loader is replaced by one that records what it was asked."""
    from transformers import AutoModelForCausalLM

    asked = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(model_loading, "quantization_config", lambda bits, dtype: f"{bits}-bit")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda path, **kwargs: asked.update(kwargs))
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    load_model(str(tiny_model), torch.bfloat16, quantization_bit=quantization_bit, on_device=on_device)
    assert asked.get("device_map") == expected and asked["dtype"] == torch.bfloat16
