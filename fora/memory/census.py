"""What a run trains, counted exactly on a model that holds no memory: the base built on the meta device (from a
folder's config, or for a built-in name from a skeleton with the family's module names and shapes), the method
attached by the training code itself (fora.tuners.attach), then its parameters counted."""

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel

from fora.memory.architectures import Architecture
from fora.tuners.attach import attach_adapter, transformer_blocks


@dataclass(frozen=True)
class Census:
    """The parameters of a base with a method attached."""

    total: int  # every parameter, the adapter's included
    trainable: int
    trainable_shapes: tuple[tuple[int, ...], ...]  # each trainable tensor's shape (factored optimizers keep less)
    quantizable: int  # elements of the linear weights a 4/8-bit base quantizes (every nn.Linear but the output layer)
    adapted: tuple[str, ...]  # the block linears (names) carrying an adapter
    trained_layers: int  # blocks from the lowest one holding a trainable parameter up (below it nothing is saved)
    output_trains: bool  # the output layer's weight trains (full fine-tuning; freeze with a tied embedding, ...)
    proven_loss: bool  # the architecture's supervised-position loss is proven (fora.train.trainer.proven_supervised_loss)
    plain_head: bool  # the output layer is a plain nn.Linear


def census(architecture: Architecture, config, finetuning, real: bool, trust_remote_code: bool) -> Census:
    """Count `finetuning`'s method on the base `config` describes: built from the model's own class (`real`, a folder's
    config), or as the skeleton of a built-in name (a SkeletonConfig)."""
    from fora.train.trainer import proven_supervised_loss

    method = copy.copy(finetuning)
    method.init_lora_weights = "default"  # PiSSA/OLoRA decompose real weights; the counts are LoRA's
    with torch.device("meta"):
        model = _meta_model(config, trust_remote_code) if real else Skeleton(architecture, config)
        quantizable = quantizable_elements(model)  # before the adapter, whose own linears stay unquantized
        model = attach_adapter(model, method, gradient_checkpointing=False, total_steps=1000)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = output_layer(base)
    params = list(model.named_parameters())
    blocks = transformer_blocks(base)
    trained = [i for i, block in enumerate(blocks) if any(p.requires_grad for p in block.parameters())]
    adapted = sorted({name.rsplit(".", 1)[-1] for name, m in blocks.named_modules() if hasattr(m, "base_layer")})
    return Census(
        total=sum(p.numel() for _, p in params),
        trainable=sum(p.numel() for _, p in params if p.requires_grad),
        trainable_shapes=tuple(tuple(p.shape) for _, p in params if p.requires_grad),
        quantizable=quantizable,
        adapted=tuple(adapted),
        trained_layers=len(blocks) - trained[0] if trained else 0,
        output_trains=head is not None and head.weight.requires_grad,
        proven_loss=proven_supervised_loss(base),
        plain_head=type(base.get_output_embeddings()) is nn.Linear,  # as the trainer asks it
    )


def output_layer(model) -> nn.Module | None:
    """The layer giving the logits. ChatGLM2/3 keep theirs (`output_layer`) out of sight of get_output_embeddings:
    then the last linear as wide as the config's (padded) vocabulary."""
    head = model.get_output_embeddings()
    if head is not None:
        return head
    vocab = getattr(model.config, "padded_vocab_size", None) or model.config.vocab_size
    wide = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == vocab]
    return wide[-1] if wide else None


def quantizable_elements(model) -> int:
    """Elements of the linear weights a 4/8-bit base quantizes: every nn.Linear but the output layer."""
    head = output_layer(model)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head and m.weight is not None)


def _meta_model(config, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def folder_config(folder: str, trust_remote_code: bool, overrides: dict):
    """A model folder's config (its remote code adapted, see fora.models.load), with a method's `overrides`."""
    from fora.models.load import load_config

    config = load_config(folder, trust_remote_code)
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def is_model_folder(name_or_path: str) -> bool:
    return (Path(name_or_path) / "config.json").is_file()


# --- The skeleton: a built-in architecture's parameters, named as in its family's code ------------------------


class _Norm(nn.Module):
    def __init__(self, width: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(width))
        self.bias = nn.Parameter(torch.empty(width)) if bias else None


class _Block(nn.Module):
    def __init__(self, arch: Architecture):
        super().__init__()
        for module, linears in ((arch.attention_module, arch.attention), (arch.mlp_module, arch.mlp)):
            holder = nn.Module()
            for linear in linears:
                holder.add_module(linear.name, nn.Linear(linear.inputs, linear.outputs, bias=linear.bias))
            self.add_module(module, holder)
        for norm in arch.norms:
            self.add_module(norm, _Norm(arch.hidden, bias=not arch.rms_norm))


class SkeletonConfig(PretrainedConfig):
    """A built-in entry's published config values, under the entry's own model_type (PEFT chooses some methods'
    defaults, IA3's layers, by it)."""

    model_type = "fora-skeleton"

    def __init__(self, **values):
        model_type = values.pop("model_type", self.model_type)
        super().__init__(**values)
        self.model_type = model_type


class Skeleton(PreTrainedModel, GenerationMixin):
    """A built-in architecture's modules and parameters, without a forward: what PEFT attaches to and counts."""

    config_class = SkeletonConfig

    def __init__(self, arch: Architecture, config: SkeletonConfig):
        super().__init__(config)
        root = self
        *path, last = arch.layers_module.split(".")
        for name in path:
            root.add_module(name, nn.Module())
            root = getattr(root, name)
        root.add_module(last, nn.ModuleList(_Block(arch) for _ in range(arch.layers)))
        self.embed = nn.Embedding(arch.vocab, arch.hidden)
        if arch.model_type == "bloom":  # BLOOM normalizes its embeddings
            self.embed_norm = _Norm(arch.hidden, bias=True)
        self.final_norm = _Norm(arch.hidden, bias=not arch.rms_norm)
        self.head = nn.Linear(arch.hidden, arch.vocab, bias=False)
        if arch.tied:
            self.head.weight = self.embed.weight
        if arch.model_type == "chatglm" and getattr(config, "pre_seq_len", None):
            # ChatGLM's own P-tuning v2 (what --finetuning_type prefix uses on it): a trained prefix of keys and
            # values for every layer, optionally through a two-layer MLP; the rest of the model is frozen.
            self.requires_grad_(False)
            width = arch.layers * 2 * arch.kv_width
            self.prefix_encoder = nn.Module()
            self.prefix_encoder.embedding = nn.Embedding(config.pre_seq_len, arch.hidden if config.prefix_projection else width)
            if config.prefix_projection:
                self.prefix_encoder.trans = nn.Sequential(nn.Linear(arch.hidden, arch.hidden), nn.Tanh(), nn.Linear(arch.hidden, width))

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids=None, logits_to_keep=0, **kwargs):
        """The signature transformers' own models have (the loss path reads it); the blocks are left out: a skeleton
        is counted, never run for its values."""
        hidden = self.embed(input_ids)
        return self.head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
