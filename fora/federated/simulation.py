"""train_federated.py: every flag and data file checked before Flower starts, then both apps in Flower's
simulation engine (one virtual SuperNode per client, in Ray workers)."""

import importlib.util
import os
import sys

import torch

from fora.errors import UserError
from fora.federated.client_app import make_client_app
from fora.federated.partition import client_data_files
from fora.federated.run import FederatedRun, parse, refuse_previous_run
from fora.federated.server_app import make_server_app
from fora.federated.strategy import FederationFailed
from fora.models.load import resolve_model_path


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # Everything a user can get wrong is checked here, before Flower starts.
    run = parse(argv)
    run.training.precision.report()
    refuse_previous_run(run)
    resolve_model_path(run.model.model_name_or_path)
    files = client_data_files(run)
    print(f"Federated run: {run.federated.num_clients} clients ({run.federated.partition}), "
          f"{run.federated.num_rounds} rounds; client data: {', '.join(files)}")
    try:
        simulate(run, argv)
    except FederationFailed as error:  # Flower re-raises the ServerApp's exception here
        raise UserError(f"{error} (see the log above)") from error


def simulate(run: FederatedRun, argv: list[str]) -> None:
    """Run the apps in Flower's simulation engine: one virtual SuperNode per client, in Ray workers."""
    if importlib.util.find_spec("ray") is None:
        raise UserError('the simulation engine needs Ray: pip install "flwr[simulation]" (or deploy with a SuperLink; see README)')
    from flwr.simulation import run_simulation

    fed = run.federated
    gpus = 1.0 / fed.num_clients if torch.cuda.is_available() else 0.0
    run_simulation(
        server_app=make_server_app(argv),
        client_app=make_client_app(argv),
        num_supernodes=fed.num_clients,
        backend_config={"client_resources": {"num_cpus": fed.client_cpus, "num_gpus": gpus}},
    )
