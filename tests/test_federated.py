"""Federated fine-tuning (fora/federated.py, train_federated.py): aggregation and the server step, FedProx,
dropped clients, what travels, real simulations (LoRA; FoRA on 4-bit bases; one where every client is late)
whose adapters predict_fora.py and merge_lora.py take, per-round scores, bad input, and the deployment engine."""

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ONE_THREAD, REPO, run_script, write_jsonl
from safetensors.torch import load_file

from fora.federated.run import adapter_state, parse
from fora.federated.server_app import GlobalAdapter
from fora.models.load import load_model
from fora.tuners.attach import attach_adapter

PYTHON = shutil.which("python") or "python"
pytestmark = pytest.mark.usefixtures("one_thread")
FLOWER_ENV = {**ONE_THREAD, "FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}


def train_records(count: int, start: int = 0) -> list[dict]:
    lines = (REPO / "data" / "train.json").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[start:start + count]]


# --- Aggregation and dropped clients (Flower's real Message objects, no network) ------------------


def metadata(src_node_id: int):
    from flwr.app import Metadata

    return Metadata(run_id=1, message_id="", src_node_id=src_node_id, dst_node_id=0, reply_to_message_id="m",
                    group_id="1", created_at=time.time(), ttl=60, message_type="train")


def update(node_id: int, client: int, num_examples: int, state: dict):
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    metrics = MetricRecord({"num-examples": num_examples, "train-loss": 1.0, "client": client})
    return Message(metadata=metadata(node_id), content=RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}))


def failure(node_id: int, reason: str):
    from flwr.app import Error, Message

    return Message(metadata=metadata(node_id), error=Error(code=0, reason=reason))


def random_states(count: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    shapes = {"layers.0.q_proj.lora_A.weight": (4, 16), "layers.0.q_proj.lora_B.weight": (16, 4), "layers.1.lora_A.weight": (4, 8)}
    return [{k: torch.randn(s, generator=generator) for k, s in shapes.items()} for _ in range(count)]


@pytest.fixture
def flower_log():
    """Lines Flower's logger (which the federated apps log through) wrote during the test."""
    lines = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Collect()
    logging.getLogger("flwr").addHandler(handler)
    yield lines
    logging.getLogger("flwr").removeHandler(handler)


def test_aggregation_is_the_example_weighted_mean_tensor_by_tensor():
    from fora.federated.strategy import AdapterAveraging

    states, counts = random_states(3), [5, 20, 75]
    strategy = AdapterAveraging(min_fit_clients=3, proximal_mu=0.0)
    arrays, _ = strategy.aggregate_train(1, [update(10 + i, i, n, s) for i, (n, s) in enumerate(zip(counts, states))])
    merged = arrays.to_torch_state_dict()
    assert set(merged) == set(states[0])
    for name in states[0]:
        expected = sum(n * s[name].double() for n, s in zip(counts, states)) / sum(counts)
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-6, atol=1e-7)
        # not the plain mean: the weighting matters
        assert not torch.allclose(merged[name].double(), sum(s[name].double() for s in states) / 3, atol=1e-3)
    assert [c["num_examples"] for c in strategy.rounds[1]["clients"]] == counts


class TwoNodes:  # the part of a Grid that configure_train uses
    def get_node_ids(self):
        return [10, 11]


