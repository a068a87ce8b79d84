"""fora/federated/resume.py: a federated run killed after round 2 of 4 and resumed ends where the whole run ends."""

import json
import os
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from support import FLOWER_ENV, PYTHON, REPO, run_script, train_records, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def kill_session(process: subprocess.Popen) -> None:
    """SIGKILL the process and everything in its session (Ray's workers and daemons), as a crash would."""
    import psutil

    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and os.getsid(proc.pid) == process.pid:
                proc.kill()
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            pass
    process.wait(timeout=30)


@pytest.mark.slow
def test_a_run_killed_after_round_2_of_4_and_resumed_ends_as_the_whole_run(tmp_path, tiny_model):
    """The AdamW server (its moments and cosine schedule are part of what is saved), 2 clients x 4 rounds:
    the whole run, then the same run killed once round 2 is saved whole and resumed with auto."""
    train = write_jsonl(tmp_path / "train.jsonl", train_records(16))
    validation = write_jsonl(tmp_path / "validation.jsonl", train_records(4, start=100))

    def flags(out):
        return ["train_federated.py", "--model_name_or_path", str(tiny_model), "--train_file", str(train),
                "--validation_file", str(validation), "--num_clients", "2", "--num_rounds", "4", "--local_steps", "2",
                "--per_device_train_batch_size", "2", "--server_optimizer", "adamw", "--client_learning_rate", "0.1",
                "--learning_rate", "5e-3", "--lr_scheduler_type", "cosine", "--lora_rank", "4", "--max_source_length", "64",
                "--max_target_length", "32", "--torch_dtype", "float32", "--output_dir", str(out), "--report_to", "none"]

    whole = run_script(PYTHON, *flags(tmp_path / "whole"), timeout=600, env=FLOWER_ENV)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]

    out = tmp_path / "stopped"
    with open(tmp_path / "stopped.log", "w") as log:
        stopped = subprocess.Popen([PYTHON, *flags(out)], cwd=REPO, env={**os.environ, **FLOWER_ENV, "PYTHONUNBUFFERED": "1"},
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not (out / "round-2" / "server_state.json").is_file():
            assert stopped.poll() is None and time.monotonic() < deadline, (tmp_path / "stopped.log").read_text()[-3000:]
            time.sleep(0.2)
    finally:
        kill_session(stopped)
    assert not (out / "round-4").exists()

    resumed = run_script(PYTHON, *flags(out), "--resume_from_round", "auto", timeout=600, env=FLOWER_ENV)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Resuming after round 2 of 4" in resumed.stdout + resumed.stderr
    expected, got = (load_file(str(folder / "adapter_model.safetensors")) for folder in (tmp_path / "whole", out))
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)
    rounds = [json.loads((folder / "federated_history.json").read_text())["rounds"] for folder in (tmp_path / "whole", out)]
    assert [r["round"] for r in rounds[1]] == [0, 1, 2, 3, 4]
    assert [r["eval_loss"] for r in rounds[1]] == pytest.approx([r["eval_loss"] for r in rounds[0]], rel=1e-4)


def test_resume_names_what_is_missing_in_one_line(tmp_path):
    from fora.errors import UserError
    from fora.federated.resume import STATE_JSON, round_to_resume

    def error(wanted: str, num_rounds: int = 4) -> str:
        with pytest.raises(UserError) as raised:
            round_to_resume(tmp_path, wanted, num_rounds)
        assert "\n" not in str(raised.value)
        return str(raised.value)

    assert "holds no round saved whole" in error("auto")
    for server_round in (1, 2, 3):
        (tmp_path / f"round-{server_round}").mkdir()
    for server_round in (1, 2):
        (tmp_path / f"round-{server_round}" / STATE_JSON).write_text("{}")
    assert round_to_resume(tmp_path, "auto", 4) == 2  # round 3 was not saved whole
    assert round_to_resume(tmp_path, "1", 4) == 1
    assert "round-3/server_state.json is missing (rounds saved whole: 1, 2)" in error("3")
    assert "round 2 is the run's last" in error("auto", num_rounds=2)


def test_the_server_adamw_state_comes_back_whole(tmp_path):
    """Two AdamW steps, the state saved and loaded into a fresh optimizer: its third step equals the original's."""
    from fora.args import FederatedArguments, TrainArguments
    from fora.federated.strategy import ServerAdamW
    from support import random_states

    training = TrainArguments(output_dir=str(tmp_path), report_to="none", learning_rate=0.1, lr_scheduler_type="cosine")
    fed = FederatedArguments(num_rounds=4, server_optimizer="adamw")
    start, *means = random_states(4)
    original = ServerAdamW(training, fed, start)
    sent = original.step(start, means[0])
    sent = original.step(sent, means[1])
    moments, saved = original.state()
    copy = ServerAdamW(training, fed, start)
    copy.load({name: value.clone() for name, value in moments.items()}, json.loads(json.dumps(saved)))  # as saved
    expected, got = original.step(sent, means[2]), copy.step(sent, means[2])
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])
