"""fora/federated/simulation.py (train_federated.py): real simulations whose adapters predict and merge; bad input before Flower."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from fora.federated.run import adapter_state
from fora.models.load import load_model
from fora.tuners.attach import attach_adapter
from support import FLOWER_ENV, ONE_THREAD, PYTHON, run_script, train_records, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_two_clients_two_rounds_lower_the_eval_loss_and_save_an_adapter_per_round(federated_run):
    out, *_ = federated_run
    history = json.loads((out / "federated_history.json").read_text())
    rounds = history["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[2]["eval_loss"] < rounds[0]["eval_loss"]
    assert [c["client"] for c in rounds[1]["clients"]] == [0, 1] and rounds[2]["dropped"] == []
    assert sum(c["num_examples"] for c in rounds[1]["clients"]) == 24
    for folder in (out / "round-1", out / "round-2", out):
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
        assert json.loads((folder / "fora_run.json").read_text())["finetuning_type"] == "lora"
    assert json.loads((out / "round-2" / "fora_run.json").read_text())["federated"]["round"] == 2
    final, round_2, round_1 = (load_file(str(f / "adapter_model.safetensors")) for f in (out, out / "round-2", out / "round-1"))
    assert all(torch.equal(final[k], round_2[k]) for k in final)
    assert any(not torch.equal(round_1[k], round_2[k]) for k in final)
    assert (out / "federated_eval_loss.png").stat().st_size > 0
    log = federated_run[1].stdout + federated_run[1].stderr
    assert "parameters are clipped by value: 1000" in log and "central DP noise with 0.0000 stdev added" in log
    assert "is_gradient_checkpointing` is deprecated" not in log
    # no noise, no privacy: the ledger says so every round
    assert all(r["privacy"]["epsilon"] is None and r["privacy"]["delta"] == 1e-5 for r in rounds[1:])


@pytest.mark.slow
def test_only_adapter_tensors_travel(federated_run, tiny_model):
    from flwr.app import ArrayRecord
    from safetensors import safe_open

    from fora.args import FinetuningArguments

    out, *_ = federated_run
    history = json.loads((out / "federated_history.json").read_text())
    adapter = load_file(str(out / "round-2" / "adapter_model.safetensors"))
    adapter_bytes = ArrayRecord(adapter).count_bytes()
    with safe_open(str(tiny_model / "model.safetensors"), "pt") as base_file:
        base_bytes = sum(base_file.get_tensor(k).nbytes for k in base_file.keys())  # noqa: SIM118 (safe_open is no dict)
    for entry in history["rounds"][1:]:
        for client in entry["clients"]:
            assert client["download_bytes"] == client["upload_bytes"] == adapter_bytes
    assert adapter_bytes < base_bytes / 20 and history["base_model_bytes"] >= base_bytes * 0.9
    # What a client sends: the adapter's tensors by PEFT's names, no tensor of the base model.
    model = attach_adapter(load_model(str(tiny_model), torch.float32), FinetuningArguments(lora_rank=4))
    payload = adapter_state(model)
    assert set(payload) == set(adapter)
    base_names = set(model.get_base_model().state_dict())
    assert all("lora_" in name for name in payload) and not base_names & set(payload)


@pytest.mark.slow
def test_the_round_2_adapter_loads_in_predict_and_merge(federated_run, tmp_path):
    out, *_ = federated_run
    test_file = write_jsonl(tmp_path / "test.jsonl", train_records(2, start=200))
    predicted = run_script(
        PYTHON, "predict_fora.py", "--model_dir", str(out / "round-2"), "--test_path", str(test_file),
        "--output_dir", str(tmp_path / "pred"), "--max_new_tokens", "4", env=ONE_THREAD,
    )
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    results = json.loads((tmp_path / "pred" / "predict_results.json").read_text())
    assert results["model_kind"] == "adapter" and results["total"] == 2
    merged = run_script(
        PYTHON, "merge_lora.py", "--adapter", str(out / "round-2"), "--output_dir", str(tmp_path / "merged"), env=ONE_THREAD
    )
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert (tmp_path / "merged" / "config.json").is_file()


@pytest.mark.slow
def test_fora_clients_on_a_4bit_base(tmp_path, tiny_model):
    """FoRA adapters trained on 4-bit (NF4) bases at two simulated sites: the round's global adapter records
    its 4-bit base, holds FoRA's factors, and predict_fora.py loads it on that base."""
    train = write_jsonl(tmp_path / "train.jsonl", train_records(8))
    validation = write_jsonl(tmp_path / "validation.jsonl", train_records(4, start=100))
    out = tmp_path / "out"
    result = run_script(
        PYTHON, "train_federated.py", "--model_name_or_path", str(tiny_model), "--train_file", str(train),
        "--validation_file", str(validation), "--finetuning_type", "fora", "--quantization_bit", "4",
        "--num_clients", "2", "--num_rounds", "1", "--local_steps", "2", "--per_device_train_batch_size", "2",
        "--learning_rate", "5e-3", "--lora_rank", "4", "--max_source_length", "64", "--max_target_length", "16",
        "--output_dir", str(out), "--report_to", "none", timeout=420, env=FLOWER_ENV,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((out / "round-1" / "fora_run.json").read_text())
    assert (record["finetuning_type"], record["quantization_bit"]) == ("fora", 4)
    history = json.loads((out / "federated_history.json").read_text())
    assert [c["num_examples"] for c in history["rounds"][1]["clients"]] == [4, 4]
    sent = load_file(str(out / "round-1" / "adapter_model.safetensors"))
    assert len({name.rsplit(".", 2)[-2] for name in sent}) > 2 and all("lora" in name or "fora" in name for name in sent)
    predicted = run_script(
        PYTHON, "predict_fora.py", "--model_dir", str(out / "round-1"), "--test_path", str(validation),
        "--output_dir", str(tmp_path / "pred"), "--max_new_tokens", "4", env=ONE_THREAD,
    )
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert json.loads((tmp_path / "pred" / "predict_results.json").read_text())["quantization_bit"] == 4


# --- Bad input: one line, exit 2, before Flower starts -------------------------------------------


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing client file", "--client_files {tmp}/absent.json: no such file"),
        ("malformed client file", "{tmp}/bad.json: line 2: invalid JSON"),
        ("more clients than records", "3 records for --num_clients 5; every client needs at least one"),
        ("no rounds", "--num_rounds must be at least 1, got 0"),
        ("field with too few values", "the field has 1 distinct values, fewer than --num_clients 2"),
        ("schedule driven by eval loss", "--lr_scheduler_type reduce_lr_on_plateau: clients do not evaluate"),
        ("FedAvgM's rate with the adamw server", "--server_learning_rate and --server_momentum are FedAvgM's"),
        ("differential privacy with the adamw server", "differential privacy goes with --server_optimizer fedavgm"),
    ],
)
def test_bad_input_is_one_line_before_flower_starts(tmp_path, tiny_model, case, expected):
    from fora.errors import UserError
    from fora.federated import simulation as train_federated

    good = write_jsonl(tmp_path / "good.json", train_records(3))
    (tmp_path / "bad.json").write_text(json.dumps(train_records(1)[0]) + "\n{not json\n", encoding="utf-8")
    flags = {
        "missing client file": ["--partition", "files", "--client_files", f"{good},{tmp_path}/absent.json"],
        "malformed client file": ["--partition", "files", "--client_files", f"{good},{tmp_path}/bad.json"],
        "more clients than records": ["--train_file", str(good), "--num_clients", "5"],
        "no rounds": ["--train_file", str(good), "--num_rounds", "0"],
        "field with too few values": ["--train_file", str(good), "--partition", "field:instruction"],
        "schedule driven by eval loss": [
            "--train_file", str(good), "--lr_scheduler_type", "reduce_lr_on_plateau", "--eval_strategy", "steps"
        ],
        "FedAvgM's rate with the adamw server": [
            "--train_file", str(good), "--server_optimizer", "adamw", "--server_learning_rate", "2"
        ],
        "differential privacy with the adamw server": [
            "--train_file", str(good), "--server_optimizer", "adamw", "--dp_noise_multiplier", "1", "--dp_clipping_norm", "1"
        ],
    }[case]
    argv = ["--model_name_or_path", str(tiny_model), "--output_dir", str(tmp_path / "out"), "--report_to", "none", *flags]
    with pytest.raises(UserError) as error:
        train_federated.main(argv)
    assert expected.format(tmp=tmp_path) in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out" / "federated_history.json").exists()


