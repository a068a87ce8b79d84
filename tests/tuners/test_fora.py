"""fora/tuners/fora.py (fusion_lora): FoRA's layers against its formula computed here, independently, from the five matrices.

    h = W0 x + s * D (A x + E A x + C B A x)        dW = s * D (I + E + C B) A
"""

import json
import math

import bitsandbytes as bnb
import pytest
import torch
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch import nn
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from fora.tuners.fora import ForaConfig, ForaLinear, ForaLinear4bit, ForaLinear8bitLt, ForaLinearVariant, load_fora_config

R, ALPHA = 4, 8
S = ALPHA / R
FACTORS = ("A", "B", "C", "D", "E")
LLAMA = LlamaConfig(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)
TARGETS = ["q_proj", "v_proj", "down_proj"]


class Holder(nn.Module):
    """The smallest model PEFT can inject into: one target layer named `lin`."""

    def __init__(self, lin: nn.Module):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def fora(lin: nn.Module, autocast_adapter_dtype=True, **overrides):
    """PeftModel around `lin` and its FoRA layer."""
    config = ForaConfig(**{"r": R, "lora_alpha": ALPHA, "lora_dropout": 0.0, "target_modules": ["lin"], **overrides})
    model = get_peft_model(Holder(lin), config, autocast_adapter_dtype=autocast_adapter_dtype)
    return model, model.base_model.model.lin


def factors(layer) -> dict[str, torch.Tensor]:
    """The five matrices of the default adapter, as fp32 copies."""
    return {f: getattr(layer, f"lora_{f}")["default"].weight.detach().float().clone() for f in FACTORS}


def make_nonzero(layer, std=0.1):
    """B and D start at zero, which would hide every term but the base; give them values."""
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=std)
        layer.lora_D["default"].weight.normal_(std=std)


def fora_output(W0, f, x):
    x, W0 = x.float(), W0.float()
    ax = x @ f["A"].T
    return x @ W0.T + S * (ax + ax @ f["E"].T + ax @ f["B"].T @ f["C"].T) @ f["D"].T


def lora_output(W0, f, x):
    """What a plain-LoRA fallback (h = W0 x + s D A x) would give, to prove FoRA's path ran."""
    x, W0 = x.float(), W0.float()
    return x @ W0.T + S * x @ f["A"].T @ f["D"].T


def fora_delta(f):
    return S * f["D"] @ (torch.eye(R) + f["E"] + f["C"] @ f["B"]) @ f["A"]


def assert_fora(out, expected, plain, tol):
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
    # the tolerance must be far tighter than the gap to plain LoRA, or the check above proves nothing
    assert (expected - plain).abs().max() > 5 * tol


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LLAMA).eval()


def token_ids(seed=1):
    return torch.randint(0, LLAMA.vocab_size, (2, 8), generator=torch.Generator().manual_seed(seed))


# 1. forward


