"""train_federated.py: every flag and data file checked before Flower starts, then both apps in Flower's
simulation engine (one virtual SuperNode per client, in Ray workers)."""

import importlib.util
import os
import sys

import torch

from fora.errors import UserError
from fora.federated import resume
from fora.federated.client_app import make_client_app
from fora.federated.partition import client_data_files
from fora.federated.run import FederatedRun, parse, refuse_previous_run
from fora.federated.server_app import make_server_app
from fora.federated.strategy import FederationFailed
from fora.models.load import resolve_model_path


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    client_gpus = place_server_on_its_own_gpu()  # before anything starts CUDA in this process
    # Everything a user can get wrong is checked here, before Flower starts.
    run = parse(argv)
    run.training.precision.report()
    if run.federated.resume_from_round:
        resume.round_to_resume(run.output_dir, run.federated.resume_from_round, run.federated.num_rounds)
    else:
        refuse_previous_run(run)
    resolve_model_path(run.model.model_name_or_path)
    files = client_data_files(run)
    print(f"Federated run: {run.federated.num_clients} clients ({run.federated.partition}), "
          f"{run.federated.num_rounds} rounds; client data: {', '.join(files)}")
    try:
        simulate(run, argv, client_gpus)
    except FederationFailed as error:  # Flower re-raises the ServerApp's exception here
        raise UserError(f"{error} (see the log above)") from error


def simulate(run: FederatedRun, argv: list[str], client_gpus: list[str]) -> None:
    """Run the apps in Flower's simulation engine: one virtual SuperNode per client, in Ray workers, each
    holding --client_gpus of one of `client_gpus` (Ray places them; it sets each worker's CUDA_VISIBLE_DEVICES)."""
    if importlib.util.find_spec("ray") is None:
        raise UserError('the simulation engine needs Ray: pip install "flwr[simulation]" (or deploy with a SuperLink; see README)')
    from flwr.simulation import run_simulation

    fed = run.federated
    share = fed.client_gpus if fed.client_gpus is not None else (1.0 if client_gpus else 0.0)
    if share and not client_gpus:
        raise UserError(f"--client_gpus {share}: no GPU is visible to the simulation")
    if share:
        print(f"Simulated clients: {share:g} of a GPU each on GPU(s) {','.join(client_gpus)}, "
              f"{int(len(client_gpus) // share)} at a time")
    run_simulation(
        server_app=make_server_app(argv),
        client_app=make_client_app(argv),
        num_supernodes=fed.num_clients,
        backend_config={"client_resources": {"num_cpus": fed.client_cpus, "num_gpus": share},
                        "init_args": {"num_gpus": len(client_gpus)}},
    )


def place_server_on_its_own_gpu() -> list[str]:
    """The GPUs the simulated clients share, after the server's copy of the model has taken its own.

    With two or more visible GPUs, this process (the server's, which the Trainer otherwise spreads over every
    visible GPU with DataParallel) starts CUDA seeing only the last one, and Ray, started later in this
    process, is shown the others for the clients. CUDA reads CUDA_VISIBLE_DEVICES once, when it starts, so
    the order of the two steps is what keeps them apart. With one GPU the server and the clients share it."""
    visible = visible_gpus()
    if len(visible) < 2:
        return visible
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[-1]
    torch.cuda.init()
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible[:-1])
    print(f"The server's copy of the model: GPU {visible[-1]}; the clients: GPU(s) {','.join(visible[:-1])}")
    return visible[:-1]


def visible_gpus() -> list[str]:
    """The GPUs this process may use, by CUDA_VISIBLE_DEVICES's names, without starting CUDA."""
    count = torch.cuda.device_count()  # NVML's count, which honours CUDA_VISIBLE_DEVICES and starts nothing
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [name.strip() for name in listed.split(",") if name.strip()] if listed is not None else [str(i) for i in range(count)]
    return names[:count]