@pytest.mark.slow
def test_a_run_in_which_no_round_produced_an_update_fails_in_one_line(tmp_path, tiny_model):
    """Every client misses a half-second --round_timeout (a real simulation): exit 2, no final adapter."""
    train = write_jsonl(tmp_path / "train.jsonl", train_records(8))
    out = tmp_path / "out"
    result = run_script(
        PYTHON, "train_federated.py", "--model_name_or_path", str(tiny_model), "--train_file", str(train),
        "--num_clients", "2", "--num_rounds", "1", "--local_steps", "1", "--round_timeout", "0.5", "--lora_rank", "4",
        "--max_source_length", "64", "--max_target_length", "32", "--output_dir", str(out), "--report_to", "none",
        timeout=300, env=FLOWER_ENV,
    )
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: no round produced an update") and "did not answer within --round_timeout" in error
    assert "Traceback" not in result.stderr
    assert not (out / "adapter_config.json").exists()


@pytest.mark.slow
def test_bad_input_exits_2_with_one_line(tmp_path, tiny_model):
    result = run_script(PYTHON, "train_federated.py", "--model_name_or_path", str(tiny_model), "--train_file",
                        "data/train.json", "--num_rounds", "0", "--output_dir", str(tmp_path / "out"), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --num_rounds must be at least 1, got 0"]


# --- GPUs: the clients' shares and the server's own GPU (CUDA faked; the logic runs on any machine) ------------


@pytest.mark.parametrize("visible, count, server, clients", [
    (None, 0, None, []),                          # no GPU: everyone on the CPU
    (None, 1, None, ["0"]),                       # one GPU: the server and the clients share it
    (None, 4, "3", ["0", "1", "2"]),              # the server keeps the last GPU to itself
    ("4,5,7", 3, "7", ["4", "5"]),                # by CUDA_VISIBLE_DEVICES's own names
])
def test_the_servers_copy_takes_its_own_gpu_before_cuda_starts(monkeypatch, visible, count, server, clients):
    from fora.federated import simulation

    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    seen_at_init = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "init", lambda: seen_at_init.append(os.environ["CUDA_VISIBLE_DEVICES"]))
    assert simulation.place_server_on_its_own_gpu() == clients
    assert seen_at_init == ([server] if server else [])  # this process's CUDA sees the server's GPU alone
    if server:  # what Ray, started afterwards in this process, is shown for the clients
        assert os.environ["CUDA_VISIBLE_DEVICES"] == ",".join(clients)


