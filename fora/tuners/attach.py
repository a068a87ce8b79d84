"""Adapters on a model: which linear layers they target, attaching a new one (LoRA, FoRA) for training,
loading a saved one, and counting what trains."""

import contextlib
import warnings
from pathlib import Path

import torch
from torch import nn

from fora.errors import UserError
from fora.models.host_memory import release_freed_memory


def find_linear_targets(model: nn.Module) -> list[str]:
    """Names of the linear layers inside the Transformer blocks (the largest ModuleList), not the head."""
    blocks = max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len, default=model)
    return sorted({name.rsplit(".", 1)[-1] for name, m in blocks.named_modules() if isinstance(m, nn.Linear)})


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


def attach_adapter(model, finetuning_args, gradient_checkpointing: bool = False):
    """Wrap `model` with a LoRA or FoRA adapter (or leave it whole for full fine-tuning)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from fora.tuners.lora_fast import use_addmm_layers

    if finetuning_args.finetuning_type == "full":
        return model
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
    common = dict(
        r=finetuning_args.lora_rank,
        lora_alpha=finetuning_args.lora_alpha,
        lora_dropout=finetuning_args.lora_dropout,
        target_modules=adapter_targets(model, finetuning_args.lora_target),
        modules_to_save=finetuning_args.modules_to_save.split(",") if finetuning_args.modules_to_save else None,
        task_type="CAUSAL_LM",
    )
    if finetuning_args.finetuning_type == "fora":
        from fora.tuners.fora import ForaConfig

        config = ForaConfig(mid_ratio=finetuning_args.fora_mid_ratio, **common)
    else:
        config = LoraConfig(**common)
        in_4bit = getattr(model, "is_loaded_in_4bit", False)
        if in_4bit or not quantized:
            config = use_addmm_layers(config, quantized_4bit=in_4bit)
    with _peft_reading_deprecated_attribute():
        return get_peft_model(model, config)


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


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def load_adapter(base_model, adapter_dir: str, is_trainable: bool = False, flag: str = "--adapter"):
    """PeftModel for a saved LoRA or FoRA adapter directory; a clear error when it is not one or does not fit.

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
