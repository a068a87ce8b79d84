"""fora/precision.py: the precision chosen for the machine, and the one-line fallback without CUDA."""

import pytest
import torch

from fora import precision
from fora.args import DataArguments, FinetuningArguments, ModelArguments, TrainArguments, parse_args
from fora.precision import cpu_has_bf16
from support import parse_flags

pytestmark = pytest.mark.usefixtures("keep_environment")


# --- precision on a CPU without CUDA --------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback applies without CUDA")
def test_fp16_falls_back_with_one_warning_line(out, capfd):
    model, _, _, training = parse_flags(out, "--fp16", "--torch_dtype", "float16")
    training.precision.report()
    dtype = training.precision.torch_dtype
    cpu_half = "bfloat16" if cpu_has_bf16() else "float32"
    assert dtype == getattr(torch, cpu_half) and not training.fp16
    assert training.bf16 == cpu_has_bf16()
    captured = capfd.readouterr()
    assert captured.err.splitlines() == [f"warning: no CUDA here; --fp16 and --torch_dtype float16 -> {cpu_half} on this CPU"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback applies without CUDA")
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


def test_a_gpu_runs_precision_is_decided_without_one():
    """The memory estimate of a GPU run made on a CPU: --fp16 stays fp16 (a GPU computes it), a half dtype stays."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    on_gpu = precision.training_precision("auto", bf16=False, fp16=True, cuda=True)
    assert (on_gpu.dtype, on_gpu.mixed) == ("float16", "fp16")
    assert precision.training_precision("auto", bf16=False, fp16=False, cuda=True).mixed == "bf16"
    assert precision.runnable_dtype("float16", cuda=True) == "float16"