@pytest.mark.parametrize("flags, gpus, share", [([], [], 0.0), ([], ["0", "1"], 1.0), (["--client_gpus", "0.25"], ["0"], 0.25)])
def test_each_simulated_client_reserves_its_gpu_share(monkeypatch, tmp_path, flags, gpus, share):
    import flwr.simulation

    from fora.federated import simulation
    from fora.federated.run import parse

    captured = {}
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kwargs: captured.update(kwargs))
    run = parse(["--output_dir", str(tmp_path), "--num_clients", "3", *flags])
    simulation.simulate(run, [], gpus)
    assert captured["backend_config"]["client_resources"] == {"num_cpus": 1.0, "num_gpus": share}
    assert captured["backend_config"]["init_args"] == {"num_gpus": len(gpus)}
    with pytest.raises(simulation.UserError, match="--client_gpus 0.5: no GPU is visible"):
        simulation.simulate(parse(["--output_dir", str(tmp_path), "--client_gpus", "0.5"]), [], [])


@pytest.mark.slow
def test_a_client_that_raises_in_a_live_simulation_is_named_and_the_round_goes_on(tmp_path, tiny_model):
    """Client 1's file passes the checks before Flower starts but its tokenizing raises inside the running
    simulation (two of its three answers are empty): the round goes on with client 0 (--min_fit_clients 1),
    the history and the log name client 1 and its error, and the run saves its adapter."""
    good = write_jsonl(tmp_path / "good.jsonl", train_records(6))
    mostly_empty = write_jsonl(tmp_path / "mostly_empty.jsonl",
                               [{**r, "output": ""} if i else r for i, r in enumerate(train_records(3, start=20))])
    out = tmp_path / "out"
    result = run_script(
        PYTHON, "train_federated.py", "--model_name_or_path", str(tiny_model), "--partition", "files",
        "--client_files", f"{good},{mostly_empty}", "--min_fit_clients", "1", "--num_rounds", "1", "--local_steps", "1",
        "--per_device_train_batch_size", "2", "--lora_rank", "4", "--max_source_length", "64", "--max_target_length", "16",
        "--output_dir", str(out), "--report_to", "none", timeout=420, env=FLOWER_ENV,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    (entry,) = json.loads((out / "federated_history.json").read_text())["rounds"][1:]
    assert [c["client"] for c in entry["clients"]] == [0]
    (dropped,) = entry["dropped"]
    assert dropped.startswith("client 1 failed: UserError: ") and "2 of 3 records have an empty response" in dropped
    assert f"round 1: {dropped}" in log
    assert (out / "adapter_model.safetensors").is_file()
    assert "is_gradient_checkpointing` is deprecated" not in log
