"""fora/tuners/lora_fast.py: the addmm LoRA layers against PEFT's own: same outputs, gradients, merge and saved files."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import bnb as peft_bnb
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fora.models.load import load_model
from fora.tuners.lora_fast import AddmmLoraLinear, AddmmLoraLinear4bit, NoInputCastUnderAutocast, add_scaled_product, use_addmm_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def adapted(tiny_model, addmm: bool, scaling_alpha: int = 12, dtype=torch.float32, quantization_bit=None):
    model = load_model(str(tiny_model), dtype, quantization_bit=quantization_bit, unmap_freed_memory=False)
    config = LoraConfig(r=4, lora_alpha=scaling_alpha, target_modules="all-linear", lora_dropout=0.0)
    torch.manual_seed(0)
    model = get_peft_model(model, use_addmm_layers(config, quantized_4bit=quantization_bit == 4) if addmm else config)
    with torch.no_grad():  # B = 0 at init would make every adapter a no-op
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return model


def logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_add_scaled_product_is_the_formula():
    generator = torch.Generator().manual_seed(0)
    result, hidden, weight = (torch.randn(shape, generator=generator) for shape in ((2, 5, 7), (2, 5, 3), (7, 3)))
    expected = result + 0.75 * hidden @ weight.T
    torch.testing.assert_close(add_scaled_product(result, hidden, weight, 0.75), expected)
    promoted = add_scaled_product(result.bfloat16(), hidden, weight, 0.75)  # as result + product would promote
    assert promoted.dtype == torch.float32
    torch.testing.assert_close(promoted, result.bfloat16().float() + 0.75 * hidden @ weight.T)


def test_same_outputs_and_gradients_as_peft_lora(tiny_model):
    plain, addmm = adapted(tiny_model, addmm=False), adapted(tiny_model, addmm=True)
    layers = [type(m) for m in addmm.modules() if isinstance(m, LoraLinear)]
    assert layers and set(layers) == {AddmmLoraLinear}
    assert not any(isinstance(m, AddmmLoraLinear) for m in plain.modules())
    ids = torch.randint(3, plain.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))

    expected_logits, expected_grads = logits_and_grads(plain, ids)
    logits, grads = logits_and_grads(addmm, ids)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
    assert grads.keys() == expected_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_4bit_layers_same_outputs_and_gradients_as_peft(tiny_model, compute_dtype):
    plain = adapted(tiny_model, addmm=False, dtype=compute_dtype, quantization_bit=4)
    addmm = adapted(tiny_model, addmm=True, dtype=compute_dtype, quantization_bit=4)
    layers = {type(m) for m in addmm.modules() if isinstance(m, LoraLinear | peft_bnb.Linear4bit)}
    assert layers == {AddmmLoraLinear4bit}  # every block linear is 4-bit, and none got the nn.Linear layer
    assert {type(m) for m in plain.modules() if isinstance(m, peft_bnb.Linear4bit)} == {peft_bnb.Linear4bit}
    ids = torch.randint(3, plain.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))

    expected_logits, expected_grads = logits_and_grads(plain, ids)
    logits, grads = logits_and_grads(addmm, ids)
    assert logits.dtype == expected_logits.dtype
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if compute_dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(logits, expected_logits, **tolerance)
    assert grads.keys() == expected_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], **(tolerance | {"atol": tolerance["atol"] / 10}), msg=name)


def test_saved_adapter_loads_in_plain_peft_and_merges(tiny_model, tmp_path):
    model = adapted(tiny_model, addmm=True)
    ids = torch.randint(3, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(load_model(str(tiny_model), torch.float32), tmp_path)
    assert not any(isinstance(m, AddmmLoraLinear) for m in loaded.modules())  # PEFT's own layers
    merged = model.merge_and_unload()  # through AddmmLoraVariant.merge_*
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


class CountUpcasts(TorchDispatchMode):
    """Counts bf16 -> float32 copies of tensors shaped `shape` (what PEFT's input cast makes)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.bfloat16 and out.dtype == torch.float32:
            self.count += out.shape == self.shape
        return out


@pytest.mark.parametrize("finetuning_type", ["lora", "fora"])
def test_no_float32_copy_of_the_input_under_autocast(finetuning_type, monkeypatch):
    """A bf16 base with float32 adapters under autocast (--bf16): the input goes into the adapter as it is,
    and the output and gradients are exactly those of PEFT's cast-then-autocast path."""
    from fora.tuners.fora import ForaConfig

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(64, 96, bias=False)

        def forward(self, x):
            return self.proj(x)

    def run(layer_input_cast: bool):
        torch.manual_seed(0)
        config_class = ForaConfig if finetuning_type == "fora" else LoraConfig
        config = config_class(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False)
        model = get_peft_model(Block().to(torch.bfloat16), config if finetuning_type == "fora" else use_addmm_layers(config))
        assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
        if layer_input_cast:  # PEFT's own behaviour: cast to the adapter's dtype whatever autocast does
            monkeypatch.setattr(NoInputCastUnderAutocast, "_cast_input_dtype", BaseTunerLayer._cast_input_dtype)
        x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).requires_grad_()
        counter = CountUpcasts(x.shape)
        with counter, torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().sum().backward()
        monkeypatch.undo()
        return counter.count, out, x.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    upcasts, out, x_grad, grads = run(layer_input_cast=False)
    peft_upcasts, peft_out, peft_x_grad, peft_grads = run(layer_input_cast=True)
    assert upcasts == 0 and peft_upcasts == 1
    assert torch.equal(out, peft_out) and torch.equal(x_grad, peft_x_grad)
    assert grads.keys() == peft_grads.keys() and all(torch.equal(grads[n], peft_grads[n]) for n in grads)
