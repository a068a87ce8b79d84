"""fora/memory/decide.py: what the estimate decides. The largest batch and the cheapest change; --gradient_checkpointing
auto through the training entry point with the available memory set low (FORA_AVAILABLE_MEMORY); an out-of-memory
error in training as one line, by injection."""

import re
import sys

import pytest

from fora.errors import UserError
from fora.memory.decide import cheapest_change, fits, gradient_checkpointing, largest_batch, out_of_memory_line
from fora.memory.device import AVAILABLE_MEMORY_VARIABLE
from fora.memory.estimate import estimate, with_changes
from support import ONE_THREAD

pytestmark = pytest.mark.usefixtures("keep_environment")
CPU_OUT_OF_MEMORY = "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes"


@pytest.fixture
def gpu_run(run_setting):
    """A GPU run of the tiny model, batch 8 x 512, checkpointing off: its estimate does not depend on this process."""
    return run_setting("--device", "cuda", "--per_device_train_batch_size", "8", "--max_source_length", "256",
                       "--max_target_length", "256", "--gradient_checkpointing", "false")


def test_largest_batch_is_the_boundary_of_fits(gpu_run):
    memory = estimate(gpu_run).total
    batch = largest_batch(gpu_run, memory)
    assert batch == 8 or fits(with_changes(gpu_run, batch=batch), memory) and not fits(with_changes(gpu_run, batch=batch + 1), memory)
    assert largest_batch(gpu_run, 1) == 0


def test_the_cheapest_change_comes_first_and_combines(gpu_run):
    with_checkpointing = estimate(with_changes(gpu_run, checkpointing=True)).total
    assert cheapest_change(gpu_run, with_checkpointing, quantizable=True).flags == "--gradient_checkpointing true"
    one_row = with_changes(gpu_run, checkpointing=True, batch=1, accumulation=8)
    change = cheapest_change(gpu_run, estimate(one_row).total, quantizable=True)
    assert change.flags == ("--gradient_checkpointing true --per_device_train_batch_size 1 --gradient_accumulation_steps 8")
    assert change.why == "all of these together" and change.total == estimate(one_row).total
    assert cheapest_change(gpu_run, 1, quantizable=True) is None


def test_auto_checkpointing_follows_the_available_memory(gpu_run, monkeypatch):
    logged = []
    monkeypatch.setenv(AVAILABLE_MEMORY_VARIABLE, "1MB")
    assert gradient_checkpointing(gpu_run, logged.append) is True
    monkeypatch.setenv(AVAILABLE_MEMORY_VARIABLE, "1TB")
    assert gradient_checkpointing(gpu_run, logged.append) is False
    assert re.fullmatch(r"Gradient checkpointing: on \(auto\): the run's estimate without it, [0-9.]+ GiB, exceeds the 0\.00 GiB "
                        rf"of {AVAILABLE_MEMORY_VARIABLE}=1MB \(with it: [0-9.]+ GiB\)", logged[0])
    assert re.fullmatch(rf"Gradient checkpointing: off \(auto\): the run's estimate, [0-9.]+ GiB, fits the 1024\.00 GiB of "
                        rf"{AVAILABLE_MEMORY_VARIABLE}=1TB", logged[1])


def test_auto_never_checkpoints_prefix_tuning_and_says_why(gpu_run, monkeypatch):
    logged = []
    monkeypatch.setenv(AVAILABLE_MEMORY_VARIABLE, "1MB")
    assert gradient_checkpointing(with_changes(gpu_run, method="prefix"), logged.append) is False
    assert logged[0].startswith("Gradient checkpointing: off (auto): prefix tuning cannot checkpoint, though the run's estimate")


def test_the_out_of_memory_line_names_estimate_memory_and_change(gpu_run, monkeypatch):
    monkeypatch.setenv(AVAILABLE_MEMORY_VARIABLE, str(estimate(with_changes(gpu_run, checkpointing=True)).total))
    line = out_of_memory_line(gpu_run, "while training", quantizable=True)
    assert re.fullmatch(rf"out of memory while training: the run's estimate is [0-9.]+ GiB and {AVAILABLE_MEMORY_VARIABLE}=\d+ was "
                        r"[0-9.]+ GiB; try --gradient_checkpointing true \(recomputes activations in backward: [0-9.]+ GiB\) "
                        r"\(estimate_memory.py with the same flags shows every line\)", line)


