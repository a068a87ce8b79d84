"""fora/precision.py: the precision chosen for the machine, the one-line fallback without CUDA, and on CUDA
(faked: the suite runs on the CPU everywhere) the choices a GPU gets."""

import pytest
import torch

from fora import precision
from fora.args import DataArguments, FinetuningArguments, ModelArguments, TrainArguments, parse_args
from fora.precision import Precision, cpu_has_bf16, inference_dtype, keep_trainable_in_float32, training_precision
from support import parse_flags

pytestmark = pytest.mark.usefixtures("keep_environment")


# --- precision on a CPU without CUDA --------------------------------------------------------------------


def test_fp16_falls_back_with_one_warning_line(out, capfd):
    model, _, _, training = parse_flags(out, "--fp16", "--torch_dtype", "float16")
    training.precision.report()
    dtype = training.precision.torch_dtype
    cpu_half = "bfloat16" if cpu_has_bf16() else "float32"
    assert dtype == getattr(torch, cpu_half) and not training.fp16
    assert training.bf16 == cpu_has_bf16()
    captured = capfd.readouterr()
    assert captured.err.splitlines() == [f"warning: no CUDA here; --fp16 and --torch_dtype float16 -> {cpu_half} on this CPU"]


def test_fp16_alone_warns_once_and_auto_dtype_follows(out, capfd):
    model, _, _, training = parse_flags(out, "--fp16")
    training.precision.report()
    dtype = training.precision.torch_dtype
    cpu_half = "bfloat16" if cpu_has_bf16() else "float32"
    assert dtype == getattr(torch, cpu_half)
    assert capfd.readouterr().err.splitlines() == [f"warning: no CUDA here; --fp16 -> {cpu_half} on this CPU"]


def test_no_precision_flags_no_warning(out, capfd):
    """No flag: the machine's native half precision (bf16 on such a CPU, else float32), and no warning."""
    model, _, _, training = parse_flags(out)
    training.precision.report()
    assert training.precision.torch_dtype == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    assert capfd.readouterr().err == ""


# --- precision chosen for the machine -------------------------------------------------------------------


def test_native_bf16_is_chosen_when_no_precision_is_given(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    types = (ModelArguments, DataArguments, FinetuningArguments, TrainArguments)
    model, _, _, training = parse_args(types, ["--output_dir", str(tmp_path)])
    assert training.bf16 and training.precision.mixed == "bf16" and training.precision.chosen
    assert training.precision.torch_dtype == torch.bfloat16 and model.torch_dtype == "bfloat16"
    training.precision.report()
    assert "Precision: --bf16" in capsys.readouterr().out
    model, _, _, training = parse_args(types, ["--output_dir", str(tmp_path), "--torch_dtype", "float32"])
    assert not training.bf16 and training.precision.torch_dtype == torch.float32

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    model, _, _, training = parse_args(types, ["--output_dir", str(tmp_path)])
    assert not training.bf16 and training.precision.torch_dtype == torch.float32


# --- on CUDA (faked) ---------------------------------------------------------------------------------------


@pytest.fixture
def cuda(monkeypatch):
    """torch answering as a CUDA machine would; `cuda(bf16=..., emulated=...)` sets what its GPU computes in."""

    def fake(bf16: bool, emulated: bool = False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: bf16 or (emulated and including_emulation))

    return fake


@pytest.mark.parametrize("bf16, emulated, expected", [(True, False, "bfloat16"), (False, True, "float16"), (False, False, "float16")],
                         ids=["ampere", "v100-t4", "older"])
def test_a_gpu_without_hardware_bf16_trains_in_fp16(cuda, bf16, emulated, expected):
    """A V100 or T4 answers bf16 "supported" through emulation, which is slow: the choice is the hardware's."""
    cuda(bf16, emulated)
    assert precision.native_half() == expected
    chosen = training_precision("auto", bf16=False, fp16=False)
    assert chosen.dtype == expected and chosen.mixed == ("bf16" if expected == "bfloat16" else "fp16")
    assert chosen.replaced is None  # CUDA runs what was asked, no fallback
    assert training_precision("float16", bf16=False, fp16=True) == Precision("float16", "fp16")


def test_prediction_on_cuda_takes_the_stored_dtype_of_a_model_without_a_record(cuda, tmp_path):
    """A merged or base model: on CUDA the dtype its config says it is stored in (not float32, twice the memory);
    an adapter's recorded dtype and a flag win; without CUDA (or without a config) float32."""
    (tmp_path / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    assert inference_dtype("auto", None, str(tmp_path)) == "float32"
    cuda(bf16=True)
    assert inference_dtype("auto", None, str(tmp_path)) == "bfloat16"
    assert inference_dtype("auto", "float32", str(tmp_path)) == "float32"
    assert inference_dtype("float16", None, str(tmp_path)) == "float16"
    assert inference_dtype("auto", None, str(tmp_path / "no-such-model")) == "float32"


def modules_to_save_model():
    """A half-precision model with a frozen layer and a trained one, as PEFT's modules_to_save leaves it."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).half()
    model[0].requires_grad_(False)
    return model


def test_under_fp16_the_trained_parameters_are_float32_and_the_frozen_ones_stay():
    """The GradScaler unscales float32 gradients only: fp16 weights that train stop the first step."""
    model = modules_to_save_model()
    assert keep_trainable_in_float32(model, Precision("float16", "fp16"), deepspeed=False) == 2  # weight and bias
    assert [p.dtype for p in model[1].parameters()] == [torch.float32] * 2
    assert [p.dtype for p in model[0].parameters()] == [torch.float16] * 2
    assert keep_trainable_in_float32(model, Precision("float16", "fp16"), deepspeed=False) == 0  # done once


@pytest.mark.parametrize("mixed, deepspeed", [("bf16", False), (None, False), ("fp16", True)])
def test_other_precisions_and_deepspeed_keep_the_trained_dtype(mixed, deepspeed):
    """bf16 needs no scaler; DeepSpeed keeps float32 master weights of its own."""
    model = modules_to_save_model()
    assert keep_trainable_in_float32(model, Precision("float16", mixed), deepspeed) == 0
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def scaler_step(model) -> None:
    """One fp16 step as the Trainer takes it under --fp16: autocast, then torch's GradScaler (accelerate's)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(torch.randn(2, 4, dtype=torch.float16)).float().square().mean()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    scaler.step(optimizer)


def test_the_gradient_scaler_steps_once_the_trained_parameters_are_float32():
    """The failure the rule exists for, with the real scaler: fp16 weights that train stop the first step."""
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler_step(modules_to_save_model())
    model = modules_to_save_model()
    keep_trainable_in_float32(model, Precision("float16", "fp16"), deepspeed=False)
    before = model[1].weight.detach().clone()
    scaler_step(model)
    assert not torch.equal(model[1].weight, before)


def test_a_gpu_runs_precision_is_decided_without_one():
    """The memory estimate of a GPU run made on a CPU: --fp16 stays fp16 (a GPU computes it), a half dtype stays."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    on_gpu = precision.training_precision("auto", bf16=False, fp16=True, cuda=True)
    assert (on_gpu.dtype, on_gpu.mixed) == ("float16", "fp16")
    assert precision.training_precision("auto", bf16=False, fp16=False, cuda=True).mixed == "bf16"
    assert precision.runnable_dtype("float16", cuda=True) == "float16"
