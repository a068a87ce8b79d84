"""estimate_memory.py: the memory a training run needs per device, from the run's own flags (or argument file),
as a table or one JSON object.

    python estimate_memory.py --model_name_or_path llama-2-7b-chat --lora_rank 8 --fp16 --device cuda --device_memory 24GB
    python estimate_memory.py args.yaml --json
"""

import dataclasses
import json

import torch

from fora.errors import note_once
from fora.memory.decide import cheapest_change, device_memory, largest_batch
from fora.memory.device import gib, parse_size
from fora.memory.estimate import Estimate, Setting, estimate, with_changes
from fora.memory.plan import parse, records_from_data, setting, world_size


def main(argv: list[str] | None = None) -> dict:
    memory_args, model_args, data_args, finetuning_args, training_args, cuda = parse(argv)
    devices = world_size(memory_args.num_devices)
    records = None
    if data_args.train_file:
        from fora.memory.census import is_model_folder
        from fora.models.load import resolve_model_path

        name = model_args.model_name_or_path
        if name is None or is_model_folder(name):
            records = records_from_data(resolve_model_path(name), model_args, data_args, training_args)
        else:
            note_once(f"note: --train_file: {name} is a built-in name without a tokenizer here; the longest batch is taken "
                      "at --max_source_length + --max_target_length")
    s = setting(model_args, data_args, finetuning_args, training_args, devices, cuda, records)
    if memory_args.device_memory:
        memory, source = parse_size(memory_args.device_memory, "--device_memory"), "--device_memory"
    elif cuda and not torch.cuda.is_available():
        memory, source = None, "no GPU on this machine: --device_memory gives the GPU's"
    else:
        memory, source = device_memory(cuda)
    if training_args.gradient_checkpointing == "auto":  # as training decides it (fora.memory.decide.gradient_checkpointing)
        needs = memory is not None and estimate(with_changes(s, checkpointing=False)).total > memory
        s = with_changes(s, checkpointing=needs and s.method != "prefix")
    result = answer(s, estimate(s), memory, source, training_args.gradient_checkpointing == "auto")
    print(json.dumps(result) if memory_args.json else table(s, result))
    return result


def answer(s: Setting, est: Estimate, memory: int | None, source: str, auto: bool) -> dict:
    """The estimate and what follows from it, as one JSON-able dict (total_bytes: the total)."""
    from fora.tuners.methods import METHODS

    fitting = None if memory is None else est.total <= memory
    change = None if fitting in (None, True) else cheapest_change(s, memory, METHODS[s.method].quantized)
    return {
        "total_bytes": est.total,
        "lines": dict(est.lines),
        "peak_at": est.peak_at,
        "activations_without_checkpointing_bytes": est.activations_without_checkpointing,
        "activations_with_checkpointing_bytes": est.activations_with_checkpointing,
        "device_memory_bytes": memory,
        "device_memory_source": source,
        "fits": fitting,
        "largest_batch": None if memory is None else largest_batch(s, memory),
        "cheapest_change": dataclasses.asdict(change) if change else None,
        "run": {
            "model_type": s.architecture.model_type, "parameters": s.census.total, "trainable_parameters": s.census.trainable,
            "method": s.method, "quantization_bit": s.quantization_bit, "weight_bytes": s.dtype_bytes, "mixed_precision": s.mixed,
            "batch": s.batch, "length": s.length, "trained_positions": s.supervised, "gradient_checkpointing": s.checkpointing,
            "gradient_checkpointing_auto": auto, "optimizer": s.optimizer, "zero_stage": s.zero_stage, "devices": s.devices,
            "device": "cuda" if s.cuda else "cpu", "loss": s.loss_path,
        },
    }


def table(s: Setting, result: dict) -> str:
    run = result["run"]
    precision = {4: "float32", 2: "16-bit"}[s.dtype_bytes] + (f", {s.mixed} mixed precision" if s.mixed else "")
    base = f"{s.quantization_bit}-bit base" if s.quantization_bit else precision
    zero = f", DeepSpeed ZeRO-{s.zero_stage} over {s.devices} devices" if s.zero_stage else f", {s.devices} device(s)" * (s.devices > 1)
    lines = [
        f"Memory per {'GPU' if s.cuda else 'CPU process'}: {s.architecture.model_type}, {run['parameters']:,} parameters; "
        f"{s.method} ({run['trainable_parameters']:,} trainable); {base}; batch {s.batch} x {s.length} tokens "
        f"({s.supervised} trained); checkpointing {'on' if s.checkpointing else 'off'}"
        f"{' (auto)' if run['gradient_checkpointing_auto'] else ''}; {s.optimizer}{zero}",
    ]
    notes = {
        "optimizer states": "partitioned by ZeRO" if s.zero_stage else "",
        "activations": f"longest batch; without checkpointing {gib(result['activations_without_checkpointing_bytes'])}, "
                       f"with {gib(result['activations_with_checkpointing_bytes'])}",
        "logits and loss": f"{s.loss_path} loss",
    }
    for name, size in result["lines"].items():
        lines.append(f"  {name:<28} {gib(size):>8} GiB  {notes.get(name, '')}".rstrip())
    lines.append(f"  {'total':<28} {gib(result['total_bytes']):>8} GiB  (the peak falls at the {result['peak_at']})")
    if result["fits"] is None:
        lines.append(f"Fits: unknown ({result['device_memory_source']})")
        return "\n".join(lines)
    memory = f"{gib(result['device_memory_bytes'])} GiB ({result['device_memory_source']})"
    lines.append(f"Fits {memory}: {'yes' if result['fits'] else 'no'}; the largest batch that fits: {result['largest_batch'] or 'none'}")
    if not result["fits"]:
        change = result["cheapest_change"]
        lines.append(f"Cheapest change that fits: {change['flags']} ({change['why']}: {gib(change['total'])} GiB)" if change
                     else "No change tried here fits it: more devices with --deepspeed (ZeRO), or a larger device")
    return "\n".join(lines)
