"""The ClientApp: a site loads its base once per process, receives the global adapter, trains it on its own
records for the round, and sends the adapter back with its number of examples and loss."""

import os
import tempfile
import time
import warnings

import torch
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common.constant import ErrorCode
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fora.args import FederatedArguments
from fora.data.collator import PaddingCollator
from fora.data.dataset import build_dataset
from fora.federated.partition import round_indices, simulated_client_file
from fora.federated.run import (
    ARRAYS,
    CONFIG,
    METRICS,
    NODE_DATA_FILE,
    NODE_PARTITION,
    NUM_EXAMPLES,
    FederatedRun,
    SiteRefusal,
    adapter_state,
    load_adapted_model,
    load_adapter_state,
    logger,
    parse,
    quiet_training_args,
    site_argv,
)
from fora.run import RunRecord
from fora.train.trainer import SupervisedTrainer


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
    """A client's base model with its adapter, tokenizer and template, loaded once per process and reused
    while the process lives (each round overwrites the adapter with the global one): across rounds in
    simulation, whose Ray workers live as long as the run; for one round in deployment."""

    def __init__(self, run: FederatedRun):
        self.run = run
        started = time.monotonic()
        self.model_path, self.tokenizer, self.template, self.model = load_adapted_model(run)
        # The method decides the training loss (METHODS' `loss`), as in train_lora.py
        self.record = RunRecord.of_training(self.model_path, run.model, run.data, run.finetuning, self.template.name)
        # Deployed, a site loads its base every round (Flower 1.42 starts a ClientApp process per message): the
        # log says what that costs
        logger.info("site: base model loaded from %s in %.1f s (process %d)", self.model_path, time.monotonic() - started,
                    os.getpid())
        self.datasets: dict[str, object] = {}

    def dataset(self, path: str):
        if path not in self.datasets:
            args = self.run.training
            self.datasets[path] = build_dataset(
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
                run_record=self.record,
                loraplus_lr_ratio=self.run.finetuning.loraplus_lr_ratio,
            )
            result = trainer.train()
        return adapter_state(self.model), len(dataset), result.training_loss


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

_sites: dict[tuple, Site] = {}  # per process: the simulation reuses its workers across rounds and clients


def site_for(run: FederatedRun, argv: list[str]) -> Site:
    key = tuple(argv)
    if key not in _sites:
        _sites.clear()  # one base model per process
        _sites[key] = Site(run)
    return _sites[key]


def make_client_app(argv: list[str] | None = None):
    """The ClientApp. `argv`: the flags (simulation: one user runs the server and every client); None: a
    deployed site, whose flags are the run config's training settings and its own node config."""
    app = ClientApp(mods=[clip_when_asked])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        node = context.node_config
        client = int(node.get(NODE_PARTITION, 0))
        try:
            flags = argv if argv is not None else site_argv(context.run_config, node)
            run = parse(flags)
            data_file = simulated_client_file(run, client) if argv is not None else site_data_file(node)
            site = site_for(run, flags)
            config = msg.content[CONFIG]
            state, num_examples, loss = site.train(
                msg.content[ARRAYS].to_torch_state_dict(), str(data_file), int(config["server-round"]),
                float(config.get("proximal-mu", 0.0)),
            )
        except SiteRefusal as refusal:  # the site's choice, not a failure: one line in its log, the reason in the reply
            logger.error("client %d: refused the run: %s", client, refusal)
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"client {client}: refused: {refusal}"),
                           reply_to=msg)
        except Exception as error:  # the server's log names the client; the chain keeps the traceback
            raise ClientFailed(f"client {client}: {type(error).__name__}: {error}") from error
        reply = MetricRecord({NUM_EXAMPLES: num_examples, "train-loss": float(loss), "client": client})
        return Message(RecordDict({ARRAYS: ArrayRecord(state), METRICS: reply}), reply_to=msg)

    return app


def site_data_file(node_config: dict) -> str:
    """A deployed site's data file, from its node config alone."""
    if not node_config.get(NODE_DATA_FILE):
        raise SiteRefusal(f"the node config has no {NODE_DATA_FILE} (the site's training data)")
    return str(node_config[NODE_DATA_FILE])


def clip_when_asked(msg, context, call_next):
    """A ClientApp mod: Flower's client-side update clipping (fixedclipping_mod) when the server's
    config carries a clipping norm (--dp_clipping_norm), else nothing."""
    config = msg.content.config_records.get(CONFIG)
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


class ClientFailed(RuntimeError):
    """A client's round failed; the message starts with `client N:`, which the server's log repeats."""



# The app a deployment loads by name (federated_app/pyproject.toml); it reads its flags from the run config.
app = make_client_app()