@pytest.fixture
def stamped_messages(monkeypatch):
    """Messages built outside a running app need their run, sender and task stamped."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def test_the_server_step_follows_fedavgm(stamped_messages):
    """x_{t+1} = x_t - lr·v_t with v_t = momentum·v_{t-1} + (x_t - weighted mean of the replies), over two rounds."""
    from flwr.app import ArrayRecord, ConfigRecord

    from fora.federated.strategy import AdapterAveraging

    lr, momentum, counts = 2.5, 0.5, [3, 1]
    start, *replies = random_states(5)
    strategy = AdapterAveraging(min_fit_clients=2, proximal_mu=0.0, server_learning_rate=lr, server_momentum=momentum)
    sent, velocity = {k: v.double() for k, v in start.items()}, None
    for server_round, states in ((1, replies[:2]), (2, replies[2:])):
        list(strategy.configure_train(server_round, ArrayRecord({k: v.float() for k, v in sent.items()}), ConfigRecord(), TwoNodes()))
        arrays, _ = strategy.aggregate_train(server_round, [update(10 + i, i, n, s) for i, (n, s) in enumerate(zip(counts, states))])
        mean = {k: sum(n * s[k].double() for n, s in zip(counts, states)) / sum(counts) for k in sent}
        change = {k: sent[k] - mean[k] for k in sent}
        velocity = change if velocity is None else {k: momentum * velocity[k] + change[k] for k in sent}
        sent = {k: sent[k] - lr * velocity[k] for k in sent}
        received = arrays.to_torch_state_dict()
        for name in sent:
            torch.testing.assert_close(received[name].double(), sent[name], rtol=1e-5, atol=1e-5)
            assert not torch.allclose(received[name].double(), mean[name], atol=1e-3)  # not plain FedAvg


def test_the_adamw_server_step_is_adam_on_the_mean_change_over_the_client_rate(stamped_messages, tmp_path):
    """--server_optimizer adamw, two rounds, against Adam written out: g = (x - weighted mean) / client rate,
    clipped to --max_grad_norm over all tensors; m, v with bias correction; decoupled weight decay; the
    linear schedule over --num_rounds steps (rate, then half of it)."""
    from flwr.app import ArrayRecord, ConfigRecord

    from fora.args import FederatedArguments, TrainArguments
    from fora.federated.strategy import AdapterAveraging, ServerAdamW

    lr, client_lr, beta1, beta2, eps, decay, max_norm, counts = 0.1, 0.05, 0.8, 0.9, 1e-6, 0.01, 2.0, [3, 1]
    training = TrainArguments(output_dir=str(tmp_path), report_to="none", learning_rate=lr, lr_scheduler_type="linear",
                              adam_beta1=beta1, adam_beta2=beta2, adam_epsilon=eps, weight_decay=decay, max_grad_norm=max_norm)
    fed = FederatedArguments(num_rounds=2, server_optimizer="adamw", client_learning_rate=client_lr)
    start, *replies = random_states(5)
    strategy = AdapterAveraging(min_fit_clients=2, proximal_mu=0.0, server_adamw=ServerAdamW(training, fed, start))
    sent = {k: v.double() for k, v in start.items()}
    m = {k: torch.zeros_like(v) for k, v in sent.items()}
    v = {k: torch.zeros_like(x) for k, x in sent.items()}
    norms = []
    for step, (states, rate) in enumerate(((replies[:2], lr), (replies[2:], lr / 2)), start=1):
        list(strategy.configure_train(step, ArrayRecord({k: x.float() for k, x in sent.items()}), ConfigRecord(), TwoNodes()))
        arrays, _ = strategy.aggregate_train(step, [update(10 + i, i, n, s) for i, (n, s) in enumerate(zip(counts, states))])
        mean = {k: sum(n * s[k].double() for n, s in zip(counts, states)) / sum(counts) for k in sent}
        grad = {k: (sent[k] - mean[k]) / client_lr for k in sent}
        norms.append(math.sqrt(sum(float(g.pow(2).sum()) for g in grad.values())))
        grad = {k: g * min(1.0, max_norm / (norms[-1] + 1e-6)) for k, g in grad.items()}
        for k in sent:
            m[k] = beta1 * m[k] + (1 - beta1) * grad[k]
            v[k] = beta2 * v[k] + (1 - beta2) * grad[k] ** 2
            adam = (m[k] / (1 - beta1**step)) / ((v[k] / (1 - beta2**step)).sqrt() + eps)
            sent[k] = sent[k] * (1 - rate * decay) - rate * adam
        received = arrays.to_torch_state_dict()
        for name in sent:
            torch.testing.assert_close(received[name].double(), sent[name], rtol=1e-5, atol=1e-6)
    assert max(norms) > max_norm  # the clipping was exercised


def test_an_adamw_client_round_of_one_step_is_minus_its_batch_gradient_times_the_client_rate(tmp_path, tiny_model):
    """Under --server_optimizer adamw a client takes plain SGD at --client_learning_rate: no AdamW, no clipping,
    no schedule. One local step moves the adapter by -rate x the gradient of the model's own loss on the
    round's batch, computed here by a plain forward and backward; rounds 1 and 2 take the two halves of the
    client's 8 records."""
    from fora.data.collator import PaddingCollator
    from fora.federated.client_app import Site
    from fora.federated.partition import round_indices
    from fora.federated.run import adapter_state, load_adapter_state, parse

    client_lr, seed = 0.5, 42
    client_file = write_jsonl(tmp_path / "client.jsonl", train_records(8))
    argv = ["--model_name_or_path", str(tiny_model), "--train_file", str(client_file), "--output_dir", str(tmp_path / "out"),
            "--num_clients", "1", "--num_rounds", "3", "--local_steps", "1", "--per_device_train_batch_size", "4",
            "--server_optimizer", "adamw", "--client_learning_rate", str(client_lr), "--learning_rate", "1e-3",
            "--lr_scheduler_type", "cosine", "--warmup_steps", "1", "--max_grad_norm", "0.01", "--seed", str(seed),
            "--lora_rank", "4", "--torch_dtype", "float32", "--report_to", "none"]
    site = Site(parse(argv), None)
    with torch.no_grad():  # an adapter away from its initial zeros, so every factor has a gradient
        generator = torch.Generator().manual_seed(3)
        for p in site.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    sent = adapter_state(site.model)
    dataset = site.dataset(str(client_file))
    collate = PaddingCollator.for_this_machine(site.tokenizer.pad_token_id)

    def gradient_on(records: list[int]) -> dict:
        load_adapter_state(site.model, sent)  # as each round starts
        site.model.train()
        site.model.zero_grad()
        site.model(**collate([dataset[i] for i in records])).loss.backward()
        # PEFT's saved names are the parameters' without the adapter's name
        gradient = {n.replace(".default", ""): p.grad.clone() for n, p in site.model.named_parameters() if p.requires_grad}
        site.model.zero_grad()
        return gradient

    halves = [round_indices(8, 4, server_round, seed) for server_round in (1, 2)]
    assert sorted(halves[0] + halves[1]) == list(range(8))
    for server_round, records in zip((1, 2), halves):
        gradient = gradient_on(records)
        assert set(gradient) == set(sent)
        assert math.sqrt(sum(float(g.pow(2).sum()) for g in gradient.values())) > 0.01  # clipping would have shown
        state, num_examples, _ = site.train(sent, str(client_file), server_round=server_round, proximal_mu=0.0)
        assert num_examples == 8
        for name in sent:
            torch.testing.assert_close((sent[name] - state[name]) / client_lr, gradient[name], rtol=1e-4, atol=1e-6)


