"""The fine-tuning methods (--finetuning_type): what each one allows, read by every path, and the PEFT config
each adapter method is built from.

    METHODS[name]      what the method allows: a 4/8-bit base, merging, federated averaging, the loss path
    check_method(...)  refuses a combination the method does not allow, in one line, before anything loads
    peft_config(...)   the method's PEFT config for a model (LoRA and FoRA: tuners/attach.py adds their fast layers)

freeze and full are no adapters: their trained tensors are the base's own (attach.py sets requires_grad).
ChatGLM2/3 ship P-tuning v2 in their own code (`pre_seq_len`), which `prefix` uses there, as ChatGLM's
published ptuning scripts do (`own_prefix`).
"""

from dataclasses import dataclass
from typing import Literal

from fora.errors import UserError

# How the training loss is computed (fora/train/trainer.py):
#   supervised  the output layer at trained positions only, where a test shows it equal to PEFT's forward
#   logits      the model's full logits, reduced over trained positions (exact for every method)
#   model       the model's own loss from labels: AdaLoRA adds its orthogonality regulariser there
LossPath = Literal["supervised", "logits", "model"]


@dataclass(frozen=True)
class Method:
    adapter: bool  # a PEFT adapter, saved and loaded as one; else the base's own weights train
    quantized: bool  # trains on a 4/8-bit base: PEFT has a quantized layer for it, or it changes no layer
    merges: bool  # merge_lora.py folds it into the base weights
    averaged: bool  # the federation may average its trained tensors
    loss: LossPath


METHODS = {
    "lora": Method(adapter=True, quantized=True, merges=True, averaged=True, loss="supervised"),
    "fora": Method(adapter=True, quantized=True, merges=True, averaged=True, loss="supervised"),
    "loha": Method(adapter=True, quantized=False, merges=True, averaged=True, loss="supervised"),
    "lokr": Method(adapter=True, quantized=False, merges=True, averaged=True, loss="supervised"),
    "ia3": Method(adapter=True, quantized=True, merges=True, averaged=True, loss="supervised"),
    # The rank each layer keeps is chosen by its own clients' gradients: masks from different sites do not average.
    "adalora": Method(adapter=True, quantized=True, merges=True, averaged=False, loss="model"),
    "oft": Method(adapter=True, quantized=False, merges=True, averaged=True, loss="supervised"),
    # Virtual tokens change the sequence (prompt) or the attention (prefix): the model's full logits.
    "prefix": Method(adapter=True, quantized=True, merges=False, averaged=True, loss="logits"),
    "prompt": Method(adapter=True, quantized=True, merges=False, averaged=True, loss="logits"),
    "freeze": Method(adapter=False, quantized=False, merges=False, averaged=True, loss="supervised"),
    "full": Method(adapter=False, quantized=False, merges=False, averaged=False, loss="supervised"),
}
QUANTIZED_METHODS = ", ".join(name for name, method in METHODS.items() if method.quantized)


def check_method(finetuning, quantization_bit: int | None, gradient_checkpointing: bool, deepspeed: bool,
                 federated: bool = False) -> None:
    """Refuse, in one line, a method with a setting it does not go with (checked before anything loads)."""
    name, method = finetuning.finetuning_type, METHODS[finetuning.finetuning_type]
    if quantization_bit and not method.quantized:
        what = "trains the base's own weights, which a 4/8-bit base cannot" if not method.adapter else "has no 4/8-bit layer in PEFT"
        raise UserError(f"--finetuning_type {name} {what}; on a {quantization_bit}-bit base choose one of: {QUANTIZED_METHODS}")
    if quantization_bit and finetuning.init_lora_weights in ("pissa", "olora"):
        raise UserError(f"--init_lora_weights {finetuning.init_lora_weights} decomposes the full-precision weight; "
                        f"train it without --quantization_bit (PiSSA's own 4-bit route is not offered)")
    if name == "prefix" and gradient_checkpointing:
        raise UserError("--finetuning_type prefix does not work with --gradient_checkpointing (PEFT's prefix tuning "
                        "passes its prefixes as a cache, which checkpointing recomputes without)")
    if name == "adalora" and deepspeed:
        raise UserError("--finetuning_type adalora reads every gradient to choose its ranks, which DeepSpeed ZeRO "
                        "partitions across processes: run it with torchrun or in one process")
    if federated and finetuning.init_lora_weights in ("pissa", "olora"):
        raise UserError(f"--init_lora_weights {finetuning.init_lora_weights} with federated rounds: its adapters are converted "
                        "against the initial one at every save, which the rounds' averaging does not keep; use the default init")
    if federated and not method.averaged:
        why = "each site would prune its ranks by its own gradients" if name == "adalora" else "every weight would travel"
        raise UserError(f"--finetuning_type {name}: federated rounds average what trains, and {why}; "
                        "choose an adapter method (lora, fora, ...)")


