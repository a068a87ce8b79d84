"""Federated fine-tuning on Flower: sites train adapters where their data lives; only adapters travel.

    server (ServerApp)                          each client (ClientApp)
    global adapter ──── adapter tensors ────▶   load it into its own base model (loaded once per process)
                                                train --local_steps with fora.training.SupervisedTrainer
    example-weighted mean ◀── adapter tensors ─ (+ FedProx's mu/2·||w − w_global||², ClientTrainer)
    then FedAvgM's step, or AdamW on the mean change (--server_optimizer adamw: clients take SGD steps)
    save OUTPUT_DIR/round-N (PEFT + fora_run.json), eval loss (+ ROUGE-L/BLEU-4), federated_history.json

The same two apps run in Flower's simulation engine (`simulate`, one machine, clients in Ray
workers) and in its deployment engine (`server_app` / `client_app` below, loaded by a SuperLink and
one SuperNode per site). The flags reach the apps as an argument list: in simulation directly, in
deployment as the run config's `flags` string (federated_app/pyproject.toml, `flwr run --run-config`),
with each site's own data file and base model in its SuperNode's `--node-config`.
"""

import copy
import importlib.util
import json
import logging
import os
import random
import re
import shlex
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import (
    ArrayRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvgM
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import get_scheduler, set_seed

from config import (
    DataArguments,
    FederatedArguments,
    FinetuningArguments,
    ModelArguments,
    TrainArguments,
    parse_args,
)
from fora import data, generate, metrics, modeling
from fora.errors import UserError
from fora.run import RunRecord, load_tokenizer, save_base_tokenizer, training_dtype
from fora.templates import get_template
from fora.training import STAGING_PREFIX, PaddingCollator, SupervisedTrainer, write_json

ARRAYS, METRICS, CONFIG = "arrays", "metrics", "config"  # the keys of a Flower message's records
NUM_EXAMPLES = "num-examples"  # the metric FedAvg weights each client's adapter by
HISTORY_FILE = "federated_history.json"
PREVIOUS_RUN_MARKERS = ("adapter_config.json", "fora_run.json", HISTORY_FILE, "round-*")
PARTITION_DIR = "partitions"
# The node config of a deployed SuperNode: its place among the clients, its data and its base model.
NODE_PARTITION, NODE_DATA_FILE, NODE_MODEL_PATH = "partition-id", "data-file", "model-path"

logger = logging.getLogger("flwr")  # Flower's own logger, so the apps' lines and Flower's interleave in one log


@dataclass
class FederatedRun:
    """Every flag of train_federated.py, parsed (the same dataclasses train_lora.py parses, plus FederatedArguments)."""

    model: ModelArguments
    data: DataArguments
    finetuning: FinetuningArguments
    training: TrainArguments
    federated: FederatedArguments
    dtype: torch.dtype

    @property
    def output_dir(self) -> Path:
        return Path(self.training.output_dir)


def parse(argv: list[str] | None) -> FederatedRun:
    model_args, data_args, finetuning_args, training_args, federated_args = parse_args(
        (ModelArguments, DataArguments, FinetuningArguments, TrainArguments, FederatedArguments), argv
    )
    if finetuning_args.finetuning_type == "full":
        raise UserError("--finetuning_type full: federated training sends adapters only; choose lora or fora")
    if training_args.lr_scheduler_type == "reduce_lr_on_plateau":
        raise UserError("--lr_scheduler_type reduce_lr_on_plateau: clients do not evaluate while they train; choose a fixed schedule")
    dtype = training_dtype(model_args, training_args)
    return FederatedRun(model_args, data_args, finetuning_args, training_args, federated_args, dtype)


def refuse_previous_run(run: FederatedRun) -> None:
    """An --output_dir holding an earlier run's adapters is replaced only with --overwrite_output_dir."""
    folder = run.output_dir
    previous = [m for m in PREVIOUS_RUN_MARKERS if any(folder.glob(m))] if folder.is_dir() else []
    if previous and not run.training.overwrite_output_dir:
        raise UserError(f"--output_dir {folder} holds a previous run ({previous[0]}); pass --overwrite_output_dir to replace it")


def argv_from_run_config(run_config: dict) -> list[str]:
    """A deployed run's flags: the run config's `flags` string (`flwr run --run-config 'flags="..."'`)."""
    return shlex.split(str(run_config.get("flags", "")))


# --- Partitioning (before Flower starts) ------------------------------------------------------------


def client_data_files(run: FederatedRun) -> list[str]:
    """One checked data file per client: --client_files as given, or --train_file split and written to
    OUTPUT_DIR/partitions/client-N.jsonl. Every mistake is a UserError here, before any model loads."""
    fed, args = run.federated, run.data

    def check(path: str, flag: str) -> None:
        if not Path(path).is_file():
            raise UserError(f"{flag} {path}: no such file")
        data.load_conversations(path, args.data_format, args.prompt_column, args.response_column, empty_response=args.empty_response)

    if args.validation_file:
        check(args.validation_file, "--validation_file")
    if fed.partition == "files":
        files = fed.client_file_list()
        for path in files:
            check(path, "--client_files")
        return files
    if not args.train_file:
        raise UserError(f"--partition {fed.partition} splits --train_file, which is required (or use --partition files)")
    check(args.train_file, "--train_file")
    records = data.read_records(args.train_file)
    if len(records) < fed.num_clients:
        raise UserError(f"--train_file {args.train_file}: {len(records)} records for --num_clients {fed.num_clients}; "
                        "every client needs at least one")
    if fed.partition == "iid":
        shares = split_iid(len(records), fed.num_clients, run.training.seed)
    else:
        shares = split_by_field(records, fed.partition[len("field:"):], fed.num_clients)
    folder = run.output_dir / PARTITION_DIR
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for client, indices in enumerate(shares):
        path = folder / f"client-{client}.jsonl"
        path.write_text("".join(json.dumps(records[i].value, ensure_ascii=False) + "\n" for i in indices), encoding="utf-8")
        files.append(str(path))
    return files


def simulated_client_file(run: FederatedRun, client: int) -> str:
    """A simulated client's data: its --client_files entry, else the share `client_data_files` wrote for it."""
    if run.federated.partition == "files":
        return run.federated.client_file_list()[client]
    return str(run.output_dir / PARTITION_DIR / f"client-{client}.jsonl")


def split_iid(num_records: int, num_clients: int, seed: int) -> list[list[int]]:
    """Record indices shuffled with `seed` and dealt into `num_clients` shares whose sizes differ by at most one."""
    order = list(range(num_records))
    random.Random(seed).shuffle(order)
    return [sorted(order[client::num_clients]) for client in range(num_clients)]


def split_by_field(records, name: str, num_clients: int) -> list[list[int]]:
    """Record indices grouped by the value of field `name`; each group goes whole to one client (the
    largest group first, to the client with the fewest records so far), so clients see different data."""
    groups: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        if name not in record.value:
            raise UserError(f"{record.where}: no field {name!r} (needed by --partition field:{name})")
        groups.setdefault(json.dumps(record.value[name], ensure_ascii=False, sort_keys=True), []).append(index)
    if len(groups) < num_clients:
        raise UserError(f"--partition field:{name}: the field has {len(groups)} distinct values, fewer than "
                        f"--num_clients {num_clients}")
    shares: list[list[int]] = [[] for _ in range(num_clients)]
    for _, indices in sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])):
        min(shares, key=len).extend(indices)
    return [sorted(share) for share in shares]


