"""Which records each client trains on: the run's training file split across the clients (or each client's
own file), and a client's records per round, one stream of shuffled passes across rounds."""

import json
from pathlib import Path

import torch

from fora.data.formats import load_conversations
from fora.data.records import read_records
from fora.errors import UserError
from fora.federated.run import PARTITION_DIR, FederatedRun


def client_data_files(run: FederatedRun) -> list[str]:
    """One checked data file per client: --client_files as given, or --train_file split and written to
    OUTPUT_DIR/partitions/client-N.jsonl. Every mistake is a UserError here, before any model loads."""
    fed, args = run.federated, run.data

    def check(path: str, flag: str) -> None:
        if not Path(path).is_file():
            raise UserError(f"{flag} {path}: no such file")
        load_conversations(path, args.data_format, args.prompt_column, args.response_column, empty_response=args.empty_response)

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
    records = read_records(args.train_file)
    if len(records) < fed.num_clients:
        raise UserError(f"--train_file {args.train_file}: {len(records)} records for --num_clients {fed.num_clients}; "
                        "every client needs at least one")
    if fed.partition == "iid":
        shares = split_iid(len(records), fed.num_clients, run.training.seed)
    elif fed.partition.startswith("field:"):
        shares = split_by_field(records, fed.partition[len("field:"):], fed.num_clients)
    else:
        alpha, name = fed.dirichlet()
        shares = split_dirichlet(records, name, alpha, fed.num_clients, run.training.seed)
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
    """Record indices shuffled with `seed` and cut into `num_clients` shares whose sizes differ by at most one
    (Flower Datasets' IidPartitioner over the shuffled records)."""
    from flwr_datasets.partitioner import IidPartitioner

    partitioner = IidPartitioner(num_partitions=num_clients)
    partitioner.dataset = _indices(num_records).shuffle(seed=seed)
    return [sorted(partitioner.load_partition(client)["index"]) for client in range(num_clients)]


def split_dirichlet(records, name: str, alpha: float, num_clients: int, seed: int) -> list[list[int]]:
    """Record indices spread so that each value of field `name` goes to the clients in Dirichlet(alpha)
    proportions (Flower Datasets' DirichletPartitioner, seeded), every client with at least one record."""
    from flwr_datasets.partitioner import DirichletPartitioner

    labels = [json.dumps(_field(record, name, f"dirichlet:{alpha:g}:{name}"), ensure_ascii=False, sort_keys=True)
              for record in records]
    partitioner = DirichletPartitioner(num_partitions=num_clients, partition_by="label", alpha=alpha, min_partition_size=1,
                                       self_balancing=False, shuffle=True, seed=seed)
    partitioner.dataset = _indices(len(records)).add_column("label", labels)
    try:
        return [sorted(partitioner.load_partition(client)["index"]) for client in range(num_clients)]
    except ValueError as error:  # it draws again while a client is left empty, then gives up
        raise UserError(f"--partition dirichlet:{alpha:g}:{name}: {len(records)} records left a client empty in every "
                        f"draw ({error}); raise ALPHA or use fewer clients") from None


def _indices(count: int):
    import datasets

    return datasets.Dataset.from_dict({"index": list(range(count))})


def _field(record, name: str, partition: str):
    if name not in record.value:
        raise UserError(f"{record.where}: no field {name!r} (needed by --partition {partition})")
    return record.value[name]


def split_by_field(records, name: str, num_clients: int) -> list[list[int]]:
    """Record indices grouped by the value of field `name`; each group goes whole to one client (the
    largest group first, to the client with the fewest records so far), so clients see different data. (Flower
    Datasets' NaturalIdPartitioner makes one client per value; this groups values when they outnumber the clients.)"""
    groups: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        value = _field(record, name, f"field:{name}")
        groups.setdefault(json.dumps(value, ensure_ascii=False, sort_keys=True), []).append(index)
    if len(groups) < num_clients:
        raise UserError(f"--partition field:{name}: the field has {len(groups)} distinct values, fewer than "
                        f"--num_clients {num_clients}")
    shares: list[list[int]] = [[] for _ in range(num_clients)]
    for _, indices in sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])):
        min(shares, key=len).extend(indices)
    return [sorted(share) for share in shares]


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