@pytest.mark.parametrize(
    "base_dtype, adapter_dtype, autocast, tol",
    [
        (torch.float32, torch.float32, False, 1e-6),
        (torch.bfloat16, torch.float32, False, 3e-2),  # PEFT's default: half-precision adapters upcast to fp32
        (torch.bfloat16, torch.bfloat16, False, 3e-2),
        (torch.float16, torch.float16, False, 3e-3),
        (torch.float32, torch.float32, True, 3e-2),  # bf16 matmuls
    ],
)
def test_forward_matches_formula(base_dtype, adapter_dtype, autocast, tol):
    torch.manual_seed(0)
    upcast = adapter_dtype != base_dtype
    model, layer = fora(nn.Linear(32, 24, bias=False, dtype=base_dtype), autocast_adapter_dtype=upcast)
    make_nonzero(layer)
    assert isinstance(layer, ForaLinear)
    assert {getattr(layer, f"lora_{f}")["default"].weight.dtype for f in FACTORS} == {adapter_dtype}
    x = torch.randn(5, 32, dtype=base_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    assert out.dtype == (torch.bfloat16 if autocast else base_dtype)
    W0, f = layer.base_layer.weight, factors(layer)
    assert_fora(out, fora_output(W0, f, x), lora_output(W0, f, x), tol)


def test_dropout_applies_to_the_adapter_input():
    torch.manual_seed(0)
    model, layer = fora(nn.Linear(32, 24), lora_dropout=1.0)  # drops all of x', leaving W0 x
    make_nonzero(layer)
    x = torch.randn(5, 32)
    torch.testing.assert_close(model.train()(x), layer.base_layer(x), atol=0, rtol=0)
    assert (model.eval()(x) - layer.base_layer(x)).abs().max() > 1e-2  # eval: no dropout


# 2. shapes, initialisation, config


@pytest.mark.parametrize(
    "unsupported",
    [{"mid_ratio": 0.0}, {"use_fora": False}, {"lora_bias": True}, {"init_lora_weights": "pissa"}],
)
def test_config_rejects_what_fora_cannot_honour(unsupported):
    with pytest.raises(ValueError):
        ForaConfig(**unsupported)


@pytest.mark.parametrize("d_in, mid_ratio, m", [(64, 0.25, 16), (27, 0.25, 6), (20, 0.05, 2)])
def test_shapes_and_zero_delta_at_init(d_in, mid_ratio, m):
    d_out = 24
    assert m == max(2, math.floor(mid_ratio * d_in))
    model, layer = fora(nn.Linear(d_in, d_out), mid_ratio=mid_ratio)
    f = factors(layer)
    assert {k: tuple(v.shape) for k, v in f.items()} == {
        "A": (R, d_in),
        "B": (m, R),
        "C": (R, m),
        "D": (d_out, R),
        "E": (R, R),
    }
    assert not f["B"].any() and not f["D"].any()
    assert f["A"].any() and f["C"].any() and f["E"].any()
    assert not layer.get_delta_weight("default").any()
    x = torch.randn(3, d_in)
    torch.testing.assert_close(model(x), layer.base_layer(x), atol=0, rtol=0)


# 3. merge


@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_unmerge_linear(safe_merge):
    torch.manual_seed(0)
    model, layer = fora(nn.Linear(32, 24))
    make_nonzero(layer)
    W0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(5, 32)
    adapter_out = model(x)
    f = factors(layer)
    torch.testing.assert_close(layer.get_delta_weight("default"), fora_delta(f), atol=1e-6, rtol=1e-5)

    layer.merge(safe_merge=safe_merge)
    torch.testing.assert_close(layer.base_layer.weight.detach(), W0 + fora_delta(f), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model(x), adapter_out, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight.detach(), W0, atol=1e-6, rtol=0)


def test_merge_and_unload_llama():
    config = ForaConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)  # B, D != 0
    model = get_peft_model(tiny_llama(), config)
    ids = token_ids()
    with torch.no_grad():
        adapter_logits = model(ids).logits
        with model.disable_adapter():
            base_logits = model(ids).logits
        merged = model.merge_and_unload()
        merged_logits = merged(ids).logits
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=1e-5)
    assert (merged_logits - base_logits).abs().max() > 1e-2  # the adapter did change the model


# 4. save and load