# --- What travels: the adapter's tensors, nothing of the base ---------------------------------------


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapter's tensors (PEFT's names, as in adapter_model.safetensors), detached CPU copies."""
    return {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in get_peft_model_state_dict(model).items()}


def load_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    """Put adapter tensors (from `adapter_state`, here or at another site) into `model`'s adapter."""
    expected = set(adapter_state(model))
    if set(state) != expected:
        raise ValueError(f"the adapter received does not fit this model: {len(set(state) ^ expected)} tensor names differ")
    set_peft_model_state_dict(model, state)


# --- Client side -----------------------------------------------------------------------------------


def load_adapted_model(run: FederatedRun, model_path: str | None):
    """Model path, tokenizer, template and base model with the run's adapter attached, as train_lora.py
    loads them; `model_path` (a site's own copy of the base) overrides --model_name_or_path. Seeded, so
    the server and every client start from the same adapter layout and values."""
    path = modeling.resolve_model_path(model_path or run.model.model_name_or_path)
    tokenizer = load_tokenizer(path, run.model.trust_remote_code)
    template = get_template(tokenizer, run.data.template)
    model = modeling.load_model(
        path, run.dtype, run.model.trust_remote_code, run.model.quantization_bit, unmap_freed_memory=run.model.unmap_freed_memory
    )
    set_seed(run.training.seed)
    return path, tokenizer, template, modeling.attach_adapter(model, run.finetuning, run.training.gradient_checkpointing)