def train(tiny_model, tmp_path, *extra):
    from fora.train.recipe import main

    main(["--model_name_or_path", str(tiny_model), "--train_file", "data/train.json", "--output_dir", str(tmp_path / "out"),
          "--cache_dir", str(tmp_path / "cache"), "--per_device_train_batch_size", "2", "--max_steps", "1",
          "--save_strategy", "no", "--report_to", "none", *extra])


@pytest.fixture
def checkpointing_calls(monkeypatch):
    """Every time the Trainer turns activation checkpointing on in a model."""
    from transformers import PreTrainedModel

    calls, enable = [], PreTrainedModel.activation_checkpointing_enable

    def recorded(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return enable(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "activation_checkpointing_enable", recorded)
    for name, value in ONE_THREAD.items():
        monkeypatch.setenv(name, value)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("available, forced, on", [("1MB", None, True), ("1TB", None, False), ("1MB", "false", False),
                                                   ("1TB", "true", True)])
def test_training_turns_checkpointing_on_when_memory_is_short(tiny_model, tmp_path, monkeypatch, capsys, checkpointing_calls,
                                                              available, forced, on):
    """Through the training entry point: auto decides from FORA_AVAILABLE_MEMORY and says so; true / false force it."""
    monkeypatch.setenv(AVAILABLE_MEMORY_VARIABLE, available)
    train(tiny_model, tmp_path, *(["--gradient_checkpointing", forced] if forced else []))
    printed = capsys.readouterr().out
    said = [line for line in printed.splitlines() if line.startswith("Gradient checkpointing:")]
    assert said == ([f"Gradient checkpointing: {'on' if on else 'off'} (auto): " + said[0].split("(auto): ", 1)[1]] if not forced
                    else [])
    assert bool(checkpointing_calls) == on


def test_out_of_memory_in_training_is_one_line(tiny_model, tmp_path, monkeypatch, capsys, checkpointing_calls):
    """An allocation failure in a training step, injected: train_lora.py's door ends with exit code 2 and one line."""
    from fora import cli
    from fora.train.trainer import SupervisedTrainer

    def no_memory(*args, **kwargs):
        raise RuntimeError(CPU_OUT_OF_MEMORY)

    monkeypatch.setattr(SupervisedTrainer, "compute_loss", no_memory)
    monkeypatch.setenv(AVAILABLE_MEMORY_VARIABLE, "2GB")
    monkeypatch.setattr(sys, "argv", ["train_lora.py", "--model_name_or_path", str(tiny_model), "--train_file", "data/train.json",
                                      "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"),
                                      "--per_device_train_batch_size", "4", "--max_steps", "1", "--report_to", "none"])
    with pytest.raises(SystemExit) as stopped:
        cli.train()
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    error = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(error) == 1
    assert re.fullmatch(rf"error: out of memory while training: the run's estimate is [0-9.]+ GiB and {AVAILABLE_MEMORY_VARIABLE}=2GB "
                        r"was [0-9.]+ GiB; try --gradient_checkpointing true \(recomputes activations in backward: [0-9.]+ GiB\) "
                        r"\(estimate_memory.py with the same flags shows every line\)", error[-1])


def test_other_errors_in_training_pass(tiny_model, tmp_path, monkeypatch, checkpointing_calls):
    from fora.train.trainer import SupervisedTrainer

    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(SupervisedTrainer, "compute_loss", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        train(tiny_model, tmp_path)


def test_a_run_without_an_estimate_still_gets_one_line():
    assert out_of_memory_line(None, "while training", quantizable=True) == (
        "out of memory while training; estimate the run with estimate_memory.py (the same flags) to see what fits")
    with pytest.raises(UserError):
        raise UserError(out_of_memory_line(None, "x", False))
