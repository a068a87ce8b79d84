"""fora/federated/strategy.py: aggregation, the server's step (FedAvgM, AdamW), and dropped clients, on Flower's real messages."""

import logging
import math
import time

import pytest
import torch

from support import random_states

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


# --- Client sampling and differential privacy ----------------------------------------------------


def test_fraction_train_asks_that_share_of_the_clients(stamped_messages):
    from flwr.app import ArrayRecord, ConfigRecord

    from fora.federated.strategy import AdapterAveraging

    class FourNodes:
        def get_node_ids(self):
            return [10, 11, 12, 13]

    (state,) = random_states(1)
    strategy = AdapterAveraging(min_fit_clients=1, proximal_mu=0.0, fraction_train=0.5)
    asked = [{m.metadata.dst_node_id for m in strategy.configure_train(r, ArrayRecord(state), ConfigRecord(), FourNodes())}
             for r in range(1, 9)]
    assert all(len(nodes) == 2 for nodes in asked) and len({frozenset(nodes) for nodes in asked}) > 1


def test_under_differential_privacy_a_failed_client_is_named_and_the_skipped_rounds_counted(flower_log):
    """Flower's DP wrapper leaves out a round with a failed client before the strategy sees it; the round's
    record still names who failed, and a run of such rounds says how many there were."""
    from fora.args import FederatedArguments
    from fora.federated.strategy import AdapterAveraging, PrivateAveraging

    (state,) = random_states(1)
    reason = "ClientAppException: client 1: ValueError: out of memory in step 2\nTraceback ..."
    averaging = AdapterAveraging(min_fit_clients=1, proximal_mu=0.0)
    fed = FederatedArguments(num_clients=2, min_fit_clients=1, dp_noise_multiplier=1.0, dp_clipping_norm=1.0)
    strategy = PrivateAveraging(averaging, fed)
    assert strategy.aggregate_train(1, [update(10, 0, 7, state), failure(11, reason)]) == (None, None)
    assert averaging.rounds[1]["dropped"] == ["client 1 failed: ValueError: out of memory in step 2"]
    assert averaging.rounds[1]["skipped"] and [c["client"] for c in averaging.rounds[1]["clients"]] == [0]
    assert any("differential privacy leaves out a round in which a client failed" in line for line in flower_log)
    message = averaging.no_update_reason()
    assert "each of 1 round(s) was left out" in message and "first failure: round 1: client 1 failed" in message
    arrays, _ = strategy.aggregate_train(2, [update(10, 0, 7, state), update(11, 1, 7, state)])
    assert arrays is not None and averaging.rounds[2]["privacy"]["epsilon"] > 0 and averaging.no_update_reason() is None


def test_the_privacy_spent_is_the_rdp_accountants_under_the_sampling_used():
    """Two of four clients a round without replacement ("replace one": half the multiplier, the sensitivity
    being twice the clipping norm), the multiplier scaled by the weights of the round's updates; every
    client every round: no amplification, "add or remove one". Checked against dp-accounting itself."""
    from dp_accounting import dp_event
    from dp_accounting.privacy_accountant import NeighboringRelation
    from dp_accounting.rdp import RdpAccountant

    from fora.args import FederatedArguments
    from fora.federated.strategy import PrivacyLedger

    z, delta = 1.2, 1e-5
    ledger = PrivacyLedger(FederatedArguments(num_clients=4, fraction_train=0.5, dp_noise_multiplier=z, dp_clipping_norm=1.0,
                                              dp_delta=delta))
    reference = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    spent = []
    for weights in ([10, 10], [10, 30]):
        spent.append(ledger.spend(weights))
        multiplier = z * sum(weights) / (2 * max(weights)) / 2
        reference.compose(dp_event.SampledWithoutReplacementDpEvent(4, 2, dp_event.GaussianDpEvent(multiplier)))
        assert spent[-1]["epsilon"] == pytest.approx(reference.get_epsilon(delta), rel=1e-9)
        assert spent[-1]["noise_multiplier"] == pytest.approx(multiplier) and spent[-1]["delta"] == delta
    assert 0 < spent[0]["epsilon"] < spent[1]["epsilon"]

    everyone = PrivacyLedger(FederatedArguments(num_clients=3, dp_noise_multiplier=z, dp_clipping_norm=1.0, dp_delta=delta))
    reference = RdpAccountant()
    reference.compose(dp_event.GaussianDpEvent(z))
    assert everyone.spend([5, 5, 5])["epsilon"] == pytest.approx(reference.get_epsilon(delta), rel=1e-9)
    noiseless = PrivacyLedger(FederatedArguments(num_clients=3, dp_noise_multiplier=0.0, dp_clipping_norm=1.0))
    assert noiseless.spend([5, 5, 5])["epsilon"] is None  # no noise, no privacy
