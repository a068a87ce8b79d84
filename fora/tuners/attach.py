"""Methods on a model: which layers they target, attaching one for training (a PEFT adapter, or the base's own
weights set to train), loading a saved adapter, and counting what trains."""

import contextlib
import warnings
from pathlib import Path

import torch
from torch import nn

from fora.errors import UserError
from fora.models.host_memory import release_freed_memory


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's Transformer blocks: its largest ModuleList."""
    return max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len, default=nn.ModuleList())


def find_linear_targets(model: nn.Module) -> list[str]:
    """Names of the linear layers inside the Transformer blocks, not the head."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in transformer_blocks(model).named_modules() if isinstance(m, nn.Linear)})


def adapter_targets(model: nn.Module, lora_target: str | None) -> list[str]:
    available = find_linear_targets(model)
    if not lora_target or lora_target == "all":
        return available
    wanted = [name.strip() for name in lora_target.split(",") if name.strip()]
    linear_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [name for name in wanted if name not in linear_names]
    if missing:
        raise UserError(f"--lora_target {','.join(missing)}: no such linear layer in the model (it has: {', '.join(available)})")
    return wanted


def attach_adapter(model, finetuning_args, gradient_checkpointing: bool = False, total_steps: int | None = None):
    """`model` ready to train by `finetuning_args`' method: a PEFT adapter attached (LoRA and FoRA with their
    fast layers), or the base's own weights set to train (freeze, full); ChatGLM2/3, loaded with their own
    prefix (`methods.own_prefix`), have frozen themselves already. `total_steps` plans AdaLoRA's pruning."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from fora.tuners.lora_fast import use_addmm_layers
    from fora.tuners.methods import own_prefix, peft_config

    name = finetuning_args.finetuning_type
    if name == "full" or (name == "prefix" and own_prefix(model.config)):
        return model
    if name == "freeze":
        return train_only_layers(model, finetuning_args.freeze_trainable_layers, finetuning_args.freeze_trainable_modules)
    quantized = getattr(model, "is_quantized", False)
    if quantized:
        # PEFT upcasts every fp16/bf16 weight left unquantized (embeddings, output layer, norms) to fp32,
        # which guards fp16's narrow range. bf16 has fp32's range, so bf16 weights are held out of that
        # upcast, which would add fp32 copies of the embeddings and the output layer.
        with _held_out([p for p in model.parameters() if p.dtype == torch.bfloat16]):
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        release_freed_memory()
    targets = adapter_targets(model, finetuning_args.lora_target)
    common = dict(
        r=finetuning_args.lora_rank,
        lora_alpha=finetuning_args.lora_alpha,
        lora_dropout=finetuning_args.lora_dropout,
        target_modules=targets,
        modules_to_save=finetuning_args.modules_to_save.split(",") if finetuning_args.modules_to_save else None,
        task_type="CAUSAL_LM",
    )
    if name == "fora":
        from fora.tuners.fora import ForaConfig

        config = ForaConfig(mid_ratio=finetuning_args.fora_mid_ratio, **common)
    elif name == "lora":
        init = {"default": True}.get(finetuning_args.init_lora_weights, finetuning_args.init_lora_weights)
        config = LoraConfig(**common, use_dora=finetuning_args.use_dora, use_rslora=finetuning_args.use_rslora, init_lora_weights=init)
        in_4bit = getattr(model, "is_loaded_in_4bit", False)
        if in_4bit or not quantized:
            config = use_addmm_layers(config, quantized_4bit=in_4bit)
    else:
        config = peft_config(finetuning_args, model, targets, total_steps)
    try:
        with _peft_reading_deprecated_attribute():
            return get_peft_model(model, config)
    except ValueError as error:
        if name == "prefix" and "gradient checkpointing" in str(error):  # the model's own code may checkpoint always
            raise UserError("--finetuning_type prefix: this model checkpoints its gradients (its own code or "
                            "--gradient_checkpointing), which PEFT's prefix tuning does not work with") from None
        raise