def test_client_rounds_go_through_every_record_before_any_repeats():
    """Round r takes records (r-1)*k .. r*k-1 of one stream of seeded shuffled passes: every pass is a
    permutation, passes differ, a round may straddle two passes, and the same seed gives the same stream."""
    from fora.federated.partition import round_indices

    num_records, per_round = 10, 4
    stream = [i for r in range(1, 11) for i in round_indices(num_records, per_round, r, seed=7)]
    passes = [stream[i:i + num_records] for i in range(0, len(stream), num_records)]
    assert all(sorted(p) == list(range(num_records)) for p in passes)
    assert passes[0] != passes[1]
    assert round_indices(num_records, per_round, 3, seed=7) == passes[0][8:] + passes[1][:2]
    assert round_indices(num_records, per_round, 3, seed=7) != round_indices(num_records, per_round, 3, seed=8)
    fewer_records_than_a_round = round_indices(3, 4, 1, seed=7)
    assert len(fewer_records_than_a_round) == 4 and sorted(fewer_records_than_a_round[:3]) == [0, 1, 2]


def test_a_failed_client_is_named_and_the_round_goes_on_while_min_fit_clients_remain(flower_log):
    from fora.federated.strategy import AdapterAveraging

    (state,) = random_states(1)
    reason = "ClientAppException: client 1: ValueError: out of memory in step 2\nTraceback ..."
    strategy = AdapterAveraging(min_fit_clients=1, proximal_mu=0.0)
    arrays, _ = strategy.aggregate_train(1, [update(10, 0, 7, state), failure(11, reason)])
    merged = arrays.to_torch_state_dict()
    for name in state:  # the one update left is the average
        torch.testing.assert_close(merged[name], state[name])
    assert strategy.rounds[1]["dropped"] == ["client 1 failed: ValueError: out of memory in step 2"]
    assert any("round 1: client 1 failed: ValueError: out of memory" in line for line in flower_log)

    strict = AdapterAveraging(min_fit_clients=2, proximal_mu=0.0)
    assert strict.aggregate_train(1, [update(10, 0, 7, state), failure(11, reason)]) == (None, None)
    assert strict.rounds[1]["skipped"]
    assert "first failure: round 1: client 1 failed: ValueError: out of memory" in strict.no_update_reason()
    assert strategy.no_update_reason() is None
    assert any("fewer than --min_fit_clients 2: the global adapter stays" in line for line in flower_log)


