"""fora/federated/client_app.py: a site's local round (SGD under the adamw server), FedProx, the schedule across rounds, DP clipping."""

import math

import pytest
import torch

from fora.federated.run import adapter_state, parse
from fora.models.load import load_model
from fora.tuners.attach import attach_adapter
from support import random_states, train_records, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("loraplus_ratio", [None, 16])
def test_an_adamw_client_round_of_one_step_is_minus_its_batch_gradient_times_the_client_rate(tmp_path, tiny_model, loraplus_ratio):
    """Under --server_optimizer adamw a client takes plain SGD at --client_learning_rate: no AdamW, no clipping,
    no schedule. One local step moves the adapter by -rate x the gradient of the model's own loss on the
    round's batch, computed here by a plain forward and backward; rounds 1 and 2 take the two halves of the
    client's 8 records. With --loraplus_lr_ratio, B's rate is that many times A's, as in train_lora.py."""
    from fora.data.collator import PaddingCollator
    from fora.federated.client_app import Site
    from fora.federated.partition import round_indices
    from fora.federated.run import load_adapter_state

    client_lr, seed = 0.5, 42
    client_file = write_jsonl(tmp_path / "client.jsonl", train_records(8))
    argv = ["--model_name_or_path", str(tiny_model), "--train_file", str(client_file), "--output_dir", str(tmp_path / "out"),
            "--num_clients", "1", "--num_rounds", "3", "--local_steps", "1", "--per_device_train_batch_size", "4",
            "--server_optimizer", "adamw", "--client_learning_rate", str(client_lr), "--learning_rate", "1e-3",
            "--lr_scheduler_type", "cosine", "--warmup_steps", "1", "--max_grad_norm", "0.01", "--seed", str(seed),
            "--lora_rank", "4", "--torch_dtype", "float32", "--report_to", "none"]
    if loraplus_ratio:
        argv += ["--loraplus_lr_ratio", str(loraplus_ratio)]
    site = Site(parse(argv))
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
            rate = client_lr * (loraplus_ratio if loraplus_ratio and "lora_B" in name else 1)
            torch.testing.assert_close((sent[name] - state[name]) / rate, gradient[name], rtol=1e-4, atol=1e-6)


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