def test_save_load_round_trip(tmp_path):
    base = tiny_llama()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    config = ForaConfig(
        r=R, lora_alpha=ALPHA, lora_dropout=0.05, mid_ratio=0.5, target_modules=TARGETS, init_lora_weights=False
    )
    model = get_peft_model(base, config).eval()
    ids = token_ids()
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["use_fora"] is True and saved["mid_ratio"] == 0.5
    assert (saved["r"], saved["lora_alpha"], saved["lora_dropout"]) == (R, ALPHA, 0.05)
    assert set(saved["target_modules"]) == set(TARGETS)

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    d, kv, ff = LLAMA.hidden_size, LLAMA.num_key_value_heads * LLAMA.head_dim, LLAMA.intermediate_size
    expected = {}
    for i in range(LLAMA.num_hidden_layers):
        for name, d_in, d_out in (("self_attn.q_proj", d, d), ("self_attn.v_proj", d, kv), ("mlp.down_proj", ff, d)):
            m = max(2, math.floor(0.5 * d_in))
            shapes = {"A": (R, d_in), "B": (m, R), "C": (R, m), "D": (d_out, R), "E": (R, R)}
            for f, shape in shapes.items():
                expected[f"base_model.model.model.layers.{i}.{name}.lora_{f}.weight"] = shape
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected

    cfg = load_fora_config(tmp_path)
    assert isinstance(cfg, ForaConfig) and cfg.mid_ratio == 0.5
    fresh = LlamaForCausalLM(LLAMA)
    fresh.load_state_dict(base_state)
    loaded = PeftModel.from_pretrained(fresh, tmp_path, config=cfg).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
    reloaded = get_peft_model_state_dict(loaded)
    assert reloaded.keys() == tensors.keys() and all(torch.equal(reloaded[k], tensors[k]) for k in tensors)
    # the same load PEFT does inside from_pretrained, to see its missing / unexpected keys
    result = set_peft_model_state_dict(loaded, tensors)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]


def test_trainable_load_and_plain_peft_refuses_fora(tmp_path):
    get_peft_model(tiny_llama(), ForaConfig(r=R, target_modules=TARGETS)).save_pretrained(tmp_path / "fora")
    trainable = PeftModel.from_pretrained(
        tiny_llama(), tmp_path / "fora", config=load_fora_config(tmp_path / "fora"), is_trainable=True
    )
    names = {n.rsplit(".", 3)[-3] for n, p in trainable.named_parameters() if p.requires_grad}
    assert names == {f"lora_{f}" for f in FACTORS}
    frozen = PeftModel.from_pretrained(tiny_llama(), tmp_path / "fora", config=load_fora_config(tmp_path / "fora"))
    assert not any(p.requires_grad for p in frozen.parameters())

    # plain PEFT reads a LoraConfig (dropping FoRA's fields) and builds d_out x r lora_B: FoRA's m x r B must not fit
    with pytest.warns(UserWarning, match="mid_ratio"), pytest.raises(RuntimeError, match="size mismatch for .*lora_B"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "fora")

    get_peft_model(tiny_llama(), LoraConfig(r=R, target_modules=TARGETS)).save_pretrained(tmp_path / "lora")
    assert load_fora_config(tmp_path / "lora") is None


# 5. gradients


def test_all_five_factors_train():
    model = get_peft_model(tiny_llama(), ForaConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS)).train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {n.rsplit(".", 3)[-3] for n in params} == {f"lora_{f}" for f in FACTORS}
    init = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.Adam(params.values(), lr=1e-2)  # no weight decay: only gradients move weights
    ids = token_ids()

    # With B = D = 0 at init, dW = s D (I + E + C B) A has a non-zero gradient only in D at step 1.
    # Once D moved, A, E and B (through C) get gradients at step 2; C's gradient carries B A x, so it
    # starts moving only at step 3, after B has.
    first_moved = {}
    for step in (1, 2, 3):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is not None for p in params.values())  # all five are in the graph
        optimizer.step()
        for n, p in params.items():
            if n not in first_moved and not torch.equal(p, init[n]):
                first_moved[n] = step
    assert first_moved.keys() == params.keys()
    expected_step = {"lora_D": 1, "lora_A": 2, "lora_E": 2, "lora_B": 2, "lora_C": 3}
    assert {n: expected_step[n.rsplit(".", 3)[-3]] for n in params} == first_moved


# 6. quantized bases