def test_a_client_that_does_not_answer_in_time_is_named(flower_log, stamped_messages):
    from flwr.app import ArrayRecord, ConfigRecord

    from fora.federated.strategy import AdapterAveraging

    (state,) = random_states(1)
    strategy = AdapterAveraging(min_fit_clients=1, proximal_mu=0.25)
    strategy.client_names[11] = "client 1"  # learned from an earlier round's reply
    messages = list(strategy.configure_train(1, ArrayRecord(state), ConfigRecord(), TwoNodes()))
    assert sorted(m.metadata.dst_node_id for m in messages) == [10, 11]
    assert all(m.content["config"]["proximal-mu"] == 0.25 for m in messages)
    strategy.aggregate_train(1, [update(10, 0, 7, state)])
    assert strategy.rounds[1]["dropped"] == ["client 1 did not answer within --round_timeout"]
    assert strategy.rounds[1]["clients"][0]["download_bytes"] == ArrayRecord(state).count_bytes()


# --- FedProx -------------------------------------------------------------------------------------


def test_fedprox_adds_mu_times_the_distance_to_the_global_adapter_to_the_gradient(tmp_path, tiny_model):
    from fora.args import FinetuningArguments, TrainArguments
    from fora.federated.client_app import ClientTrainer

    batch = {"input_ids": torch.tensor([[1, 20, 30, 40, 50, 60]]), "attention_mask": torch.ones(1, 6, dtype=torch.long),
             "labels": torch.tensor([[-100, -100, 30, 40, 50, 60]])}
    args = TrainArguments(output_dir=str(tmp_path), report_to="none", gradient_accumulation_steps=2)

    def gradients(mu: float) -> tuple[dict, dict]:
        torch.manual_seed(0)
        model = attach_adapter(load_model(str(tiny_model), torch.float32), FinetuningArguments(lora_rank=4))
        trainer = ClientTrainer(model=model, args=args, proximal_mu=mu)
        global_weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():  # the client has moved away from the global adapter
            generator = torch.Generator().manual_seed(1)
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=generator) * 0.05)
        model.train()
        trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(4)).backward()
        weights = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, {
            n: weights[n] - global_weights[n] for n in weights
        }

    plain, _ = gradients(0.0)
    mu = 0.5
    proximal, distance = gradients(mu)
    for name in plain:
        # mu * (w - w_global), split over the two micro-batches of one optimizer step
        torch.testing.assert_close(proximal[name] - plain[name], mu * distance[name] / 2, rtol=1e-4, atol=1e-6)
    assert any(distance[n].abs().max() > 0 for n in distance)


# --- The learning-rate schedule across rounds ------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_client_rounds_follow_one_schedule_over_all_rounds(tmp_path, tiny_model, schedule):
    """Round r's local steps take the rates of steps (r-1)*n .. r*n-1 of one schedule over rounds*n steps,
    warmup included once: the rates train_lora.py uses over the same total steps."""
    from fora.args import FinetuningArguments, TrainArguments
    from fora.federated.client_app import ClientTrainer

    rounds, local_steps, peak = 3, 4, 1e-3
    args = TrainArguments(output_dir=str(tmp_path), report_to="none", learning_rate=peak,
                          lr_scheduler_type=schedule, warmup_ratio=0.1, max_steps=local_steps)
    model = attach_adapter(load_model(str(tiny_model), torch.float32), FinetuningArguments(lora_rank=4))
    rates = []
    for server_round in range(1, rounds + 1):
        trainer = ClientTrainer(model=model, args=args, server_round=server_round, num_rounds=rounds)
        trainer.create_optimizer_and_scheduler(num_training_steps=local_steps)
        for _ in range(local_steps):
            rates.append(trainer.lr_scheduler.get_last_lr()[0])
            trainer.optimizer.step()
            trainer.lr_scheduler.step()

    total = rounds * local_steps
    warmup = math.ceil(0.1 * total)  # once, over the whole federation

    def expected(step: int) -> float:
        if step < warmup:
            return peak * step / warmup
        progress = (step - warmup) / (total - warmup)
        return peak * (1 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress)))

    assert rates == pytest.approx([expected(step) for step in range(total)], rel=1e-9, abs=1e-15)


