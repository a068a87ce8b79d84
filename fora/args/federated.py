"""Flags of train_federated.py, on top of train_lora.py's: who trains on what, for how many rounds."""

from dataclasses import dataclass, field
from typing import Literal

from fora.errors import UserError


@dataclass
class FederatedArguments:
    """Flags of train_federated.py, on top of train_lora.py's: who trains on what, for how many rounds.

    `--validation_file` (DataArguments) is the server's held-out set: the global adapter is scored on it
    before the first round and after every round.
    """

    num_clients: int = field(
        default=2,
        metadata={"help": "Clients (sites) the training data is split across. With --partition files: one per --client_files entry."},
    )
    num_rounds: int = field(
        default=3, metadata={"help": "Federated rounds: every client trains locally, then the server averages the adapters."}
    )
    local_steps: int | None = field(
        default=None,
        metadata={"help": "Optimizer steps each client takes per round (default when --local_epochs is not given: 10)."},
    )
    local_epochs: float | None = field(
        default=None, metadata={"help": "Passes over its own data each client makes per round, instead of --local_steps."}
    )
    partition: str = field(
        default="iid",
        metadata={
            "help": "How --train_file is split across clients: iid (shuffled with --seed, equal shares; Flower Datasets' "
            "IidPartitioner), dirichlet:ALPHA:NAME (each value of the record field NAME spread over the clients in "
            "Dirichlet(ALPHA) proportions, seeded; Flower Datasets' DirichletPartitioner: a small ALPHA gives clients "
            "very different data), field:NAME (every value of the field NAME goes whole to one client, the largest "
            "first to the client with the fewest records), or files (each client's own file, from --client_files)."
        },
    )
    client_files: str | None = field(
        default=None, metadata={"help": "Comma-separated data files, one per client, with --partition files."}
    )
    fraction_train: float = field(
        default=1.0,
        metadata={
            "help": "Fraction of the clients asked to train in each round, drawn at random without replacement "
            "(Flower's FedAvg sampling; at least --min_fit_clients)."
        },
    )
    min_fit_clients: int | None = field(
        default=None,
        metadata={
            "help": "Fewest clients whose update a round needs: a round starts once this many are connected, clients "
            "that fail or time out are named in the log and left out, and a round with fewer updates keeps the "
            "previous global adapter. Default: the clients a round asks (--fraction_train of --num_clients)."
        },
    )
    proximal_mu: float = field(
        default=0.0,
        metadata={
            "help": "FedProx: each client adds mu/2 * ||w - w_global||^2 over its adapter weights to its loss, which "
            "keeps clients with different data from drifting apart. 0 = plain FedAvg."
        },
    )
    server_learning_rate: float = field(
        default=1.0,
        metadata={
            "help": "FedAvgM's server step: the global adapter moves by this times the clients' example-weighted mean "
            "change. 1 = FedAvg (the new global adapter is the mean, which moves about as far as one client's "
            "local steps). Above 1 moves it further per round; a LoRA/FoRA product of factors then changes by "
            "about the square of it, so raise it in small steps."
        },
    )
    server_momentum: float = field(
        default=0.0, metadata={"help": "FedAvgM's server momentum: the fraction of the previous round's move added to this one. 0 = none."}
    )
    server_optimizer: Literal["fedavgm", "adamw"] = field(
        default="fedavgm",
        metadata={
            "help": "The server's step. fedavgm: Flower's FedAvgM (--server_learning_rate, --server_momentum; 1 and 0 "
            "are FedAvg), clients train with the run's optimizer. adamw: FedOpt (Reddi et al., 2021) with the run's "
            "optimizer moved to the server: each client takes plain SGD steps at --client_learning_rate, and the "
            "server reads the clients' example-weighted mean change, divided by that rate, as minus a gradient: "
            "clipped to --max_grad_norm, one AdamW step per round (--learning_rate, --lr_scheduler_type and its "
            "warmup over --num_rounds steps, --adam_beta1/2, --adam_epsilon, --weight_decay). With --local_steps 1 "
            "every round is one AdamW step on the example-weighted mean of the clients' batch gradients: a centralised "
            "run on batches of clients x batch size, but for how a batch is drawn (a share from each site) and weighted."
        },
    )
    client_learning_rate: float = field(
        default=0.01,
        metadata={
            "help": "With --server_optimizer adamw: the clients' constant SGD rate. With --local_steps 1 it cancels out "
            "(the server divides it away); with more local steps it sets how far a client drifts in a round."
        },
    )
    round_timeout: float = field(
        default=3600.0, metadata={"help": "Seconds the server waits for client updates in a round; late clients are dropped from it."}
    )
    eval_generate: bool = field(
        default=False,
        metadata={
            "help": "Also generate answers for --validation_file after every round and score them (ROUGE-L, BLEU-4, "
            "as predict_fora.py does). Slower than the eval loss alone."
        },
    )
    dp_noise_multiplier: float | None = field(
        default=None,
        metadata={
            "help": "Differential privacy (Flower's client-side fixed clipping): Gaussian noise of standard deviation "
            "noise_multiplier * clipping_norm / clients is added to the averaged update. Needs --dp_clipping_norm."
        },
    )
    dp_clipping_norm: float | None = field(
        default=None,
        metadata={"help": "Differential privacy: each client clips its update (its adapter minus the global one) to this L2 norm."},
    )
    dp_delta: float = field(
        default=1e-5,
        metadata={"help": "Differential privacy: the delta at which the privacy spent (epsilon) is reported after every round."},
    )
    resume_from_round: str | None = field(
        default=None,
        metadata={
            "help": "Continue a federated run in --output_dir from its last saved round (auto) or from round N: the "
            "global adapter, the server optimizer's state, the privacy spent and the history; the clients' records "
            "follow from the round number. Ends where the run would have ended uninterrupted."
        },
    )
    client_cpus: float = field(
        default=1.0,
        metadata={"help": "Simulation only: CPU cores reserved per simulated client; clients run in parallel as cores allow."},
    )
    client_gpus: float | None = field(
        default=None,
        metadata={
            "help": "Simulation only: share of one GPU each simulated client reserves (0.5: two clients per GPU), so "
            "clients spread over the visible GPUs as shares allow. Default: 1 with a GPU, 0 without. With two or "
            "more GPUs the server's copy of the model keeps the last one to itself."
        },
    )

    def __post_init__(self):
        for name in ("num_clients", "num_rounds"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.local_steps is not None and self.local_epochs is not None:
            raise UserError("give either --local_steps or --local_epochs, not both")
        if self.local_epochs is None and self.local_steps is None:
            self.local_steps = 10
        if self.local_steps is not None and self.local_steps < 1:
            raise UserError(f"--local_steps must be at least 1, got {self.local_steps}")
        if self.local_epochs is not None and self.local_epochs <= 0:
            raise UserError(f"--local_epochs must be positive, got {self.local_epochs}")
        if self.partition == "files":
            if not self.client_files:
                raise UserError("--partition files needs --client_files a.json,b.json,...")
            self.num_clients = len(self.client_file_list())
        elif self.client_files:
            raise UserError("--client_files goes with --partition files")
        elif self.partition != "iid" and not (self.partition.startswith("field:") and self.partition[len("field:"):]):
            self.dirichlet()  # the last form left; refused in one line when it is not one either
        if not 0 < self.fraction_train <= 1:
            raise UserError(f"--fraction_train must be in (0, 1], got {self.fraction_train}")
        if self.min_fit_clients is None:
            self.min_fit_clients = self.clients_per_round()
        if not 1 <= self.min_fit_clients <= self.num_clients:
            raise UserError(f"--min_fit_clients must be between 1 and --num_clients {self.num_clients}, got {self.min_fit_clients}")
        if self.proximal_mu < 0:
            raise UserError(f"--proximal_mu must not be negative, got {self.proximal_mu}")
        if self.server_learning_rate <= 0:
            raise UserError(f"--server_learning_rate must be positive, got {self.server_learning_rate}")
        if not 0 <= self.server_momentum < 1:
            raise UserError(f"--server_momentum must be in [0, 1), got {self.server_momentum}")
        if self.server_optimizer == "adamw":
            if (self.server_learning_rate, self.server_momentum) != (1.0, 0.0):
                raise UserError("--server_learning_rate and --server_momentum are FedAvgM's; with --server_optimizer "
                                "adamw the server steps at --learning_rate")
            if self.dp_noise_multiplier is not None:
                raise UserError("differential privacy goes with --server_optimizer fedavgm: Flower adds its noise after "
                                "the server's step, where under adamw it no longer masks the clients' mean update")
        if self.client_learning_rate <= 0:
            raise UserError(f"--client_learning_rate must be positive, got {self.client_learning_rate}")
        if self.round_timeout <= 0:
            raise UserError(f"--round_timeout must be positive, got {self.round_timeout}")
        if (self.dp_noise_multiplier is None) != (self.dp_clipping_norm is None):
            raise UserError("differential privacy needs both --dp_noise_multiplier and --dp_clipping_norm")
        if self.dp_noise_multiplier is not None and (self.dp_noise_multiplier < 0 or self.dp_clipping_norm <= 0):
            raise UserError("--dp_noise_multiplier must not be negative and --dp_clipping_norm must be positive")
        if not 0 < self.dp_delta < 1:
            raise UserError(f"--dp_delta must be in (0, 1), got {self.dp_delta}")
        if self.resume_from_round is not None and self.resume_from_round != "auto" and not self.resume_from_round.isdigit():
            raise UserError(f"--resume_from_round is auto or a round number, got {self.resume_from_round!r}")
        if self.client_cpus <= 0:
            raise UserError(f"--client_cpus must be positive, got {self.client_cpus}")
        if self.client_gpus is not None and self.client_gpus < 0:
            raise UserError(f"--client_gpus must not be negative, got {self.client_gpus}")

    def clients_per_round(self) -> int:
        """How many clients a round asks to train: --fraction_train of them, at least --min_fit_clients (Flower's
        FedAvg sampling: its fraction of the connected nodes, rounded down)."""
        return max(int(self.num_clients * self.fraction_train), self.min_fit_clients or 1)

    def dirichlet(self) -> tuple[float, str]:
        """(ALPHA, NAME) of --partition dirichlet:ALPHA:NAME."""
        kind, _, rest = self.partition.partition(":")
        alpha, _, name = rest.partition(":")
        try:
            value = float(alpha)
        except ValueError:
            value = 0.0
        if kind != "dirichlet" or value <= 0 or not name:
            raise UserError(f"--partition {self.partition!r} is unknown; choose iid, dirichlet:ALPHA:NAME (ALPHA > 0), "
                            "field:NAME or files")
        return value, name

    def client_file_list(self) -> list[str]:
        return [name.strip() for name in (self.client_files or "").split(",") if name.strip()]