def method_config(finetuning, model_path: str, trust_remote_code: bool) -> dict:
    """Config values the base must be built with for the method: ChatGLM2/3's own P-tuning v2 sizes its prefix
    encoder in the model's `__init__` (and freezes everything else there). A method the model's own code cannot
    take is refused here, before the weights load."""
    if finetuning.finetuning_type not in ("prefix", "prompt"):
        return {}
    from fora.models.load import load_config

    return config_overrides(finetuning, load_config(model_path, trust_remote_code))


def config_overrides(finetuning, config) -> dict:
    """`method_config` for a config already read (the memory estimate's, see fora.memory)."""
    if finetuning.finetuning_type not in ("prefix", "prompt") or not own_prefix(config):
        return {}
    if finetuning.finetuning_type == "prompt":
        raise UserError("--finetuning_type prompt: this model's code reads input_ids in every forward, where prompt tuning "
                        "passes embeddings; --finetuning_type prefix uses its own P-tuning v2")
    return {"pre_seq_len": finetuning.num_virtual_tokens, "prefix_projection": finetuning.prefix_projection}


def own_prefix(config) -> bool:
    """The model's code has P-tuning v2 of its own (ChatGLM2/3: `pre_seq_len`, `prefix_projection`)."""
    return hasattr(config, "pre_seq_len") and hasattr(config, "prefix_projection")


def peft_config(finetuning, model, targets: list[str], total_steps: int | None):
    """The PEFT config of `finetuning`'s method (not LoRA or FoRA, built in attach.py) for `model`."""
    import peft

    name = finetuning.finetuning_type
    saved = finetuning.modules_to_save.split(",") if finetuning.modules_to_save else None
    if name == "loha":
        return peft.LoHaConfig(r=finetuning.lora_rank, alpha=finetuning.lora_alpha, module_dropout=finetuning.lora_dropout,
                               target_modules=targets, modules_to_save=saved, task_type="CAUSAL_LM")
    if name == "lokr":
        return peft.LoKrConfig(r=finetuning.lora_rank, alpha=finetuning.lora_alpha, module_dropout=finetuning.lora_dropout,
                               target_modules=targets, modules_to_save=saved, task_type="CAUSAL_LM")
    if name == "ia3":
        # PEFT's own choice for the architectures it knows (keys, values, and the feed-forward input); elsewhere the
        # output of every targeted layer is scaled.
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING

        known = model.config.model_type in TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING and not finetuning.lora_target
        return peft.IA3Config(target_modules=None if known else targets, feedforward_modules=None if known else [],
                              modules_to_save=saved, task_type="CAUSAL_LM")
    if name == "adalora":
        if not total_steps:
            raise UserError("--finetuning_type adalora plans its pruning over the run: give --max_steps or --num_train_epochs")
        # Ranks are kept for the first tenth of the steps, pruned until the last fifth, then fixed.
        return peft.AdaLoraConfig(init_r=finetuning.lora_rank, target_r=finetuning.adalora_target_rank,
                                  lora_alpha=finetuning.lora_alpha, lora_dropout=finetuning.lora_dropout,
                                  target_modules=targets, modules_to_save=saved, total_step=total_steps,
                                  tinit=total_steps // 10, tfinal=total_steps // 5, deltaT=max(1, total_steps // 20),
                                  task_type="CAUSAL_LM")
    if name == "oft":
        return peft.OFTConfig(r=0, oft_block_size=finetuning.oft_block_size, module_dropout=finetuning.lora_dropout,
                              target_modules=targets, modules_to_save=saved, task_type="CAUSAL_LM")
    if name == "prefix":
        hidden = model.config.get_text_config(decoder=True).hidden_size
        return peft.PrefixTuningConfig(num_virtual_tokens=finetuning.num_virtual_tokens, prefix_projection=finetuning.prefix_projection,
                                       encoder_hidden_size=hidden, task_type="CAUSAL_LM")
    if name == "prompt":
        return peft.PromptTuningConfig(num_virtual_tokens=finetuning.num_virtual_tokens, task_type="CAUSAL_LM")
    raise ValueError(f"no PEFT config for --finetuning_type {name}")