# --- Partitioning --------------------------------------------------------------------------------


def test_a_simulated_client_reads_its_own_client_file(tmp_path):
    """--partition files: client N trains on the N-th --client_files entry (not on a share of --train_file)."""
    from fora.federated.partition import simulated_client_file
    from fora.federated.run import parse

    common = ["--output_dir", str(tmp_path / "out"), "--num_clients", "2"]
    run = parse([*common, "--partition", "files", "--client_files", "a.json,b.json"])
    assert [simulated_client_file(run, client) for client in (0, 1)] == ["a.json", "b.json"]
    run = parse([*common, "--train_file", "data/train.json"])
    assert simulated_client_file(run, 1) == str(tmp_path / "out" / "partitions" / "client-1.jsonl")


def test_partitions_are_seeded_disjoint_and_by_field_keep_each_value_on_one_client():
    from fora.data.records import Record
    from fora.federated.partition import split_by_field, split_iid

    shares = split_iid(10, 3, seed=1)
    assert sorted(i for s in shares for i in s) == list(range(10)) and sorted(map(len, shares)) == [3, 3, 4]
    assert split_iid(10, 3, seed=1) == shares and split_iid(10, 3, seed=2) != shares
    records = [Record(f"f: line {i}", {"site": site}) for i, site in enumerate("aabbbcaab")]
    shares = split_by_field(records, "site", 2)
    assert sorted(i for s in shares for i in s) == list(range(9))
    for share in shares:
        sites = {records[i].value["site"] for i in share}
        assert all(records[i].value["site"] not in sites for other in shares if other is not share for i in other)


# --- A real simulation: 2 clients x 2 rounds on a tiny model -------------------------------------


