"""The server's strategy: FedAvg over the adapters, weighted by each client's examples, with FedAvgM's step or
AdamW on the server (FedOpt), and the bookkeeping of who answered, who failed and who was late."""

import re

import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvgM
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
        return {name: weight.detach().to(sent[name].dtype) for name, weight in self.weights.items()}


class AdapterAveraging(FedAvgM):
    """FedAvg over adapter tensors, weighted by each client's number of examples (Flower's aggregation),
    with FedAvgM's server step (the global adapter moves by server_learning_rate times the mean change,
    plus server_momentum times the previous move; 1 and 0 are plain FedAvg), or with `server_adamw` the
    run's AdamW on the server (ServerAdamW) in its place. It also sends FedProx's mu
    to the clients, names every client that failed or did not answer in time, skips a round with fewer
    than `min_fit_clients` updates (the global adapter stays), and records each client's traffic per
    round into `rounds`."""

    def __init__(self, min_fit_clients: int, proximal_mu: float, server_learning_rate: float = 1.0, server_momentum: float = 0.0,
                 server_adamw: ServerAdamW | None = None):
        super().__init__(fraction_evaluate=0.0, min_train_nodes=min_fit_clients, min_available_nodes=min_fit_clients,
                         server_learning_rate=server_learning_rate, server_momentum=server_momentum)
        self.server_adamw = server_adamw
        self.min_fit_clients = min_fit_clients
        self.proximal_mu = proximal_mu
        self.rounds: dict[int, dict] = {}  # round → {"clients": [...], "dropped": [...]}
        self.client_names: dict[int, str] = {}  # node id → "client N", learned from replies
        self._sent: dict[int, tuple[list[int], int]] = {}  # round → (node ids asked, bytes sent to each)

    def configure_train(self, server_round, arrays, config, grid):
        config["proximal-mu"] = self.proximal_mu
        self.current_arrays = arrays  # the server step starts from the adapter sent, after any DP noise
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sent[server_round] = ([m.metadata.dst_node_id for m in messages], arrays.count_bytes())
        return messages

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        asked, download = self._sent.pop(server_round, ([], 0))
        updates = [r for r in replies if not r.has_error()]
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

    def no_update_reason(self) -> str | None:
        """Why no round changed the global adapter (each had fewer than min_fit_clients updates), or None."""
        if any(not entry.get("skipped") for entry in self.rounds.values()):
            return None
        dropped = [f"round {r}: {line}" for r, entry in sorted(self.rounds.items()) for line in entry["dropped"]]
        return (f"no round produced an update (each of {len(self.rounds)} round(s) had fewer than --min_fit_clients "
                f"{self.min_fit_clients} client updates{'; first failure: ' + dropped[0] if dropped else ''}); "
                "no global adapter was saved")

    def _name(self, node_id: int, reason: str = "") -> str:
        found = re.search(r"client (\d+): ", reason)
        if found:
            return f"client {found.group(1)}"
        return self.client_names.get(node_id, f"node {node_id}")


def failure_summary(reason: str) -> str:
    """The client's own exception line out of a failure report (which may carry whole tracebacks)."""
    found = re.search(r"client \d+: ([^\n'>]*)", reason)
    if found:
        return found.group(1).strip()
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    return lines[-1] if lines else "no reason given"
