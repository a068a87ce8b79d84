"""fora/train/checkpoints.py: runs that are killed, fail to save, diverge, or run many times: checkpoints stay whole
and resumable.

The reference is one uninterrupted 6-step run (checkpoints at 2, 4, 6); every interrupted run here
must end with the same adapter, step count and per-step losses.
"""

import ctypes
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
from safetensors.torch import load_file
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from fora.errors import UserError, exit_on_user_error
from fora.infer import predict as predict_fora
from fora.train import checkpoints as checkpoint_module
from fora.train import recipe as train_lora
from fora.train.checkpoints import last_checkpoint
from support import REPO

ONE_THREAD = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # the in-process runs use one thread too
STEPS = 6
# Measured: RSS grows 5 MiB from the first train + predict run to the third (allocator drift; the Python
# heap grows < 0.1 MiB), while keeping each run's trainer alive adds 57 MiB. 16 MiB is three times the
# drift and well under that leak.
RSS_TOLERANCE = 16 << 20
# Run train_lora.py as `python train_lora.py ARGS` does, but hang in the save of checkpoint-STEP once
# its model and optimizer are written (its scheduler, RNG and trainer state are not), and say so.
HANG_IN_SAVE = """
import runpy, sys, time
from pathlib import Path
from transformers import Trainer

marker, step = Path(sys.argv[1]), int(sys.argv[2])
save_optimizer = Trainer._save_optimizer_and_scheduler

def save_optimizer_then_hang(self, output_dir):
    save_optimizer(self, output_dir)
    if self.state.global_step == step:
        marker.write_text(output_dir)
        time.sleep(3600)

Trainer._save_optimizer_and_scheduler = save_optimizer_then_hang
sys.argv = ["train_lora.py", *sys.argv[3:]]
runpy.run_path("train_lora.py", run_name="__main__")
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def flags(model, cache, out, *extra) -> list[str]:
    return [
        "--model_name_or_path", str(model), "--train_file", str(REPO / "data" / "train.json"),
        "--output_dir", str(out), "--cache_dir", str(cache), "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-3", "--max_steps", str(STEPS), "--save_steps", "2", "--logging_steps", "1",
        "--seed", "7", "--report_to", "none", *extra,
    ]


def train(model, cache, out, *extra) -> None:
    """train_lora.main in this process (later flags override earlier ones)."""
    train_lora.main(flags(model, cache, out, *extra))


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    train(tiny_model, cache, out)
    return out


def step_losses(out) -> list[tuple[int, float]]:
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [(entry["step"], entry["loss"]) for entry in state["log_history"] if "loss" in entry]


def checkpoints(out) -> list[str]:
    """Checkpoint folders, finished or not."""
    return sorted(p.name for p in out.iterdir() if "checkpoint-" in p.name)


def assert_same_as_uninterrupted(out, reference) -> None:
    """Same adapter (within 1e-6), same step count, one loss per step 1..N equal to the reference's."""
    weights, expected = load_file(str(out / "adapter_model.safetensors")), load_file(str(reference / "adapter_model.safetensors"))
    assert weights.keys() == expected.keys()
    diff = max((weights[k] - expected[k]).abs().max().item() for k in expected)
    assert diff < 1e-6
    assert json.loads((out / "train_results.json").read_text())["global_step"] == STEPS
    losses, expected_losses = step_losses(out), step_losses(reference)
    assert [step for step, _ in losses] == list(range(1, STEPS + 1))  # no gap, no step twice
    assert max(abs(a - b) for (_, a), (_, b) in zip(losses, expected_losses)) < 1e-6
    assert not list(out.glob(".tmp-*"))
    print(f"{out.name}: max abs adapter difference from the uninterrupted run {diff:.3g}")


@pytest.mark.slow
def test_killed_mid_save_then_resumed_ends_as_the_uninterrupted_run(tmp_path, tiny_model, cache, uninterrupted, capsys):
    killed, marker, log = tmp_path / "killed", tmp_path / "hanging", tmp_path / "killed.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-c", HANG_IN_SAVE, str(marker), "4", *flags(tiny_model, cache, killed)],
            cwd=REPO, env={**os.environ, **ONE_THREAD}, stdout=output, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 600  # a guard against hanging forever, not a timing assertion
    while not marker.exists():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the run never reached the save of checkpoint-4"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL

    # checkpoint-2 is whole; checkpoint-4 was cut short in its staging folder, which nothing takes for a checkpoint.
    assert checkpoints(killed) == [".tmp-checkpoint-4", "checkpoint-2"]
    assert (killed / ".tmp-checkpoint-4" / "checkpoint-4" / "optimizer.pt").is_file()
    assert not (killed / "adapter_model.safetensors").exists()
    assert last_checkpoint(killed) == get_last_checkpoint(str(killed)) == str(killed / "checkpoint-2")
    with pytest.raises(UserError, match="incomplete checkpoint"):
        train(tiny_model, cache, killed, "--resume_from_checkpoint", str(killed / ".tmp-checkpoint-4" / "checkpoint-4"))

    for how in ("explicit", "auto"):
        out = tmp_path / how
        shutil.copytree(killed, out)
        train(tiny_model, cache, out, "--resume_from_checkpoint", str(out / "checkpoint-2") if how == "explicit" else "auto")
        assert f"Resuming from {out / 'checkpoint-2'}" in capsys.readouterr().out
        assert_same_as_uninterrupted(out, uninterrupted)
        assert checkpoints(out) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def test_a_failed_save_leaves_the_previous_checkpoint_to_resume_from(tmp_path, tiny_model, cache, uninterrupted, monkeypatch):
    def disk_full_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise OSError(28, "No space left on device (injected)")
        save_optimizer(self, output_dir)

    save_optimizer = Trainer._save_optimizer_and_scheduler
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", disk_full_at_step_4)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="injected"):
        train(tiny_model, cache, out)
    assert checkpoints(out) == ["checkpoint-2"]  # no checkpoint-4, and its staging folder is gone
    assert not (out / "adapter_model.safetensors").exists()

    monkeypatch.undo()
    train(tiny_model, cache, out, "--resume_from_checkpoint", "auto")
    assert_same_as_uninterrupted(out, uninterrupted)


