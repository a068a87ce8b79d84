"""The server's strategy: FedAvg over the adapters, weighted by each client's examples, with FedAvgM's step or
AdamW on the server (FedOpt), and the bookkeeping of who answered, who failed and who was late."""

import re

import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvgM
from transformers import get_scheduler

from fora.args import FederatedArguments
from fora.federated.run import ARRAYS, METRICS, NUM_EXAMPLES, logger


class FederationFailed(RuntimeError):
    """No round changed the global adapter: every round had fewer than --min_fit_clients client updates."""


class ServerAdamW:
    """FedOpt's server step (Reddi et al., 2021) with the run's optimizer: the clients' mean change divided
    by their SGD rate is minus a gradient, which the server clips as the Trainer does and feeds to one
    torch AdamW step per round, under the run's learning-rate schedule over --num_rounds steps."""

    def __init__(self, training, fed: FederatedArguments, initial: dict[str, torch.Tensor]):
        self.client_learning_rate = fed.client_learning_rate
        self.max_grad_norm = training.max_grad_norm
        self.weights = {name: torch.nn.Parameter(t.float().clone()) for name, t in initial.items()}
        self.optimizer = torch.optim.AdamW(
            self.weights.values(), lr=training.learning_rate, betas=(training.adam_beta1, training.adam_beta2),
            eps=training.adam_epsilon, weight_decay=training.weight_decay,
        )
        self.schedule = get_scheduler(
            training.lr_scheduler_type, self.optimizer, num_warmup_steps=training.get_warmup_steps(fed.num_rounds),
            num_training_steps=fed.num_rounds, scheduler_specific_kwargs=training.lr_scheduler_kwargs,
        )

    def step(self, sent: dict[str, torch.Tensor], mean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The global adapter after one AdamW step from `sent`, the adapter this round started from."""
        for name, weight in self.weights.items():
            weight.data.copy_(sent[name])
            weight.grad = (sent[name].float() - mean[name].float()) / self.client_learning_rate
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(self.weights.values()), self.max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        return {name: weight.detach().to(sent[name].dtype, copy=True) for name, weight in self.weights.items()}

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """AdamW's moments by adapter tensor name, and its step count and schedule (fora.federated.resume)."""
        state = self.optimizer.state_dict()
        names = list(self.weights)
        moments = {f"{names[index]}/{key}": value for index, entries in state["state"].items()
                   for key, value in entries.items()}
        return moments, {"param_groups": state["param_groups"], "schedule": self.schedule.state_dict()}

    def load(self, moments: dict[str, torch.Tensor], saved: dict) -> None:
        names = list(self.weights)
        state: dict[int, dict] = {}
        for key, value in moments.items():
            name, entry = key.rsplit("/", 1)
            state.setdefault(names.index(name), {})[entry] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
        self.schedule.load_state_dict(saved["schedule"])


class AdapterAveraging(FedAvgM):
    """FedAvg over adapter tensors, weighted by each client's number of examples (Flower's aggregation),
    with FedAvgM's server step (the global adapter moves by server_learning_rate times the mean change,
    plus server_momentum times the previous move; 1 and 0 are plain FedAvg), or with `server_adamw` the
    run's AdamW on the server (ServerAdamW) in its place. It also sends FedProx's mu
    to the clients, names every client that failed or did not answer in time, skips a round with fewer
    than `min_fit_clients` updates (the global adapter stays), and records each client's traffic per
    round into `rounds`."""

    def __init__(self, min_fit_clients: int, proximal_mu: float, server_learning_rate: float = 1.0, server_momentum: float = 0.0,
                 server_adamw: ServerAdamW | None = None, fraction_train: float = 1.0):
        super().__init__(fraction_train=fraction_train, fraction_evaluate=0.0, min_train_nodes=min_fit_clients,
                         min_available_nodes=min_fit_clients, server_learning_rate=server_learning_rate,
                         server_momentum=server_momentum)
        self.server_adamw = server_adamw
        self.round_offset = 0  # rounds done before Flower's loop started (a resumed run): Flower counts from 1
        self.min_fit_clients = min_fit_clients
        self.proximal_mu = proximal_mu
        self.rounds: dict[int, dict] = {}  # round → {"clients": [...], "dropped": [...]}
        self.client_names: dict[int, str] = {}  # node id → "client N", learned from replies
        self._sent: dict[int, tuple[list[int], int]] = {}  # round → (node ids asked, bytes sent to each)

    def configure_train(self, server_round, arrays, config, grid):
        server_round += self.round_offset
        config["proximal-mu"] = self.proximal_mu
        self.current_arrays = arrays  # the server step starts from the adapter sent, after any DP noise
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sent[server_round] = ([m.metadata.dst_node_id for m in messages], arrays.count_bytes())
        return messages

    def aggregate_train(self, server_round, replies):
        server_round += self.round_offset
        replies = list(replies)
        updates = self.record(server_round, replies)
        if len(updates) < self.min_fit_clients:
            logger.warning("round %d: %d client update(s), fewer than --min_fit_clients %d: the global adapter "
                           "stays as it was", server_round, len(updates), self.min_fit_clients)
            self.rounds[server_round]["skipped"] = True
            return None, None
        sent = self.current_arrays
        arrays, metrics = super().aggregate_train(server_round, updates)
        if self.server_adamw is not None:
            arrays = ArrayRecord(self.server_adamw.step(sent.to_torch_state_dict(), arrays.to_torch_state_dict()))
        return arrays, metrics

    def record(self, server_round: int, replies: list) -> list:
        """Who answered round `server_round` (its actual number) with what, who failed and who was late, into
        `rounds` and the log, once; the replies that carry an update."""
        updates = [r for r in replies if not r.has_error()]
        if server_round in self.rounds:
            return updates
        asked, download = self._sent.pop(server_round, ([], 0))
        dropped = []
        for reply in replies:
            if reply.has_error():
                dropped.append(self._name(reply.metadata.src_node_id, reply.error.reason) + " failed: "
                               + failure_summary(reply.error.reason))
        answered = {r.metadata.src_node_id for r in replies}
        for node in asked:
            if node not in answered:
                dropped.append(f"{self._name(node)} did not answer within --round_timeout")
        clients = []
        for reply in updates:
            reported = reply.content[METRICS]
            self.client_names[reply.metadata.src_node_id] = f"client {int(reported['client'])}"
            clients.append({
                "client": int(reported["client"]),
                "num_examples": int(reported[NUM_EXAMPLES]),
                "train_loss": float(reported["train-loss"]),
                "download_bytes": download,
                "upload_bytes": reply.content[ARRAYS].count_bytes(),
            })
        self.rounds[server_round] = {"clients": sorted(clients, key=lambda c: c["client"]), "dropped": dropped}
        for line in dropped:
            logger.warning("round %d: %s", server_round, line)
        return updates

    def no_update_reason(self) -> str | None:
        """Why no round changed the global adapter (each was skipped: fewer than min_fit_clients updates, or a
        failed client under differential privacy), or None."""
        if any(not entry.get("skipped") for entry in self.rounds.values()):
            return None
        dropped = [f"round {r}: {line}" for r, entry in sorted(self.rounds.items()) for line in entry["dropped"]]
        return (f"no round produced an update (each of {len(self.rounds)} round(s) was left out: fewer than "
                f"--min_fit_clients {self.min_fit_clients} client updates, or a failed client under differential "
                f"privacy{'; first failure: ' + dropped[0] if dropped else ''}); no global adapter was saved")

    def _name(self, node_id: int, reason: str = "") -> str:
        found = re.search(r"client (\d+): ", reason)
        if found:
            return f"client {found.group(1)}"
        return self.client_names.get(node_id, f"node {node_id}")


def failure_summary(reason: str) -> str:
    """The client's own exception line out of a failure report (which may carry whole tracebacks)."""
    found = re.search(r"client \d+: (.*)", reason)  # Flower wraps a raised one as "<class ...>:<'client N: ...'>"
    if found:
        return found.group(1).removesuffix("'>").strip()
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    return lines[-1] if lines else "no reason given"


class PrivateAveraging(DifferentialPrivacyClientSideFixedClipping):
    """Flower's central differential privacy with client-side clipping over AdapterAveraging, which keeps its
    bookkeeping (Flower's wrapper drops a round with a failed client before the strategy sees it), and the
    privacy spent after every noised round (PrivacyLedger) in `averaging.rounds`."""

    def __init__(self, averaging: AdapterAveraging, fed: FederatedArguments):
        super().__init__(averaging, fed.dp_noise_multiplier, fed.dp_clipping_norm, num_sampled_clients=fed.clients_per_round())
        self.averaging = averaging
        self.ledger = PrivacyLedger(fed)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        actual = server_round + self.averaging.round_offset
        updates = self.averaging.record(actual, replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        entry = self.averaging.rounds[actual]
        if arrays is None:
            if len(updates) < len(replies):
                logger.warning("round %d: differential privacy leaves out a round in which a client failed: the global "
                               "adapter stays as it was", actual)
            entry["skipped"] = True
        else:
            entry["privacy"] = self.ledger.spend([c["num_examples"] for c in entry["clients"]])
            logger.info("round %d: privacy spent: epsilon %s at delta %g (%s)", actual, entry["privacy"]["epsilon"],
                        entry["privacy"]["delta"], entry["privacy"]["accounting"])
        return arrays, metrics


class PrivacyLedger:
    """The privacy spent by the noised rounds (client-level: what one client's whole data can change), counted
    by Flower's RDP accountant (over Google's dp-accounting) under the sampling used: a round asks m of the
    N clients at random without replacement (--fraction_train), which amplifies privacy for "replace one
    client" neighbours; with every client asked, no amplification, for "add or remove one client".

    Flower's noise has standard deviation z·C/m on the example-weighted mean of m updates clipped to C. A
    client of weight w moves that mean by at most C·w/Σw, so the noise is z·Σw/(m·max w) times the
    largest client's sensitivity (z itself for equal shares), and half that for "replace one", whose
    sensitivity is twice the clipping norm: the multiplier each round is accounted at."""

    def __init__(self, fed: FederatedArguments):
        from flwr.serverapp import NeighboringRelation, PrivacyConfig, SamplingMethod

        self.noise_multiplier, self.delta = fed.dp_noise_multiplier, fed.dp_delta
        self.sampled, self.population = fed.clients_per_round(), fed.num_clients
        self.amplified = self.sampled < self.population
        self.config = PrivacyConfig(
            target_delta=fed.dp_delta, population_size=self.population,
            neighboring_relation=NeighboringRelation.REPLACE_ONE if self.amplified else NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.WITHOUT_REPLACEMENT if self.amplified else SamplingMethod.NO_AMPLIFICATION,
        )
        self.accountant = None
        if self.noise_multiplier > 0:
            from flwr.serverapp import RdpAccountant

            self.accountant = RdpAccountant(self.config)

    def spend(self, weights: list[int]) -> dict:
        """Compose one noised round whose updates had `weights`; the privacy spent so far."""
        description = (f"RDP, {self.sampled} of {self.population} clients a round "
                       + ("without replacement, replace-one" if self.amplified else "all, add-or-remove-one"))
        if self.accountant is None:  # no noise: no privacy to count
            return {"epsilon": None, "delta": self.delta, "noise_multiplier": 0.0, "accounting": description}
        from flwr.serverapp import GaussianPrivacyEvent

        multiplier = self.noise_multiplier * sum(weights) / (self.sampled * max(weights)) / (2 if self.amplified else 1)
        self.accountant.compose(GaussianPrivacyEvent(noise_multiplier=multiplier, sample_size=self.sampled,
                                                     population_size=self.population))
        spent = self.accountant.get_privacy_spent(self.delta)
        return {"epsilon": spent.epsilon, "delta": self.delta, "noise_multiplier": multiplier, "accounting": description}

    def state(self) -> dict | None:
        return self.accountant.state_dict() if self.accountant else None

    def load(self, state: dict | None) -> None:
        if self.accountant and state:
            self.accountant.load_state_dict(state)