class ClientTrainer(SupervisedTrainer):
    """SupervisedTrainer for one round of a client's local training: the federation's learning-rate
    schedule, and FedProx's mu/2·||w − w_global||² added to the loss over the trainable weights.

    Schedule: a round's local steps are steps (round − 1)·n … round·n − 1 of one schedule over
    num_rounds·n steps, so warmup happens once and the decay runs across rounds, step for step as
    train_lora.py's schedule over the same total steps (a schedule restarted every round would warm up
    and decay again in each one).

    FedProx: w_global is the adapter as received this round (the weights when the trainer is built), so
    each optimizer step's gradient gains mu·(w − w_global). The Trainer sums micro-batch losses over
    gradient accumulation, so the term is divided by the accumulation steps to count once per step.
    """

    def __init__(self, *args, server_round: int = 1, num_rounds: int = 1, proximal_mu: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.server_round, self.num_rounds = server_round, num_rounds
        self.proximal_mu = proximal_mu
        trained = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.global_weights = {n: p.detach().clone() for n, p in trained.items()} if proximal_mu else {}

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            scheduler = super().create_scheduler(num_training_steps * self.num_rounds, optimizer)
            with warnings.catch_warnings():  # stepping before any optimizer step is the point here
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(num_training_steps * (self.server_round - 1)):
                    scheduler.step()
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not (self.proximal_mu and model.training):
            return result
        loss, outputs = result if return_outputs else (result, None)
        distance = sum(
            (param - self.global_weights[name]).pow(2).sum()
            for name, param in self.model.named_parameters() if name in self.global_weights
        )
        term = self.proximal_mu / 2 * distance
        if num_items_in_batch is not None:
            term = term / self.args.gradient_accumulation_steps
        loss = loss + term
        return (loss, outputs) if return_outputs else loss


class Site:
    """A client's base model with its adapter, tokenizer and template, loaded once per process and
    reused every round (each round overwrites the adapter with the global one)."""

    def __init__(self, run: FederatedRun, model_path: str | None):
        self.run = run
        self.model_path, self.tokenizer, self.template, self.model = load_adapted_model(run, model_path)
        self.datasets: dict[str, object] = {}

    def dataset(self, path: str):
        if path not in self.datasets:
            args = self.run.training
            self.datasets[path] = data.build_dataset(
                path, self.tokenizer, self.template, self.run.data, args.main_process_first, logger.info
            )
        return self.datasets[path]

    def train(self, global_state: dict[str, torch.Tensor], data_file: str, server_round: int, proximal_mu: float):
        """Local training from the global adapter; returns the new adapter, the number of examples and the mean loss."""
        load_adapter_state(self.model, global_state)
        dataset = self.dataset(data_file)
        fed = self.run.federated
        with tempfile.TemporaryDirectory(prefix="fora-client-") as work_dir:
            args = local_training_args(self.run.training, fed, work_dir, server_round)
            records = dataset
            if fed.local_steps is not None:
                per_round = fed.local_steps * args.train_batch_size * args.gradient_accumulation_steps
                records = dataset.select(round_indices(len(dataset), per_round, server_round, self.run.training.seed))
            trainer = ClientTrainer(
                model=self.model,
                args=args,
                train_dataset=records,
                data_collator=PaddingCollator.for_this_machine(self.tokenizer.pad_token_id),
                processing_class=self.tokenizer,
                server_round=server_round,
                num_rounds=fed.num_rounds,
                proximal_mu=proximal_mu,
            )
            result = trainer.train()
        return adapter_state(self.model), len(dataset), result.training_loss


def round_indices(num_records: int, per_round: int, server_round: int, seed: int) -> list[int]:
    """The records of a client's round: slice r of one stream of seeded shuffled passes over its data, so
    the rounds go through every record before any repeats, as train_lora.py's epochs do. Taking a round's
    first batches of a fresh order instead would draw with replacement and, under --group_by_length, always
    take the client's longest records (transformers puts the longest first)."""
    start = (server_round - 1) * per_round
    first_pass, offset = divmod(start, num_records)
    stream: list[int] = []
    while len(stream) < offset + per_round:
        generator = torch.Generator().manual_seed(seed + first_pass + len(stream) // num_records)
        stream += torch.randperm(num_records, generator=generator).tolist()
    return stream[offset:offset + per_round]


def local_training_args(training, fed: FederatedArguments, work_dir: str, server_round: int):
    """The run's TrainArguments for one round of local training: its length, and a seed per round for
    the order within the round's records (which records, `round_indices` decides). Under
    --server_optimizer adamw the run's optimizer is the server's, so a client takes plain, unclipped
    SGD steps at the constant --client_learning_rate."""
    args = quiet_training_args(training, work_dir)
    args.max_steps = fed.local_steps if fed.local_steps is not None else -1
    args.num_train_epochs = fed.local_epochs if fed.local_epochs is not None else args.num_train_epochs
    args.seed = args.data_seed = training.seed + server_round
    if fed.server_optimizer == "adamw":
        args.optim, args.learning_rate, args.lr_scheduler_type = "sgd", fed.client_learning_rate, "constant"
        args.warmup_steps = args.warmup_ratio = args.weight_decay = args.max_grad_norm = 0
    if args.gradient_checkpointing and args.gradient_checkpointing_kwargs is None:
        args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    return args


def quiet_training_args(training, work_dir: str):
    """A copy of the run's TrainArguments that writes nothing (no checkpoints, no reports) into `work_dir`,
    with train_lora.py's collator and loss settings."""
    args = copy.deepcopy(training)
    args.output_dir = work_dir
    args.save_strategy = "no"
    args.eval_strategy = "no"
    args.report_to = []
    args.remove_unused_columns = False  # the collator picks its columns, as in train_lora.py
    args.logging_nan_inf_filter = False  # SupervisedTrainer stops at the first NaN/inf loss itself
    return args


_sites: dict[tuple, Site] = {}  # per process: the simulation reuses its workers across rounds and clients


def site_for(run: FederatedRun, argv: list[str], model_path: str | None) -> Site:
    key = (tuple(argv), model_path)
    if key not in _sites:
        _sites.clear()  # one base model per process
        _sites[key] = Site(run, model_path)
    return _sites[key]


def make_client_app(argv: list[str] | None = None):
    """The ClientApp. `argv`: the flags (simulation); None: read them from the run config (deployment)."""
    app = ClientApp(mods=[clip_when_asked])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        flags = argv if argv is not None else argv_from_run_config(context.run_config)
        node = context.node_config
        client = int(node.get(NODE_PARTITION, 0))
        try:
            run = parse(flags)
            data_file = node.get(NODE_DATA_FILE) or simulated_client_file(run, client)
            site = site_for(run, flags, node.get(NODE_MODEL_PATH))
            config = msg.content[CONFIG]
            state, num_examples, loss = site.train(
                msg.content[ARRAYS].to_torch_state_dict(), str(data_file), int(config["server-round"]),
                float(config.get("proximal-mu", 0.0)),
            )
        except Exception as error:  # the server's log names the client; the chain keeps the traceback
            raise ClientFailed(f"client {client}: {type(error).__name__}: {error}") from error
        reply = MetricRecord({NUM_EXAMPLES: num_examples, "train-loss": float(loss), "client": client})
        return Message(RecordDict({ARRAYS: ArrayRecord(state), METRICS: reply}), reply_to=msg)

    return app


def clip_when_asked(msg, context, call_next):
    """A ClientApp mod: Flower's client-side update clipping (fixedclipping_mod) when the server's
    config carries a clipping norm (--dp_clipping_norm), else nothing."""
    config = msg.content.config_records.get(CONFIG)
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


class ClientFailed(RuntimeError):
    """A client's round failed; the message starts with `client N:`, which the server's log repeats."""


class FederationFailed(RuntimeError):
    """No round changed the global adapter: every round had fewer than --min_fit_clients client updates."""


# --- Server side -----------------------------------------------------------------------------------


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


class GlobalAdapter:
    """The server's copy of base + adapter: the initial adapter, one saved folder per round, and evaluation."""

    def __init__(self, run: FederatedRun):
        self.run = run
        self.model_path, self.tokenizer, self.template, self.model = load_adapted_model(run, None)
        self.base_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters() if not p.requires_grad)
        self.evaluator = None
        if run.data.validation_file:
            eval_args = quiet_training_args(run.training, str(run.output_dir))
            dataset = data.build_dataset(
                run.data.validation_file, self.tokenizer, self.template, run.data, run.training.main_process_first, logger.info
            )
            self.evaluator = SupervisedTrainer(
                model=self.model, args=eval_args, eval_dataset=dataset, processing_class=self.tokenizer,
                data_collator=PaddingCollator.for_this_machine(self.tokenizer.pad_token_id),
            )

    def save(self, folder: Path, state: dict[str, torch.Tensor], server_round: int) -> None:
        """The adapter in train_lora.py's format (PEFT files, tokenizer, fora_run.json), written to a
        staging folder and renamed into place, so a reader never finds half an adapter."""
        load_adapter_state(self.model, state)
        staging = folder / f"{STAGING_PREFIX}adapter"
        shutil.rmtree(staging, ignore_errors=True)  # left by a save that was killed midway
        self.model.save_pretrained(str(staging))
        save_base_tokenizer(self.model_path, staging, self.run.model.trust_remote_code)
        self.run_record(server_round).save(staging)
        for path in staging.iterdir():
            os.replace(path, folder / path.name)
        staging.rmdir()

    def run_record(self, server_round: int) -> RunRecord:
        run, fed = self.run, self.run.federated
        federation = {
            "round": server_round,
            "num_rounds": fed.num_rounds,
            "num_clients": fed.num_clients,
            "partition": fed.partition,
            "local_steps": fed.local_steps,
            "local_epochs": fed.local_epochs,
            "proximal_mu": fed.proximal_mu,
            "server_learning_rate": fed.server_learning_rate,
            "server_momentum": fed.server_momentum,
            "server_optimizer": fed.server_optimizer,
            "client_learning_rate": fed.client_learning_rate if fed.server_optimizer == "adamw" else None,
            "dp_noise_multiplier": fed.dp_noise_multiplier,
            "dp_clipping_norm": fed.dp_clipping_norm,
        }
        return RunRecord.of_training(
            self.model_path, run.model, run.data, run.finetuning, self.template.name, federated=federation
        )

    def evaluate(self, state: dict[str, torch.Tensor]) -> dict[str, float]:
        """Eval loss on --validation_file (the Trainer's, as train_lora.py reports it); with --eval_generate
        also ROUGE-L and BLEU-4 of greedy answers, generated and scored by the prediction code."""
        if self.evaluator is None:
            return {}
        load_adapter_state(self.model, state)
        scores = {"eval_loss": self.evaluator.evaluate()["eval_loss"]}
        if self.run.federated.eval_generate:
            args = self.run.data
            conversations, _ = data.load_conversations(
                args.validation_file, args.data_format, args.prompt_column, args.response_column, require_response=False
            )
            prompts = [generate.build_prompt(self.tokenizer, self.template, c, args.max_source_length, args.max_target_length)[0]
                       for c in conversations]
            stop_ids = self.template.stop_token_ids(self.tokenizer)
            self.model.eval()
            new_ids = generate.generate_ids(
                self.model, self.tokenizer, prompts, stop_ids, args.max_target_length,
                self.run.training.per_device_eval_batch_size, generate.generation_config(self.tokenizer, stop_ids), progress=False,
            )
            scored = metrics.score_predictions([generate.decode(self.tokenizer, ids) for ids in new_ids],
                                               [c.turns[-1][1] for c in conversations])
            scores.update({key: scored[key] for key in ("rouge-l", "bleu-4") if key in scored})
        return scores


class History:
    """federated_history.json and one plot per metric, rewritten after every round."""

    def __init__(self, output_dir: Path, base_bytes: int):
        self.output_dir = output_dir
        self.record = {"base_model_bytes": base_bytes, "rounds": []}

    def add(self, entry: dict) -> None:
        self.record["rounds"].append(entry)
        write_json(self.output_dir / HISTORY_FILE, self.record)
        self.plot()

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        rounds = self.record["rounds"]
        for metric in ("eval_loss", "rouge-l", "bleu-4"):
            points = [(r["round"], r[metric]) for r in rounds if metric in r]
            if not points:
                continue
            figure, axes = plt.subplots(figsize=(6, 4))
            axes.plot(*zip(*points), marker="o")
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            axes.set_xlabel("round")
            axes.set_ylabel(metric)
            axes.set_title(f"global adapter: {metric} per round")
            axes.grid(alpha=0.3)
            figure.tight_layout()
            figure.savefig(self.output_dir / f"federated_{metric.replace('-', '_')}.png")
            plt.close(figure)


def serve(grid, argv: list[str]) -> None:
    """The ServerApp's body: initial adapter, the rounds, a saved and evaluated adapter after each."""
    run = parse(argv)
    fed = run.federated
    refuse_previous_run(run)
    run.output_dir.mkdir(parents=True, exist_ok=True)
    server = GlobalAdapter(run)
    history = History(run.output_dir, server.base_bytes)
    initial = adapter_state(server.model)
    averaging = AdapterAveraging(fed.min_fit_clients, fed.proximal_mu, fed.server_learning_rate, fed.server_momentum,
                                 ServerAdamW(run.training, fed, initial) if fed.server_optimizer == "adamw" else None)
    strategy = averaging
    if fed.dp_noise_multiplier is not None:
        strategy = DifferentialPrivacyClientSideFixedClipping(
            averaging, fed.dp_noise_multiplier, fed.dp_clipping_norm, num_sampled_clients=fed.num_clients
        )
    logger.info("Global adapter: %d tensors, %d bytes; the base model stays at every site (%d bytes)",
                len(initial), ArrayRecord(initial).count_bytes(), server.base_bytes)

    def end_of_round(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        state = arrays.to_torch_state_dict()
        if server_round:
            (run.output_dir / f"round-{server_round}").mkdir(exist_ok=True)
            server.save(run.output_dir / f"round-{server_round}", state, server_round)
        scores = server.evaluate(state)
        entry = {"round": server_round, **scores, **averaging.rounds.get(server_round, {})}
        history.add(entry)
        logger.info("round %d: %s", server_round, ", ".join(f"{k} {v:.4f}" for k, v in scores.items()) or "no --validation_file")
        for client in entry.get("clients", []):
            logger.info("round %d: client %d trained on %d examples (loss %.4f), received %d and sent %d bytes "
                        "(base model: %d bytes, never sent)", server_round, client["client"], client["num_examples"],
                        client["train_loss"], client["download_bytes"], client["upload_bytes"], server.base_bytes)
        return MetricRecord(scores)

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial),
        num_rounds=fed.num_rounds,
        timeout=fed.round_timeout,
        evaluate_fn=end_of_round,
    )
    failure = averaging.no_update_reason()
    if failure:  # the initial adapter must not pass for a trained one
        raise FederationFailed(failure)
    server.save(run.output_dir, result.arrays.to_torch_state_dict(), fed.num_rounds)
    logger.info("Global adapter saved to %s (one per round in %s/round-N); history: %s",
                run.output_dir, run.output_dir, run.output_dir / HISTORY_FILE)


def make_server_app(argv: list[str] | None = None):
    """The ServerApp. `argv`: the flags (simulation); None: read them from the run config (deployment)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, argv if argv is not None else argv_from_run_config(context.run_config))

    return app


def simulate(run: FederatedRun, argv: list[str]) -> None:
    """Run the apps in Flower's simulation engine: one virtual SuperNode per client, in Ray workers."""
    if importlib.util.find_spec("ray") is None:
        raise UserError('the simulation engine needs Ray: pip install "flwr[simulation]" (or deploy with a SuperLink; see README)')
    from flwr.simulation import run_simulation

    # Ray's workers import this package (the ClientApp's code) from the repository.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(modeling.REPO), os.environ.get("PYTHONPATH")]))
    fed = run.federated
    gpus = 1.0 / fed.num_clients if torch.cuda.is_available() else 0.0
    run_simulation(
        server_app=make_server_app(argv),
        client_app=make_client_app(argv),
        num_supernodes=fed.num_clients,
        backend_config={"client_resources": {"num_cpus": fed.client_cpus, "num_gpus": gpus}},
    )


# The apps a deployment loads by name (federated_app/pyproject.toml); they read their flags from the run config.
server_app = make_server_app()
client_app = make_client_app()