def train_only_layers(model, layers: int, modules: str):
    """The freeze method: every weight frozen but those of the last `layers` Transformer blocks (the first ones
    for a negative count), and within them only the children named in `modules` ("all": every one)."""
    blocks = transformer_blocks(model)
    if abs(layers) > len(blocks):
        raise UserError(f"--freeze_trainable_layers {layers}: the model has {len(blocks)} layers")
    chosen = blocks[-layers:] if layers > 0 else blocks[:-layers]
    children = {name for block in chosen for name, _ in block.named_children()}
    wanted = children if modules == "all" else {name.strip() for name in modules.split(",") if name.strip()}
    if wanted - children:
        raise UserError(f"--freeze_trainable_modules {','.join(sorted(wanted - children))}: no such module in a layer "
                        f"(a layer has: {', '.join(sorted(children))})")
    model.requires_grad_(False)
    for block in chosen:
        for name, child in block.named_children():
            if name in wanted:
                child.requires_grad_(True)
    return model


@contextlib.contextmanager
def _peft_reading_deprecated_attribute():
    """PEFT reads `model.is_gradient_checkpointing`, which transformers 5 deprecates (in favour of
    `is_activation_checkpointing`); the read is PEFT's, not ours, so only that warning is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


@contextlib.contextmanager
def _held_out(params: list[nn.Parameter]):
    """Give `params` an empty tensor for the duration of the block, then their own data back (ties kept)."""
    saved = [(param, param.data) for param in params]
    for param, data in saved:
        param.data = data.new_empty(0)
    try:
        yield
    finally:
        for param, data in saved:
            param.data = data


INITIAL_ADAPTER = "initial_adapter"  # PiSSA/OLoRA's adapter before training, which their saves convert against


def save_trained(model, folder: str | Path, initial_adapter: str | None = None) -> None:
    """What trained, into `folder`: a PEFT adapter (PiSSA/OLoRA's converted against `initial_adapter` to a plain
    LoRA of the base as it is on disk, see `keep_initial_adapter`), or the whole model (freeze, full, and
    ChatGLM's own prefix, whose config then builds its prefix encoder again)."""
    from peft import PeftModel

    if isinstance(model, PeftModel) and initial_adapter:
        model.save_pretrained(str(folder), path_initial_model_for_weight_conversion=initial_adapter)
    else:
        model.save_pretrained(str(folder))


def keep_initial_adapter(model, folder: Path) -> str:
    """PiSSA and OLoRA start from the weight's own singular (QR) directions and leave the residual in the base: the
    adapter before training is saved once into `folder` (returned), and every later save converts against it
    (PEFT's conversion), so a saved adapter applies to the base as it is on disk."""
    model.peft_config["default"].init_lora_weights = True  # the initial and the converted adapters load as plain LoRA
    model.save_pretrained(str(folder))
    return str(folder)


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def load_adapter(base_model, adapter_dir: str, is_trainable: bool = False, flag: str = "--adapter"):
    """PeftModel for a saved adapter folder of any PEFT method (FoRA's config read as FoRA); a clear error when it
    is not one or does not fit.

    `flag` names where the adapter folder came from, for the error message.
    """
    from peft import PeftModel

    from fora.tuners.fora import load_fora_config

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise UserError(f"{flag} {adapter_dir}: not an adapter directory (no adapter_config.json)")
    base = base_model.name_or_path
    try:
        with _peft_reading_deprecated_attribute():
            return PeftModel.from_pretrained(
                base_model, adapter_dir, config=load_fora_config(adapter_dir), is_trainable=is_trainable
            )
    except ValueError as error:  # e.g. PEFT's "Target modules ... not found in the base model"
        raise UserError(f"{flag} {adapter_dir}: does not fit the base model {base} ({str(error).splitlines()[0]})") from None
    except RuntimeError as error:
        if "size mismatch" in str(error):
            raise UserError(
                f"{flag} {adapter_dir}: the adapter was trained for another base model than {base} (weight shapes differ)"
            ) from None
        raise