def quantized_4bit(compute_dtype):
    weight = nn.Linear(32, 24, bias=False).weight.detach()
    layer = bnb.nn.Linear4bit(32, 24, bias=False, compute_dtype=compute_dtype, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    return layer.to("cpu")  # quantizes


def dequantized(layer) -> torch.Tensor:
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()


@pytest.mark.parametrize(
    "compute_dtype, autocast, tol",
    [
        (torch.float32, False, 1e-5),
        (torch.float32, True, 3e-2),
        (torch.bfloat16, False, 3e-2),
        (torch.bfloat16, True, 3e-2),
    ],
)
def test_4bit_forward_matches_formula(compute_dtype, autocast, tol):
    torch.manual_seed(0)
    model, layer = fora(quantized_4bit(compute_dtype))
    assert isinstance(layer, ForaLinear4bit)
    make_nonzero(layer)
    x = torch.randn(5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    W0, f = dequantized(layer.base_layer), factors(layer)
    assert_fora(out, fora_output(W0, f, x), lora_output(W0, f, x), tol)


def test_4bit_merge():
    torch.manual_seed(0)
    _, layer = fora(quantized_4bit(torch.float32))
    make_nonzero(layer, std=1.0)  # a dW well above nf4's rounding, so re-quantizing can't hide a wrong merge
    W0, f = dequantized(layer.base_layer), factors(layer)
    # PEFT's bnb merge hands the dequantized weight to the variant and re-quantizes what it returns
    merged = ForaLinearVariant.merge_safe(layer, "default", W0)
    torch.testing.assert_close(merged, W0 + fora_delta(f), atol=1e-5, rtol=1e-5)

    with pytest.warns(UserWarning, match="4-bit"):
        layer.merge()
    # Re-quantizing rounds W0 + dW to NF4 (up to ~14% of each block's absmax), so the merged layer must
    # hold exactly what quantizing W0 + dW afresh gives, not W0 + dW itself.
    expected = bnb.nn.Params4bit(W0 + fora_delta(f), requires_grad=False, quant_type="nf4").to("cpu")
    assert torch.equal(layer.base_layer.weight.data, expected.data)
    torch.testing.assert_close(dequantized(layer.base_layer), bnb.functional.dequantize_4bit(expected.data, expected.quant_state))


def test_8bit_forward_matches_formula():
    torch.manual_seed(0)
    weight = nn.Linear(32, 24, bias=False).weight.detach()
    base = bnb.nn.Linear8bitLt(32, 24, bias=False, has_fp16_weights=False)
    base.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    base = base.to("cpu")  # quantizes
    W0 = bnb.functional.int8_vectorwise_dequant(base.weight.data, base.weight.SCB)  # SCB moves to state on use
    model, layer = fora(base)
    assert isinstance(layer, ForaLinear8bitLt)
    make_nonzero(layer)
    x = torch.randn(5, 32)
    out = model(x)
    # int8 matmul also quantizes x, so take the base output as is and check the adapter's part exactly
    base_out = layer.base_layer(x)
    torch.testing.assert_close(base_out, x @ W0.T, atol=5e-2, rtol=5e-2)
    f = factors(layer)
    zero = torch.zeros_like(W0)
    assert_fora(out - base_out, fora_output(zero, f, x), lora_output(zero, f, x), 1e-5)


def test_qlora_llama_trains(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    base = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, device_map="cpu")
    model = get_peft_model(prepare_model_for_kbit_training(base), ForaConfig(r=R, target_modules=TARGETS))
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert len(layers) == 6 and all(isinstance(m, ForaLinear4bit) for m in layers)
    ids = token_ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert {n.rsplit(".", 3)[-3] for n in grads} == {f"lora_{f}" for f in FACTORS}
    assert all(g is not None for g in grads.values())
    assert all(g.any() for n, g in grads.items() if ".lora_D." in n)  # step 1: only D moves, see above


# 7. reproducibility


def test_same_seed_same_adapter():
    def build(seed):
        torch.manual_seed(seed)
        model = get_peft_model(LlamaForCausalLM(LLAMA), ForaConfig(r=R, target_modules=TARGETS))
        return get_peft_model_state_dict(model)

    first, second, other = build(0), build(0), build(1)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