def test_a_failed_final_save_keeps_the_adapter_that_was_there(tmp_path, tiny_model, cache, monkeypatch):
    out = tmp_path / "out"
    train(tiny_model, cache, out, "--max_steps", "1", "--save_strategy", "no")
    adapter = {name: (out / name).read_bytes() for name in ("adapter_model.safetensors", "adapter_config.json")}

    def write_then_fail(model, folder, initial_adapter=None):
        save(model, folder, initial_adapter)  # every file written, then the disk is full
        raise OSError(28, "No space left on device (injected)")

    save = checkpoint_module.save_trained
    monkeypatch.setattr(checkpoint_module, "save_trained", write_then_fail)
    with pytest.raises(OSError, match="injected"):
        train(tiny_model, cache, out, "--max_steps", "2", "--save_strategy", "no", "--overwrite_output_dir")
    assert {name: (out / name).read_bytes() for name in adapter} == adapter
    assert not list(out.glob(".tmp-*"))


def test_save_total_limit_keeps_the_checkpoint_resumed_from_and_the_best(tmp_path, tiny_model, cache, uninterrupted):
    resumed = tmp_path / "resumed"
    shutil.copytree(uninterrupted / "checkpoint-2", resumed / "checkpoint-2")
    train(tiny_model, cache, resumed, "--resume_from_checkpoint", str(resumed / "checkpoint-2"), "--save_total_limit", "1")
    assert checkpoints(resumed) == ["checkpoint-2", "checkpoint-6"]

    # Eval loss falls from step to step; taking the highest for best makes the best the oldest checkpoint.
    best, validation = tmp_path / "best", tmp_path / "validation.json"
    validation.write_text("".join((REPO / "data" / "test.json").read_text(encoding="utf-8").splitlines(True)[:8]), encoding="utf-8")
    train(tiny_model, cache, best, "--save_total_limit", "1", "--validation_file", str(validation),
          "--eval_steps", "2", "--metric_for_best_model", "eval_loss", "--greater_is_better", "True")
    state = json.loads((best / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == str(best / "checkpoint-2")
    assert checkpoints(best) == ["checkpoint-2", "checkpoint-6"]


@pytest.mark.parametrize(
    "save_flags, bad_step, kept",
    [
        # lr 1e20: step 2's gradients are NaN, its loss finite, its update NaN: the save of step 2 refuses.
        (["--save_steps", "1"], 2, ["checkpoint-1"]),
        # No saves: step 3's NaN loss stops the run when it is logged.
        (["--save_strategy", "no"], 3, []),
    ],
    ids=["at-save", "at-log"],
)
def test_a_diverging_run_stops_at_the_step_and_saves_nothing_after_it(tmp_path, tiny_model, cache, capsys, save_flags, bad_step, kept):
    out = tmp_path / "out"
    argv = flags(tiny_model, cache, out, "--use_lora", "False", "--learning_rate", "1e20", *save_flags)
    with pytest.raises(SystemExit) as stopped:
        exit_on_user_error(lambda: train_lora.main(argv))
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error: " in line]  # on a line of its own, not after the progress bar
    assert len(errors) == 1 and errors[0].startswith(f"error: step {bad_step}: training diverged") and "Traceback" not in err
    assert checkpoints(out) == kept
    assert not (out / "model.safetensors").exists() and not (out / "train_results.json").exists()
    for name in kept:
        assert all(w.isfinite().all() for w in load_file(str(out / name / "model.safetensors")).values())


@pytest.mark.slow
def test_soak_three_trainings_and_predictions_leave_nothing_behind(tmp_path, tiny_model, cache, monkeypatch):
    """In-process, as a notebook or a sweep runs them: no child processes, temporary files or memory left per run."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    me = psutil.Process()
    children, trainers = {child.pid for child in me.children(recursive=True)}, live(Trainer)
    rss = []
    for run in range(3):
        out = tmp_path / f"run{run}"
        train(tiny_model, cache, out, "--save_total_limit", "1")
        predict_fora.main(["--model_dir", str(out), "--test_path", str(REPO / "data" / "test.json"), "--max_samples", "8",
                           "--max_new_tokens", "8", "--output_dir", str(out / "predictions")])
        rss.append(settled_rss(me))
        assert checkpoints(out) == [f"checkpoint-{STEPS}"]  # --save_total_limit 1 pruned the older two
        assert not [p for p in out.rglob("*") if p.name.startswith(".tmp")]
    print(f"RSS after each train + predict run: {[round(r / 2**20, 1) for r in rss]} MiB")
    assert {child.pid for child in me.children(recursive=True)} <= children
    assert {p.name for p in scratch.iterdir()} <= {"jieba.cache"}  # jieba's dictionary cache: written once, then reused
    assert not [p for p in cache.iterdir() if ".tmp" in p.name]
    assert live(Trainer) == trainers
    assert rss[2] - rss[0] < RSS_TOLERANCE


def live(kind) -> int:
    gc.collect()
    return sum(isinstance(o, kind) for o in gc.get_objects())


def settled_rss(process) -> int:
    """RSS once garbage is collected and glibc has returned its free pages (without that, ±50 MiB of noise)."""
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)
    return process.memory_info().rss


@pytest.mark.slow
def test_two_concurrent_runs_match_a_solo_run(tmp_path, tiny_model, cache, uninterrupted):
    """Two real processes into two output folders at once (sharing the tokenized cache the solo run built)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, **ONE_THREAD, "TMPDIR": str(scratch)}
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in ("a", "b")}
    runs = {
        name: subprocess.Popen([sys.executable, "train_lora.py", *flags(tiny_model, cache, tmp_path / name)],
                               cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        for name, log in logs.items()
    }
    for name, run in runs.items():
        assert run.wait(timeout=600) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
        logs[name].close()
    for name in runs:
        assert_same_as_uninterrupted(tmp_path / name, uninterrupted)
    assert not list(scratch.iterdir())


# --- DeepSpeed ZeRO-1/2: the saving rank writes what trains -------------------------------------------


@pytest.mark.parametrize("internal", [False, True], ids=["final", "checkpoint"])
def test_a_deepspeed_save_writes_only_the_adapter_without_gathering_the_whole_state(tmp_path, tiny_model, monkeypatch, internal):
    """Under ZeRO-1/2 the Trainer's own save first copies the whole state dict, frozen base included, into host
    memory on every rank (accelerate's get_state_dict); here the model writes its trainable tensors itself."""
    import torch

    from fora.args import TrainArguments
    from fora.train.trainer import SupervisedTrainer
    from support import adapted_model

    model = adapted_model(tiny_model)
    trainer = SupervisedTrainer(model=model, args=TrainArguments(output_dir=str(tmp_path / "run"), report_to="none"))
    trainer.is_deepspeed_enabled = True  # as Trainer sets it for a run with --deepspeed (ZeRO-2: not stage 3)
    monkeypatch.setattr(trainer.accelerator, "get_state_dict", lambda *a, **k: pytest.fail("the whole state was gathered"))
    out = tmp_path / "saved"
    trainer.save_model(str(out), _internal_call=internal)
    assert (out / "adapter_model.safetensors").is_file() and not list(out.glob("model*.safetensors"))
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert len(saved) == len(trained) > 0
    for name, tensor in saved.items():  # PEFT's saved names drop the adapter's name
        torch.testing.assert_close(tensor, model.get_parameter(name.replace(".weight", ".default.weight")))


def test_deepspeeds_fp16_optimizer_states_pass_the_resume_check(tmp_path):
    """A ZeRO-2 optimizer file of an fp16 run, shaped as DeepSpeed writes it: its dynamic loss scaler, ZeRO stage
    and fragment addresses besides tensors. (The CPU runs of the suite train in bf16 or float32: no scaler.)"""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    checkpoint = tmp_path / "checkpoint-5"
    (checkpoint / "global_step5").mkdir(parents=True)
    (checkpoint / "latest").write_text("global_step5")
    states = {
        "optimizer_state_dict": {
            "loss_scaler": DynamicLossScaler(init_scale=2**16, scale_window=1000, min_scale=1, delayed_shift=2,
                                             consecutive_hysteresis=False, raise_error_at_min_scale=True),
            "dynamic_loss_scale": True, "overflow": False, "zero_stage": ZeroStageEnum.gradients,
            "base_optimizer_state": [{"exp_avg": torch.zeros(8), "exp_avg_sq": torch.zeros(8), "step": torch.tensor(5.0)}],
            "single_partition_of_fp32_groups": [torch.zeros(8)],
        },
        "param_slice_mappings": [{"lora_A": fragment_address(numel=8, start=0)}],
        "ds_version": "0.19.8",
    }
    torch.save(states, checkpoint / "global_step5" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    checkpoint_module.check_checkpoint_holds_only_data(checkpoint)
