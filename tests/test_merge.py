"""fora/merge.py (merge_lora.py): merged weights reproduce base + adapter, the result is plain transformers, bad input is refused."""

import json
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from fora.args import FinetuningArguments
from fora.models.load import load_model
from fora.run import RunRecord
from fora.tuners.attach import attach_adapter, load_adapter
from support import REPO, run_script

TOKENS = torch.tensor([[1, 17, 400, 2301, 77, 5, 9000, 33, 120, 8]])


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def make_adapter(base, folder, finetuning_type="lora", quantization_bit=None, seed=0):
    """An adapter on `base` with every factor random (B and D too, so ΔW is far from zero), saved as training does."""
    model = load_model(str(base), torch.float32, quantization_bit=quantization_bit)
    args = FinetuningArguments(finetuning_type=finetuning_type, lora_rank=4, lora_dropout=0.0)
    model = attach_adapter(model, args)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    model.save_pretrained(folder)
    RunRecord(base_model=str(base), finetuning_type=finetuning_type, torch_dtype="float32",
              quantization_bit=quantization_bit).save(folder)
    return folder


@torch.no_grad()
def adapter_logits(base, adapter, quantization_bit=None) -> torch.Tensor:
    model = load_model(str(base), torch.float32, quantization_bit=quantization_bit)
    # A 4-bit base runs in train mode (nothing here drops out): bitsandbytes then dequantizes and multiplies
    # in float32, as training did. In eval mode on CPUs with AVX512-BF16 it repacks the 4-bit weights for
    # an inference kernel that rounds differently (0.4% of the logits on the tiny model).
    model = load_adapter(model, str(adapter)).train(quantization_bit is not None)
    return model(input_ids=TOKENS).logits


@torch.no_grad()
def plain_logits(folder) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model(input_ids=TOKENS).logits


def merge(*argv):
    from fora import merge as merge_lora

    merge_lora.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "lora": make_adapter(tiny_model, root / "lora", "lora"),
        "fora": make_adapter(tiny_model, root / "fora", "fora", seed=1),
        "qlora": make_adapter(tiny_model, root / "qlora", "lora", quantization_bit=4, seed=2),
    }


@pytest.fixture(scope="module")
def other_base(tmp_path_factory, tiny_model):
    """A Llama like the tiny one but narrower: every adapter matrix has the wrong shape for it."""
    config = LlamaConfig.from_pretrained(tiny_model)
    config.hidden_size, config.intermediate_size = 32, 96
    folder = tmp_path_factory.mktemp("other-base")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["lora", "fora"])
def test_merged_logits_match_base_plus_adapter(kind, adapters, tiny_model, tmp_path):
    out = tmp_path / "merged"
    # LoRA takes its base from fora_run.json; FoRA names it.
    merge("--adapter", adapters[kind], "--output_dir", out, *(["--base_model", tiny_model] if kind == "fora" else []))
    expected = adapter_logits(tiny_model, adapters[kind])
    merged = plain_logits(out)
    assert relative_error(merged, expected) < 1e-4
    # The adapter matters: a merge that dropped it would be far off.
    assert relative_error(plain_logits(tiny_model), expected) > 1e-2
    assert json.loads((out / "fora_merge.json").read_text())["finetuning_type"] == kind


def test_qlora_adapter_merges_into_the_dequantized_base(adapters, tiny_model, tmp_path):
    expected = adapter_logits(tiny_model, adapters["qlora"], quantization_bit=4)  # 4-bit base + adapter
    merge("--adapter", adapters["qlora"], "--output_dir", tmp_path / "deq")
    merge("--adapter", adapters["qlora"], "--output_dir", tmp_path / "orig", "--merge_into", "original")
    dequantized_error = relative_error(plain_logits(tmp_path / "deq"), expected)
    original_error = relative_error(plain_logits(tmp_path / "orig"), expected)
    assert dequantized_error < 1e-4
    assert original_error > 100 * max(dequantized_error, 1e-7)  # NF4 rounding shows: the flag really switches bases
    assert json.loads((tmp_path / "deq" / "fora_merge.json").read_text())["merge_into"] == "dequantized"


