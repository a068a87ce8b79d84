"""A federated run's flags (train_lora.py's and FederatedArguments), what travels between server and sites
(the adapter's tensors, nothing of the base), and the model every participant loads."""

import copy
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import set_seed

from fora.args import DataArguments, FederatedArguments, FinetuningArguments, ModelArguments, TrainArguments, parse_args
from fora.data.templates import get_template
from fora.errors import UserError
from fora.io import refuse_earlier_output
from fora.memory.decide import RunMemory
from fora.models.load import load_model, resolve_model_path
from fora.models.tokenizer import load_tokenizer
from fora.precision import keep_trainable_in_float32
from fora.tuners.attach import attach_adapter
from fora.tuners.methods import check_method, method_config

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
    if training_args.gradient_checkpointing == "auto":  # from the flags' lengths: the sites' data is theirs
        memory = RunMemory(model_args, data_args, finetuning_args, training_args)
        training_args.use_gradient_checkpointing(memory.gradient_checkpointing(print))
    check_method(finetuning_args, model_args.quantization_bit, training_args.gradient_checkpointing, bool(training_args.deepspeed),
                 federated=True)
    if training_args.lr_scheduler_type == "reduce_lr_on_plateau":
        raise UserError("--lr_scheduler_type reduce_lr_on_plateau: clients do not evaluate while they train; choose a fixed schedule")
    return FederatedRun(model_args, data_args, finetuning_args, training_args, federated_args, training_args.precision.torch_dtype)


def refuse_previous_run(run: FederatedRun) -> None:
    """An --output_dir holding an earlier run's adapters is replaced only with --overwrite_output_dir."""
    refuse_earlier_output(run.output_dir, PREVIOUS_RUN_MARKERS, run.training.overwrite_output_dir)


def argv_from_run_config(run_config: dict) -> list[str]:
    """A deployed run's flags: the run config's `flags` string (`flwr run --run-config 'flags="..."'`)."""
    return shlex.split(str(run_config.get("flags", "")))


def adapter_state(model) -> dict[str, torch.Tensor]:
    """What trains, as detached CPU copies: a PEFT adapter's tensors (PEFT's names, as in adapter_model.safetensors),
    or the base's own weights that train (freeze, ChatGLM's own prefix) by their names in the model."""
    if isinstance(model, PeftModel):
        tensors = get_peft_model_state_dict(model)
    else:
        tensors = {name: param for name, param in model.named_parameters() if param.requires_grad}
    return {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in tensors.items()}


def load_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    """Put trained tensors (from `adapter_state`, here or at another site) into `model`."""
    expected = set(adapter_state(model))
    if set(state) != expected:
        raise ValueError(f"the adapter received does not fit this model: {len(set(state) ^ expected)} tensor names differ")
    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, state)
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def load_adapted_model(run: FederatedRun, model_path: str | None):
    """Model path, tokenizer, template and base model with the run's adapter attached, as train_lora.py
    loads them; `model_path` (a site's own copy of the base) overrides --model_name_or_path. Seeded, so
    the server and every client start from the same adapter layout and values."""
    path = resolve_model_path(model_path or run.model.model_name_or_path)
    tokenizer = load_tokenizer(path, run.model.trust_remote_code)
    template = get_template(tokenizer, run.data.template)
    model = load_model(
        path, run.dtype, run.model.trust_remote_code, run.model.quantization_bit, unmap_freed_memory=run.model.unmap_freed_memory,
        config_overrides=method_config(run.finetuning, path, run.model.trust_remote_code),
    )
    set_seed(run.training.seed)
    model = attach_adapter(model, run.finetuning, run.training.gradient_checkpointing)
    keep_trainable_in_float32(model, run.training.precision, deepspeed=False)
    return path, tokenizer, template, model


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
