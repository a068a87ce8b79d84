"""train_qlora.py: the base really is 4-bit (or 8-bit), adapters sit on every quantized layer, training runs."""

import json
import sys

import bitsandbytes as bnb
import pytest
import torch
from conftest import REPO, run_script
from peft.tuners.lora import LoraLayer
from torch import nn

from fora import errors as fora_errors
from fora.args import FinetuningArguments
from fora.cli import PAGED_OPTIMIZER, with_paged_optimizer
from fora.models import load as model_loading
from fora.models.load import load_model
from fora.precision import cpu_has_bf16
from fora.tuners.attach import attach_adapter
from fora.tuners.fora import ForaLinear4bit

BLOCK_LINEARS = 7 * 2  # q, k, v, o, gate, up, down in each of the tiny model's 2 layers


def blocks(model) -> nn.Module:
    return max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len)


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


def test_8bit_path_loads_int8_layers(tiny_model):
    model = load_model(str(tiny_model), torch.float32, quantization_bit=8)
    layers = [m for m in blocks(model).modules() if isinstance(m, nn.Linear)]
    assert len(layers) == BLOCK_LINEARS
    assert all(isinstance(m, bnb.nn.Linear8bitLt) and m.weight.dtype == torch.int8 for m in layers)
    model = attach_adapter(model, FinetuningArguments(lora_rank=4))
    assert len([m for m in model.modules() if isinstance(m, LoraLayer)]) == BLOCK_LINEARS


# Loads the tiny model in 4-bit with the --unmap_freed_memory given, then allocates a 3 MB block and
# prints whether glibc served it with mmap (mallinfo2's count of mmapped blocks went up).
MMAP_PROBE = """
import ctypes, sys, torch
from fora.args import ModelArguments, parse_args
from fora.models.load import load_model
(args,) = parse_args((ModelArguments,), sys.argv[2:])
load_model(sys.argv[1], torch.float32, quantization_bit=4, unmap_freed_memory=args.unmap_freed_memory)
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
torch.empty(8 << 20, dtype=torch.uint8)  # freed at once: glibc's default then keeps blocks up to 8 MB in its heap
before = libc.mallinfo2().hblks
block = torch.empty(3 << 20, dtype=torch.uint8)
print(libc.mallinfo2().hblks - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("flag, mmapped", [([], "1"), (["--unmap_freed_memory", "False"], "0")])
def test_unmap_freed_memory_flag_sets_the_mmap_threshold(tiny_model, flag, mmapped):
    """A fresh process each: the threshold is process-wide and cannot be unset."""
    result = run_script(sys.executable, "-c", MMAP_PROBE, str(tiny_model), *flag)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == mmapped


def test_paged_optimizer_only_on_cuda(tmp_path):
    assert with_paged_optimizer(["--lora_rank", "2"], cuda=False) == ["--lora_rank", "2"]
    assert with_paged_optimizer(["--lora_rank", "2"], cuda=True)[-2:] == ["--optim", PAGED_OPTIMIZER]
    assert with_paged_optimizer(["--optim", "adamw_torch"], cuda=True) == ["--optim", "adamw_torch"]
    args = tmp_path / "args.yaml"
    args.write_text("optim: adafactor\n")
    assert with_paged_optimizer([str(args)], cuda=True) == [str(args)]


def spo_subset(tmp_path, records: int):
    """The first records of the project's own sample data (the seed's spo_0.json has the same fields)."""
    lines = (REPO / "data" / "train.json").read_text(encoding="utf-8").splitlines()[:records]
    path = tmp_path / "spo_0.json"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_train_qlora_two_steps(tiny_model, tmp_path):
    out = tmp_path / "out"
    result = run_script(
        sys.executable, str(REPO / "train_qlora.py"), "--train_file", str(spo_subset(tmp_path, 8)),
        "--model_name_or_path", str(tiny_model), "--output_dir", str(out), "--prompt_column", "input",
        "--response_column", "output", "--max_steps", "2", "--per_device_train_batch_size", "1",
        "--max_source_length", "128", "--max_target_length", "64", "--lora_rank", "2", "--logging_steps", "1",
        "--finetuning_type", "fora", "--report_to", "none", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    compute = "bfloat16" if cpu_has_bf16() else "float32"  # no precision flag: the machine's native one
    assert f"Base model loaded in 4-bit (NF4, double quantization), compute dtype torch.{compute}" in result.stdout
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    run_info = json.loads((out / "fora_run.json").read_text())
    assert run_info["quantization_bit"] == 4 and run_info["finetuning_type"] == "fora"
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model)
    assert json.loads((out / "train_results.json").read_text())["global_step"] == 2


def test_seed_deepspeed_command(tiny_model, tmp_path):
    """The seed's command as written (ZeRO-2 over 2 processes, here on CPU); only the paths differ.

    The first 40 records of spo_0 (`head -40`): 20 optimizer steps (4 epochs x 20 records per rank / 4 accumulated).
    """
    (tmp_path / "ds_config.json").write_text((REPO / "ds_config.json").read_text())
    spo_subset(tmp_path, 40)
    out = tmp_path / "out"
    command = (
        f"deepspeed --num_gpus 2 {REPO / 'train_qlora.py'} --train_file spo_0.json --model_name_or_path {tiny_model} "
        f"--output_dir {out} --prompt_column input --response_column output --cache_dir goat_cache --overwrite_cache "
        "--overwrite_output_dir --max_source_length 512 --max_target_length 512 --num_train_epochs 4 "
        "--gradient_accumulation_steps 4 --per_device_train_batch_size 1 --warmup_ratio 0.1 --lr_scheduler_type cosine "
        "--save_total_limit 1 --learning_rate 2e-5 --logging_steps 50 --save_steps 500 --lora_rank 2 --fp16 "
        "--torch_dtype float16 --preprocessing_num_workers 2 --deepspeed ds_config.json"
    )
    deepspeed = REPO / ".venv" / "bin" / "deepspeed"
    command = command.replace("deepspeed ", f"{deepspeed if deepspeed.exists() else 'deepspeed'} ", 1)
    result = run_script("bash", "-c", command, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert result.stdout.count("Base model loaded in 4-bit (NF4, double quantization)") == 1  # rank 0 logs
    assert json.loads((out / "fora_run.json").read_text())["quantization_bit"] == 4
    assert json.loads((out / "train_results.json").read_text())["global_step"] == 20
    from safetensors.torch import load_file

    weights = load_file(out / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in weights.items())  # trained away from B = 0