@pytest.fixture(scope="module")
def federated_run(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("federated")
    train = write_jsonl(folder / "train.jsonl", train_records(24))
    validation = write_jsonl(folder / "validation.jsonl", train_records(6, start=100))
    out = folder / "out"
    flags = [
        "--model_name_or_path", str(tiny_model), "--train_file", str(train), "--validation_file", str(validation),
        "--num_clients", "2", "--num_rounds", "2", "--local_steps", "3", "--per_device_train_batch_size", "4",
        "--learning_rate", "5e-3", "--lora_rank", "4", "--max_source_length", "64", "--max_target_length", "32",
        "--output_dir", str(out), "--report_to", "none", "--eval_generate",
        "--torch_dtype", "float32",  # as the base file is stored; the history reports the base's size as loaded
        # Flower's DP wrapper and clipping mod in the loop, set so they change nothing (no noise, a norm never reached)
        "--dp_noise_multiplier", "0", "--dp_clipping_norm", "1000",
    ]
    result = run_script(PYTHON, "train_federated.py", *flags, timeout=420, env=FLOWER_ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result, flags


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


def test_only_adapter_tensors_travel(federated_run, tiny_model):
    from flwr.app import ArrayRecord
    from safetensors import safe_open

    from fora.args import FinetuningArguments
    from fora.federated.run import adapter_state

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


def talkative_copy(model_dir: Path, folder: Path) -> Path:
    """The tiny model with an untied random output layer: the tied one repeats the prompt's last token
    (a newline, so every answer is blank), this one answers words."""
    from safetensors.torch import save_file

    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    weights = load_file(str(folder / "model.safetensors"))
    embedding = weights["model.embed_tokens.weight"]
    weights["lm_head.weight"] = torch.randn(embedding.shape, generator=torch.Generator().manual_seed(0))
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_eval_generate_scores_as_predict_fora_does(federated_run, tmp_path, tiny_model):
    """Every round has ROUGE-L/BLEU-4, and the server's scorer gives what predict_fora.py gives the same model
    (the initial global adapter, lora_B = 0, on a tiny model that answers words), on labels that are half
    the model's own answers, so neither score is 0 or 100."""

    out, _, flags = federated_run
    rounds = json.loads((out / "federated_history.json").read_text())["rounds"]
    assert all({"rouge-l", "bleu-4"} <= set(r) for r in rounds)
    assert (out / "federated_rouge_l.png").stat().st_size > 0 and (out / "federated_bleu_4.png").stat().st_size > 0
    model = talkative_copy(tiny_model, tmp_path / "talkative")

    def predict(test_file: Path, name: str) -> dict:
        result = run_script(PYTHON, "predict_fora.py", "--model_dir", str(model), "--test_path", str(test_file),
                            "--max_source_length", "64", "--max_new_tokens", "32", "--output_dir", str(tmp_path / name), env=ONE_THREAD)
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads((tmp_path / name / "predict_results.json").read_text())

    validation = Path(flags[flags.index("--validation_file") + 1])
    predict(validation, "first")
    answers = [json.loads(line)["predict"] for line in (tmp_path / "first" / "generated_predictions.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in validation.read_text(encoding="utf-8").splitlines()]
    labelled = write_jsonl(tmp_path / "labelled.jsonl", [
        {**record, "output": answer if i % 2 else record["output"]} for i, (record, answer) in enumerate(zip(records, answers))
    ])
    expected = predict(labelled, "second")
    assert 10 < expected["rouge-l"] < 90, expected

    argv = flags + ["--model_name_or_path", str(model), "--validation_file", str(labelled), "--output_dir", str(tmp_path / "server")]
    server = GlobalAdapter(parse(argv))  # (the last of a repeated flag wins)
    scores = server.evaluate(adapter_state(server.model))
    assert (scores["rouge-l"], scores["bleu-4"]) == (expected["rouge-l"], expected["bleu-4"])


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


def test_bad_input_exits_2_with_one_line(tmp_path, tiny_model):
    result = run_script(PYTHON, "train_federated.py", "--model_name_or_path", str(tiny_model), "--train_file",
                        "data/train.json", "--num_rounds", "0", "--output_dir", str(tmp_path / "out"), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --num_rounds must be at least 1, got 0"]


# --- The deployment engine, for real on loopback: one SuperLink, two SuperNodes --------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, seconds: float, processes: list) -> None:
    import socket

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in processes), "a Flower process exited early (see its log)"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


def stop_processes(started: list) -> None:
    """SIGTERM each started process group, SIGKILL what is left; then the same for the helper processes
    Flower spawned in sessions of their own (flower-superexec, flwr-serverapp, flwr-clientapp), which name
    their parent with --parent-pid."""
    import signal

    import psutil

    pids = {p.pid for p in started}
    helpers = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        parent = cmdline[cmdline.index("--parent-pid") + 1:][:1] if "--parent-pid" in cmdline else []
        if parent and int(parent[0]) in pids:
            helpers += [proc, *proc.children(recursive=True)]
    for process in started:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for process in started:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    _, alive = psutil.wait_procs(helpers, timeout=20)
    for proc in alive:
        proc.kill()


def wait_for_supernodes(count: int, seconds: float, env: dict, processes: list) -> None:
    """Until the SuperLink lists `count` SuperNodes online (`flwr supernode list`), so every site is in round 1."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in processes), "a Flower process exited early (see its log)"
        listed = subprocess.run([str(Path(sys.executable).parent / "flwr"), "supernode", "list", "test", "--format", "json"],
                                env=env, capture_output=True, text=True, timeout=60, check=False)
        if listed.returncode == 0 and sum(n["status"] == "online" for n in json.loads(listed.stdout)["nodes"]) >= count:
            return
        time.sleep(1)
    raise TimeoutError(f"fewer than {count} SuperNodes online after {seconds} s")


def test_deployment_engine_runs_two_rounds_on_loopback(tmp_path, tiny_model):
    """Three sites on loopback; site 2's node config names a data file it does not have, so its client
    raises in every round: the log names it and each round goes on with the two others (--min_fit_clients 2).
    The server steps with AdamW (FedOpt), so its wiring runs for real here; the simulation above runs FedAvg."""
    bin_dir = Path(sys.executable).parent
    home = tmp_path / "flwr-home"
    home.mkdir()
    link_port, node_ports = free_port(), (free_port(), free_port(), free_port())
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(home), "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    sites = [write_jsonl(tmp_path / f"site-{i}.jsonl", train_records(10, start=10 * i)) for i in range(2)] + [tmp_path / "missing.jsonl"]
    validation = write_jsonl(tmp_path / "validation.jsonl", train_records(4, start=100))
    out = tmp_path / "out"
    started = []

    def start(name: str, *command: str) -> None:
        with open(tmp_path / f"{name}.log", "w") as log:  # the child keeps its own copy of the descriptor
            started.append(subprocess.Popen([str(bin_dir / command[0]), *command[1:]], stdout=log, stderr=subprocess.STDOUT,
                                            env=env, cwd=tmp_path, start_new_session=True))

    try:
        start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link_port),
              "--disable-runtime-dependency-installation")
        wait_for_port(link_port, 120, started)
        for site, (data_file, port) in enumerate(zip(sites, node_ports)):
            start(f"supernode-{site}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                  "--port", str(port), "--node-config",
                  f"partition-id={site} num-partitions=3 data-file='{data_file}' model-path='{tiny_model}'")
        wait_for_supernodes(3, 120, env, started)
        flags = (f"--model_name_or_path {tiny_model} --num_clients 3 --min_fit_clients 2 --num_rounds 2 --local_steps 2 "
                 f"--server_optimizer adamw --client_learning_rate 0.1 "
                 f"--per_device_train_batch_size 4 --learning_rate 5e-3 --lora_rank 4 --max_source_length 64 "
                 f"--max_target_length 32 --validation_file {validation} --output_dir {out} --report_to none")
        result = subprocess.run(
            [str(bin_dir / "flwr"), "run", str(REPO / "federated_app"), "test", "--stream", "--run-config", f'flags="{flags}"'],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=480, check=False,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        history = json.loads((out / "federated_history.json").read_text())
        assert [r["round"] for r in history["rounds"]] == [0, 1, 2]
        assert [[c["num_examples"] for c in r["clients"]] for r in history["rounds"][1:]] == [[10, 10], [10, 10]]
        for entry in history["rounds"][1:]:
            (dropped,) = entry["dropped"]
            assert dropped.startswith("client 2 failed: ") and "missing.jsonl" in dropped, dropped
        assert f"round 1: {history['rounds'][1]['dropped'][0]}" in result.stdout + result.stderr
        assert history["rounds"][2]["eval_loss"] < history["rounds"][0]["eval_loss"]
        assert (out / "round-2" / "adapter_model.safetensors").is_file()
        assert json.loads((out / "fora_run.json").read_text())["federated"]["server_optimizer"] == "adamw"
    finally:
        stop_processes(started)
    assert all(p.poll() is not None for p in started)


def test_dp_clipping_bounds_each_client_update_when_the_server_asks(monkeypatch):
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
    from flwr.supercore.task_identity import TaskIdentity

    from fora.federated.client_app import clip_when_asked

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    (global_state,) = random_states(1)
    moved = {k: v + 1.0 for k, v in global_state.items()}  # an update of norm far above 0.5

    def local_training(msg, context):
        return Message(RecordDict({"arrays": ArrayRecord(moved), "metrics": ConfigRecord()}), reply_to=msg)

    def train_message(config: dict):
        return Message(RecordDict({"arrays": ArrayRecord(global_state), "config": ConfigRecord(config)}),
                       dst_node_id=1, message_type="train")

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    clipped = clip_when_asked(train_message({KEY_CLIPPING_NORM: 0.5}), context, local_training)
    sent = clipped.content["arrays"].to_torch_state_dict()
    norm = torch.sqrt(sum(((sent[k] - global_state[k]) ** 2).sum() for k in global_state))
    assert norm == pytest.approx(0.5, rel=1e-5)
    untouched = clip_when_asked(train_message({}), context, local_training).content["arrays"].to_torch_state_dict()
    assert all(torch.equal(untouched[k], moved[k]) for k in moved)


def test_a_fora_adapter_travels_whole_between_two_sites(tiny_model):
    """FoRA's extra factors are part of what travels: a second site that loads the tensors computes the same outputs."""
    from fora.args import FinetuningArguments
    from fora.federated.run import adapter_state, load_adapter_state

    def site(seed: int):
        torch.manual_seed(seed)
        model = attach_adapter(load_model(str(tiny_model), torch.float32),
                                        FinetuningArguments(finetuning_type="fora", lora_rank=4))
        with torch.no_grad():  # a trained adapter: every factor away from its initial value
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        return model.eval()

    trained, other = site(0), site(1)
    ids = torch.tensor([[1, 200, 300, 400]])
    assert not torch.allclose(trained(ids).logits, other(ids).logits, atol=1e-5)
    payload = adapter_state(trained)
    assert len({name.rsplit(".", 2)[-2] for name in payload}) > 2  # more factors than LoRA's A and B
    load_adapter_state(other, payload)
    torch.testing.assert_close(other(ids).logits, trained(ids).logits)
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter_state(other, dict(list(payload.items())[1:]))
