"""A federated run's flags (train_lora.py's and FederatedArguments), what travels between server and sites
(the adapter's tensors, nothing of the base), and the model every participant loads."""

import copy
import logging
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import set_seed

from fora.args import DataArguments, FederatedArguments, FinetuningArguments, ModelArguments, TrainArguments, parse_args
from fora.args.parsing import settings_given
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

# The node config of a deployed SuperNode: its place among the clients and everything that touches the site,
# which the site alone decides: its data, its base model, whether it runs the model's own code, where it
# writes (the tokenized data's cache), and its device.
NODE_PARTITION, NODE_DATA_FILE, NODE_MODEL_PATH = "partition-id", "data-file", "model-path"
NODE_TRUST_REMOTE_CODE, NODE_CACHE_DIR, NODE_DEVICE = "trust-remote-code", "cache-dir", "device"

# The run config's keys (federated_app/pyproject.toml, `flwr run --run-config`): the run's training
# settings, which the server and every site read, and the server's own flags (its output, its held-out
# data, its copy of the base), which no site reads.
RUN_FLAGS, SERVER_FLAGS = "flags", "server-flags"

# What a site accepts from the run config: training settings that shape the adapter and its updates,
# nothing that names a file, a folder, code to run, a device or a service to report to.
SITE_SETTINGS = frozenset({
    # the model as loaded, the data as read (never which model or which file)
    "torch_dtype", "quantization_bit", "unmap_freed_memory", "data_format", "prompt_column", "response_column",
    "empty_response", "template", "max_source_length", "max_target_length",
    # the adapter
    "finetuning_type", "use_lora", "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "modules_to_save",
    "fora_mid_ratio", "use_dora", "use_rslora", "init_lora_weights", "loraplus_lr_ratio", "adalora_target_rank",
    "oft_block_size", "num_virtual_tokens", "prefix_projection", "freeze_trainable_layers", "freeze_trainable_modules",
    # the optimizer, its schedule and the batches
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "num_train_epochs",
    "max_steps", "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio", "optim",
    "optim_args", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "label_smoothing_factor",
    "bf16", "fp16", "gradient_checkpointing", "group_by_length", "supervised_logits", "seed", "data_seed", "logging_steps",
    # the federation
    "num_clients", "num_rounds", "local_steps", "local_epochs", "partition", "fraction_train", "min_fit_clients",
    "proximal_mu", "server_learning_rate", "server_momentum", "server_optimizer", "client_learning_rate", "round_timeout",
    "eval_generate", "dp_noise_multiplier", "dp_clipping_norm", "dp_delta",
})

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


FLAG_GROUPS = (ModelArguments, DataArguments, FinetuningArguments, TrainArguments, FederatedArguments)


def parse(argv: list[str] | None) -> FederatedRun:
    model_args, data_args, finetuning_args, training_args, federated_args = parse_args(FLAG_GROUPS, argv)
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


def server_argv(run_config: dict) -> list[str]:
    """The deployed server's flags: the run's `flags`, then its own `server-flags`
    (`flwr run --run-config 'flags="..." server-flags="..."'`)."""
    return shlex.split(str(run_config.get(RUN_FLAGS, ""))) + shlex.split(str(run_config.get(SERVER_FLAGS, "")))


class SiteRefusal(UserError):
    """The run config asked a site for something only its node config decides."""


def site_argv(run_config: dict, node_config: dict) -> list[str]:
    """A deployed site's flags: the run's `flags`, each one a training setting of SITE_SETTINGS (anything
    else is refused, naming the flag), then what the site's node config decides, which no flag can override:
    its base model, remote code, the tokenized data's cache, its device."""
    flags = shlex.split(str(run_config.get(RUN_FLAGS, "")))
    if flags and not flags[0].startswith("-"):
        raise SiteRefusal(f"the run config's flags start with {flags[0]!r}: a site reads no argument file")
    for name in settings_given(FLAG_GROUPS, flags):
        if name not in SITE_SETTINGS:
            raise SiteRefusal(f"the run config's flags set --{name}, which this site's node config decides "
                              f"(a site takes training settings only)")
    model_path = node_config.get(NODE_MODEL_PATH)
    if not model_path:
        raise SiteRefusal(f"the node config has no {NODE_MODEL_PATH} (the site's base model)")
    own = ["--model_name_or_path", str(model_path),
           "--trust_remote_code", str(bool(node_config.get(NODE_TRUST_REMOTE_CODE, False))),
           "--report_to", "none"]
    if node_config.get(NODE_CACHE_DIR):
        own += ["--cache_dir", str(node_config[NODE_CACHE_DIR])]
    device = str(node_config.get(NODE_DEVICE, "auto"))
    if device == "cpu":
        own += ["--use_cpu", "true"]
    elif device.startswith("cuda:") and device[len("cuda:"):].isdigit():
        # The site's process sees only that GPU (read once, when CUDA starts), so the Trainer takes it whole
        os.environ["CUDA_VISIBLE_DEVICES"] = device[len("cuda:"):]
    elif device != "auto":
        raise SiteRefusal(f"the node config's {NODE_DEVICE}={device!r} is none of auto, cpu, cuda:N")
    return flags + own


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


def load_adapted_model(run: FederatedRun):
    """Model path, tokenizer, template and base model with the run's adapter attached, as train_lora.py
    loads them. Seeded, so the server and every client start from the same adapter layout and values."""
    path = resolve_model_path(run.model.model_name_or_path)
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