@pytest.mark.slow
def test_cli_shards_and_loads_without_peft(adapters, tiny_model, tmp_path):
    out = tmp_path / "sharded"
    result = run_script(sys.executable, "merge_lora.py", "--adapter", str(adapters["fora"]), "--output_dir", str(out),
                        "--max_shard_size", "5MB", "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr[-3000:]
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert not [key for key in index["weight_map"] if "lora_" in key or "base_layer" in key]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert (out / "tokenizer_config.json").is_file()
    # A fresh interpreter with transformers only: loads, runs, and never imports peft or the project.
    check = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer;"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); t = AutoTokenizer.from_pretrained({str(out)!r});"
        "m(**t('hello', return_tensors='pt'));"
        "bad = [n for n in sys.modules if n.split('.')[0] in ('peft', 'fora', 'fusion_lora')];"
        "assert not bad, bad; print('ok', type(m).__name__)"
    )
    loaded = run_script(sys.executable, "-c", check, cwd=tmp_path)
    assert loaded.returncode == 0 and "ok LlamaForCausalLM" in loaded.stdout, loaded.stderr[-3000:]
    # --dtype casts the float32 merge at the end: bf16 weights = the fp32 merge rounded once
    merge("--adapter", adapters["fora"], "--output_dir", tmp_path / "fp32", "--dtype", "float32")
    fp32 = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32").state_dict()
    bf16 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).state_dict()
    assert bf16.keys() == fp32.keys()
    assert all(torch.equal(bf16[k], fp32[k].to(torch.bfloat16)) for k in fp32)


def error_line(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr[-3000:]
    return errors[0]


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def existing_model(tmp_path):
    """An output folder that already holds a (fake) model."""
    folder = tmp_path / "existing"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"precious weights")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, expected",
    [
        ("not_an_adapter", "not an adapter folder"),
        ("other_base", "another base model"),
        ("missing_base", "no such folder"),
        ("output_holds_model", "holds an earlier run (config.json)"),
        ("output_not_empty", "holds an earlier run (notes.txt)"),
        ("overwrite_but_fails", "another base model"),
    ],
)
def test_bad_input_is_one_line_and_overwrites_nothing(case, expected, adapters, tiny_model, other_base, existing_model, tmp_path):
    adapter, base, out, extra = adapters["lora"], None, tmp_path / "new", []
    if case == "not_an_adapter":
        adapter = tiny_model
    elif case == "other_base":
        base = other_base
    elif case == "missing_base":
        base = tmp_path / "no" / "such" / "model"
    elif case == "output_holds_model":
        out = existing_model
    elif case == "output_not_empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "overwrite_but_fails":  # allowed to replace, but the merge fails: the old model stays
        base, out, extra = other_base, existing_model, ["--overwrite_output_dir"]
    before = snapshot(existing_model)
    argv = ["--adapter", str(adapter), "--output_dir", str(out), *extra, *(["--base_model", str(base)] if base else [])]
    line = error_line(run_script(sys.executable, str(REPO / "merge_lora.py"), *argv))
    assert expected in line
    assert snapshot(existing_model) == before
    if case == "output_not_empty":
        assert snapshot(out) == {"notes.txt": b"mine"}
    else:
        assert not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name]  # no leftovers


def test_overwrite_replaces_a_previous_merge(adapters, tmp_path, existing_model):
    merge("--adapter", adapters["lora"], "--output_dir", existing_model, "--overwrite_output_dir")
    assert not (existing_model / "model.safetensors").read_bytes().startswith(b"precious")
    assert AutoModelForCausalLM.from_pretrained(existing_model) is not None
    assert [p.name for p in tmp_path.iterdir()] == ["existing"]  # staging and backup folders are gone


def test_8bit_adapter_merges_into_the_dequantized_base(tiny_model, tmp_path):
    """LLM.int8 rounds the activations too, so logits cannot match exactly; check the weights instead:
    the two merges differ by exactly the int8 rounding of the base, dequant(W) - W."""
    adapter = make_adapter(tiny_model, tmp_path / "ad8", "fora", quantization_bit=8, seed=3)
    merge("--adapter", adapter, "--output_dir", tmp_path / "deq")
    merge("--adapter", adapter, "--output_dir", tmp_path / "orig", "--merge_into", "original")
    deq = AutoModelForCausalLM.from_pretrained(tmp_path / "deq").state_dict()
    orig = AutoModelForCausalLM.from_pretrained(tmp_path / "orig").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    name = "model.layers.1.mlp.down_proj.weight"
    W = base[name]
    half = W.half().float()  # bitsandbytes quantizes int8 weights from their fp16 values
    absmax = half.abs().amax(dim=1, keepdim=True)  # LLM.int8: one absmax scale per output row
    rounding = torch.round(half * (127 / absmax)) * absmax / 127 - W
    assert rounding.abs().max() > 1e-4  # int8 rounding is visible at all
    torch.testing.assert_close(deq[name] - orig[name], rounding, atol=2e-6, rtol=0)
    assert torch.equal(deq["model.norm.weight"], orig["model.norm.weight"])  # unquantized weights are the base's
    expected = adapter_logits(tiny_model, adapter, quantization_bit=8)
    assert relative_error(plain_logits(tmp_path / "deq"), expected) < 2e-2
