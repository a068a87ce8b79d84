"""fora/train/recipe.py (train_lora.py's body): overwriting a run starts clean, and a test split is not training data."""

import json

import pytest

from support import train_script, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_overwrite_output_dir_removes_the_previous_runs_checkpoints(tmp_path, tiny_model):
    out, first = train_script(tmp_path, tiny_model, "run", "--max_steps", "3", "--save_steps", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]

    # A typo in the new run's flags loses nothing: the old run is removed only once data and model have loaded.
    _, typo = train_script(tmp_path, tiny_model, "run", "--max_steps", "1", "--overwrite_output_dir", "--train_file", "nope.json")
    assert typo.returncode == 2 and len(list(out.glob("checkpoint-*"))) == 3

    removable = 3 + (out / "runs").is_dir()  # the checkpoints and the TensorBoard folder, if any
    adapter = (out / "adapter_model.safetensors").read_bytes()
    _, second = train_script(tmp_path, tiny_model, "run", "--max_steps", "1", "--save_steps", "1", "--overwrite_output_dir",
                      "--save_total_limit", "2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["max_steps"] == 1
    assert f"removed {removable} checkpoints and logs of the previous run" in second.stdout
    assert (out / "adapter_model.safetensors").read_bytes() != adapter  # replaced by the new run's, whole


# --- a test split is not training data ----------------------------------------------------------------


@pytest.mark.slow
def test_mostly_empty_responses_stop_training(tmp_path, tiny_model):
    records = [{"input": f"病历{i}", "target": ""} for i in range(8)] + [{"input": "x", "target": "y"}]
    data = write_jsonl(tmp_path / "test.json", records)
    _, result = train_script(tmp_path, tiny_model, "run", "--max_steps", "1", "--train_file", str(data))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {data}: 8 of 9 records have an empty response (a test split without references?); training on "
        "them teaches the model to answer nothing: pass --empty_response skip or error, or other data"
    )
    _, skipped = train_script(tmp_path, tiny_model, "run", "--max_steps", "1", "--train_file", str(data),
                       "--empty_response", "skip", "--save_strategy", "no")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "8 records have an empty response: left out" in skipped.stdout


def test_clearing_a_previous_run_takes_its_checkpoints_and_logs_only(tmp_path):
    from fora.train.recipe import clear_previous_run

    out = tmp_path / "out"
    for folder in ("checkpoint-1", "checkpoint-2", ".tmp-checkpoint-3", "runs/Dec06_20-00-00"):
        (out / folder).mkdir(parents=True)
        (out / folder / "optimizer.pt").write_bytes(b"state")
    (out / "adapter_model.safetensors").write_bytes(b"weights")  # replaced by the new run's own save, not here
    (out / "notes.txt").write_text("mine")
    elsewhere = tmp_path / "tensorboard"
    elsewhere.mkdir()
    assert clear_previous_run(out, elsewhere) == 3  # logs outside the output folder are left alone
    assert clear_previous_run(out, out / "runs") == 1
    assert sorted(p.name for p in out.iterdir()) == ["adapter_model.safetensors", "notes.txt"] and elsewhere.is_dir()


# --- on several GPUs ------------------------------------------------------------------------------------


def test_one_process_on_several_gpus_is_refused_in_one_line():
    """It would fall into torch's DataParallel, or on a 4-bit base run every GPU's batch on the first one."""
    from fora.errors import UserError
    from fora.train.recipe import refuse_data_parallel

    for gpus, processes in ((0, 1), (1, 1), (4, 4), (4, 2)):
        refuse_data_parallel(gpus, processes)
    with pytest.raises(UserError) as error:
        refuse_data_parallel(4, 1)
    assert str(error.value) == ("this machine has 4 GPUs and the run is one process: launch it with torchrun "
                                "--nproc_per_node 4 or deepspeed --num_gpus 4, or give it one GPU with CUDA_VISIBLE_DEVICES=0")


def test_zero_buckets_are_sized_from_what_trains():
    """ds_config.json leaves both buckets "auto": every trainable element in one bucket, never smaller than the
    largest trained tensor, at most DeepSpeed's own 5e8 elements; a number the user wrote stays."""
    import torch

    from fora.train.recipe import ZERO_BUCKET_LIMIT, size_zero_buckets
    from support import REPO

    shipped = json.loads((REPO / "ds_config.json").read_text())["zero_optimization"]
    assert shipped["reduce_bucket_size"] == shipped["allgather_bucket_size"] == "auto"

    adapter = torch.nn.Sequential(torch.nn.Linear(64, 8, bias=False), torch.nn.Linear(8, 64, bias=False), torch.nn.Linear(64, 64))
    adapter[2].requires_grad_(False)  # the frozen base
    config = {"zero_optimization": {"reduce_bucket_size": "auto", "allgather_bucket_size": 1000}}
    size_zero_buckets(config, adapter)
    assert config["zero_optimization"] == {"reduce_bucket_size": 2 * 64 * 8, "allgather_bucket_size": 1000}

    huge = torch.nn.Linear(30_000, 20_000, bias=False, device="meta")  # one tensor over DeepSpeed's default
    config = {"zero_optimization": {"reduce_bucket_size": "auto", "allgather_bucket_size": "auto"}}
    size_zero_buckets(config, huge)
    assert config["zero_optimization"]["reduce_bucket_size"] == 600_000_000 > ZERO_BUCKET_LIMIT
    two_large = torch.nn.Sequential(*[torch.nn.Linear(20_000, 20_000, bias=False, device="meta") for _ in range(2)])
    size_zero_buckets(config := {"zero_optimization": {"reduce_bucket_size": "auto"}}, two_large)
    assert config["zero_optimization"]["reduce_bucket_size"] == ZERO_BUCKET_LIMIT
