"""The addmm LoRA layers against PEFT's own: same outputs, gradients, merge and saved files."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import bnb as peft_bnb

from fora.adapters import AddmmLoraLinear, AddmmLoraLinear4bit, add_scaled_product, use_addmm_layers
from fora.modeling import load_model

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
