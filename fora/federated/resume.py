"""Resuming a federated run that stopped (`--resume_from_round auto|N`).

After every round the server writes what the rounds after it need into OUTPUT_DIR/round-N/, beside that
round's adapter: the global adapter as sent (server_state.safetensors, with FedAvgM's momentum or the
server AdamW's moments) and the rest (server_state.json: the round, the history so far, the server
AdamW's step and schedule, the privacy accountant's ledger). The JSON file is written last, so a round
that has it is whole. The clients keep nothing between rounds: which records a client trains on in round
r follows from r and --seed (`partition.round_indices`), so a resumed run's clients take up their data
streams where the stopped run left them.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fora.errors import UserError
from fora.io import write_json

STATE_JSON, STATE_TENSORS = "server_state.json", "server_state.safetensors"


@dataclass
class SavedRound:
    """What a resumed server starts from."""

    round: int
    adapter: dict[str, torch.Tensor]
    tensors: dict[str, torch.Tensor]
    record: dict


def round_to_resume(output_dir: Path, wanted: str, num_rounds: int) -> int:
    """The round a --resume_from_round of `wanted` (auto: the last whole one) continues from; a UserError
    when there is none, or when the run had ended."""
    whole = sorted(int(found.group(1)) for folder in output_dir.glob("round-*")
                   if (found := re.fullmatch(r"round-(\d+)", folder.name)) and (folder / STATE_JSON).is_file())
    if not whole:
        raise UserError(f"--resume_from_round {wanted}: {output_dir} holds no round saved whole (round-N/{STATE_JSON})")
    chosen = whole[-1] if wanted == "auto" else int(wanted)
    if chosen not in whole:
        raise UserError(f"--resume_from_round {wanted}: {output_dir}/round-{chosen}/{STATE_JSON} is missing "
                        f"(rounds saved whole: {', '.join(map(str, whole))})")
    if chosen >= num_rounds:
        raise UserError(f"--resume_from_round {wanted}: round {chosen} is the run's last (--num_rounds {num_rounds}); "
                        "raise --num_rounds to train on")
    return chosen


def save_round(folder: Path, server_round: int, adapter: dict[str, torch.Tensor], averaging, ledger, history: dict) -> None:
    """Everything the rounds after `server_round` need, beside its adapter in `folder`."""
    tensors = {f"adapter/{name}": tensor.contiguous() for name, tensor in adapter.items()}
    record: dict = {"round": server_round, "history": history, "privacy": ledger.state() if ledger else None}
    if averaging.momentum_vector is not None:  # FedAvgM's, in the order of the adapter's tensors
        tensors.update({f"momentum/{name}": torch.from_numpy(np.array(value))
                        for name, value in zip(adapter, averaging.momentum_vector)})
    if averaging.server_adamw is not None:
        moments, record["server_adamw"] = averaging.server_adamw.state()
        tensors.update({f"adamw/{name}": value for name, value in moments.items()})
    partial = folder / f".{STATE_TENSORS}.partial"
    save_file(tensors, str(partial))
    partial.replace(folder / STATE_TENSORS)
    write_json(folder / STATE_JSON, record)


def load_round(output_dir: Path, server_round: int) -> SavedRound:
    folder = output_dir / f"round-{server_round}"
    record = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
    tensors = load_file(str(folder / STATE_TENSORS))
    adapter = {name[len("adapter/"):]: value for name, value in tensors.items() if name.startswith("adapter/")}
    return SavedRound(server_round, adapter, tensors, record)


def restore(saved: SavedRound, averaging, ledger) -> None:
    """Put the server's state after `saved.round` back into the strategy and the privacy ledger."""
    from flwr.app import ArrayRecord

    averaging.round_offset = saved.round
    averaging.current_arrays = ArrayRecord(saved.adapter)
    momentum = [saved.tensors[f"momentum/{name}"].numpy() for name in saved.adapter if f"momentum/{name}" in saved.tensors]
    averaging.momentum_vector = momentum or None
    if averaging.server_adamw is not None:
        moments = {name[len("adamw/"):]: value for name, value in saved.tensors.items() if name.startswith("adamw/")}
        averaging.server_adamw.load(moments, saved.record["server_adamw"])
    if ledger is not None:
        ledger.load(saved.record["privacy"])
