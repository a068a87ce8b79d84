"""From a run's flags (train_lora.py's, parsed by the same dataclasses) to what its memory estimate reads: the model's
shape and census, the precision fora.precision decided, the longest batch, ZeRO's stage and the devices."""

import os
import sys

import torch

from fora.args.parsing import argument_file_flags, is_argument_file
from fora.data.encode import IGNORE_INDEX
from fora.errors import UserError
from fora.memory.architectures import BUILT_IN, Architecture, built_in_config
from fora.memory.census import SkeletonConfig, census, folder_config, is_model_folder
from fora.memory.device import resident_memory
from fora.memory.estimate import CUDA_CONTEXT, Setting
from fora.precision import DTYPE_NAMES


def parse(argv: list[str] | None):
    """(memory, model, data, finetuning, training arguments, cuda) from estimate_memory.py's flags."""
    import argparse

    from fora.args import DataArguments, FinetuningArguments, ModelArguments, TrainArguments, parse_args
    from fora.args.memory import MemoryArguments
    from fora.cli import with_paged_optimizer

    argv = list(sys.argv[1:] if argv is None else argv)
    given = argument_file_flags(argv[0]) + argv[1:] if is_argument_file(argv) else argv
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--device", default="auto")
    early.add_argument("--qlora", nargs="?", const="true", default="false")
    known, _ = early.parse_known_args(given)
    cuda = torch.cuda.is_available() if known.device == "auto" else known.device == "cuda"
    if known.qlora.lower() in ("true", "1", "yes"):
        argv = with_paged_optimizer(argv, cuda)
    memory, model, data, finetuning, training = parse_args(
        (MemoryArguments, ModelArguments, DataArguments, FinetuningArguments, TrainArguments), argv, cuda=cuda
    )
    if memory.qlora and model.quantization_bit is None:
        model.quantization_bit = 4
    return memory, model, data, finetuning, training, cuda


def model_config(model_args, finetuning_args):
    """(config, real) for --model_name_or_path: a folder's config.json (real: built from its own class), or a
    built-in name's published values (a skeleton). The method's config overrides (ChatGLM's own prefix) applied."""
    from fora.models.load import ensure_default_model
    from fora.tuners.methods import config_overrides

    name = model_args.model_name_or_path or str(ensure_default_model())
    if is_model_folder(name):
        config = folder_config(name, model_args.trust_remote_code, {})
        real = True
    elif (values := built_in_config(name)) is not None:
        config, real = SkeletonConfig(**values), False
    else:
        raise UserError(f"--model_name_or_path {name}: no config.json there, and not a built-in name "
                        f"({', '.join(BUILT_IN)})")
    for key, value in config_overrides(finetuning_args, config).items():
        setattr(config, key, value)
    return config, real


def zero_settings(deepspeed) -> tuple[int, bool]:
    """(ZeRO stage, optimizer offloaded to the host) of a --deepspeed file or dict; (0, False) without one."""
    if not deepspeed:
        return 0, False
    from fora.io import read_json

    config = deepspeed if isinstance(deepspeed, dict) else read_json(deepspeed, "--deepspeed")
    zero = config.get("zero_optimization", {})
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    return int(zero.get("stage", 0)), offload


def longest_batch(lengths: list[int], supervised: list[int], training_args, world_size: int, cuda: bool) -> tuple[int, int]:
    """(padded length, trained positions) of the longest per-device batch of the first epoch, as the training sampler
    (fora.train.sampler, length-grouped by default) and the collator (padding to 8 on CUDA) build it."""
    from fora.train.sampler import GlobalBatchSampler

    batch = training_args.per_device_train_batch_size
    global_batch = batch * world_size * training_args.gradient_accumulation_steps
    strategy = training_args.train_sampling_strategy
    order = list(GlobalBatchSampler(len(lengths), global_batch, training_args.seed, strategy != "sequential",
                                    lengths if strategy == "group_by_length" else None, training_args.dataloader_drop_last))
    worst = (0, 0)
    for start in range(0, len(order), batch):
        rows = order[start:start + batch]
        width = max(lengths[i] for i in rows)
        width = -(-width // 8) * 8 if cuda else width
        worst = max(worst, (width, sum(supervised[i] for i in rows)))
    return worst


def records_from_data(model_path: str, model_args, data_args, training_args) -> tuple[list[int], list[int]]:
    """Each training record's length and trained positions, tokenized as training tokenizes (and caches) them."""
    from fora.data.dataset import build_dataset
    from fora.data.templates import get_template
    from fora.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_path, model_args.trust_remote_code)
    template = get_template(tokenizer, data_args.template)
    dataset = build_dataset(data_args.train_file, tokenizer, template, data_args, training_args.main_process_first, lambda *_: None)
    return trained_positions(dataset)


def trained_positions(dataset) -> tuple[list[int], list[int]]:
    """Lengths and trained positions (the labels the loss reads: all but each record's first) of a tokenized dataset,
    counted over its Arrow columns."""
    import numpy as np

    labels = dataset.data.table.column("labels").combine_chunks()
    trained = labels.flatten().to_numpy() != IGNORE_INDEX
    starts = labels.offsets.to_numpy()
    counts = np.add.reduceat(np.append(trained, False), starts[:-1]) if len(trained) else np.zeros(len(labels), int)
    first = np.where(starts[:-1] < starts[1:], np.append(trained, False)[starts[:-1]], False)
    return list(dataset["length"]), (counts - first).tolist()


def setting(model_args, data_args, finetuning_args, training_args, devices: int, cuda: bool,
            records: tuple[list[int], list[int]] | None = None) -> Setting:
    """The Setting of the run the flags describe. `records`: each training record's length and trained positions
    (`records_from_data`); without them the longest batch is the flags' lengths at every row."""
    from fora.train.trainer import choose_loss_path

    config, real = model_config(model_args, finetuning_args)
    architecture = Architecture.of(config)
    counted = census(architecture, config, finetuning_args, real, model_args.trust_remote_code)
    precision = training_args.precision
    batch = training_args.per_device_train_batch_size
    if records:
        length, supervised = longest_batch(*records, training_args, devices, cuda)
    else:
        length = data_args.max_source_length + data_args.max_target_length
        supervised = batch * (data_args.max_target_length - 1)
    stage, offload = zero_settings(training_args.deepspeed)
    checkpointing = training_args.gradient_checkpointing
    return Setting(
        architecture=architecture, census=counted, method=finetuning_args.finetuning_type, rank=finetuning_args.lora_rank,
        dropout=finetuning_args.lora_dropout, fora_mid_ratio=finetuning_args.fora_mid_ratio, use_dora=finetuning_args.use_dora,
        virtual_tokens=finetuning_args.num_virtual_tokens, quantization_bit=model_args.quantization_bit,
        dtype_bytes=4 if precision.dtype == DTYPE_NAMES[0] else 2, mixed=precision.mixed, batch=batch, length=length,
        supervised=supervised, checkpointing=checkpointing is True, accumulation=training_args.gradient_accumulation_steps,
        optimizer=str(getattr(training_args.optim, "value", training_args.optim)), zero_stage=stage,
        deepspeed=bool(training_args.deepspeed), offload_optimizer=offload, devices=devices, cuda=cuda,
        unmap_freed_memory=model_args.unmap_freed_memory,
        loss_path=choose_loss_path(finetuning_args.finetuning_type, counted.proven_loss, counted.plain_head,
                                   training_args.supervised_logits),
        overhead=CUDA_CONTEXT if cuda else resident_memory(),
    )


def world_size(num_devices: int | None) -> int:
    return num_devices or int(os.environ.get("WORLD_SIZE", "1"))
