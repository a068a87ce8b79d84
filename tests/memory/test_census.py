"""fora/memory/census.py: what a run trains, counted on a meta-device model, equals PEFT's own count on the real
model; the built-in skeletons count as their published checkpoints."""

import copy

import pytest

from fora.memory.architectures import Architecture, built_in_config
from fora.memory.census import SkeletonConfig, census, folder_config, is_model_folder
from fora.models.load import ensure_default_model
from support import parse_flags


@pytest.mark.usefixtures("keep_environment")
@pytest.mark.parametrize("flags", [
    ("--lora_rank", "8"),
    ("--lora_rank", "4", "--lora_target", "q_proj,v_proj"),
    ("--finetuning_type", "fora", "--lora_rank", "4"),
    ("--lora_rank", "4", "--use_dora"),
    ("--finetuning_type", "ia3"),
    ("--finetuning_type", "full"),
], ids=["lora", "lora-qv", "fora", "dora", "ia3", "full"])
def test_trainable_count_equals_peft_on_the_real_model(tiny_model, tmp_path, flags):
    """The training code attaches the method to the real tiny model; PEFT counts its trainable parameters."""
    import torch

    from fora.models.load import load_model
    from fora.tuners.attach import attach_adapter

    _, _, finetuning, _ = parse_flags(str(tmp_path / "out"), *flags)
    config = folder_config(str(tiny_model), False, {})
    counted = census(Architecture.of(config), config, finetuning, real=True, trust_remote_code=False)
    model = attach_adapter(load_model(str(tiny_model), torch.float32, False, None), copy.copy(finetuning), False, 1000)
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable = total = sum(p.numel() for p in model.parameters())
    assert (counted.trainable, counted.total) == (trainable, total)


@pytest.mark.usefixtures("keep_environment")
def test_a_built_in_skeleton_counts_as_the_model_it_names(tmp_path):
    """SmolLM2-135M's built-in entry, as a skeleton, against the embedded model's own config and class."""
    _, _, finetuning, _ = parse_flags(str(tmp_path / "out"), "--lora_rank", "8")
    real_config = folder_config(str(ensure_default_model()), False, {})
    real = census(Architecture.of(real_config), real_config, finetuning, real=True, trust_remote_code=False)
    values = built_in_config("SmolLM2-135M-Instruct")
    skeleton = census(Architecture.of(values), SkeletonConfig(**values), finetuning, real=False, trust_remote_code=False)
    assert skeleton == real


@pytest.mark.usefixtures("keep_environment")
@pytest.mark.parametrize("name, parameters", [("llama-2-7b-chat", 6_738_415_616), ("qwen2.5-7b-instruct", 7_615_616_512),
                                              ("meta-llama/Meta-Llama-3-8B-Instruct", 8_030_261_248)])
def test_built_in_names_count_their_published_parameters(tmp_path, name, parameters):
    _, _, finetuning, _ = parse_flags(str(tmp_path / "out"), "--finetuning_type", "full")
    values = built_in_config(name)
    counted = census(Architecture.of(values), SkeletonConfig(**values), finetuning, real=False, trust_remote_code=False)
    assert counted.total == counted.trainable == parameters


def test_is_model_folder(tiny_model, tmp_path):
    assert is_model_folder(str(tiny_model)) and not is_model_folder(str(tmp_path)) and not is_model_folder("llama-2-7b")


@pytest.mark.usefixtures("keep_environment")
@pytest.mark.parametrize("family", ["chatglm2", "chatglm3"])
@pytest.mark.parametrize("method, trains_the_head", [("lora", False), ("full", True)])
def test_a_head_hidden_from_get_output_embeddings_is_found(family, method, trains_the_head, tmp_path):
    """ChatGLM2/3's published code keeps its output layer out of sight of get_output_embeddings; the census finds it
    instead of failing, and knows whether it trains."""
    from fixtures import families

    folder = families.build_family(family, tmp_path / family)
    _, _, finetuning, _ = parse_flags(str(tmp_path / "out"), "--finetuning_type", method, "--lora_rank", "4")
    config = folder_config(str(folder), families.OWN_CODE, {})
    counted = census(Architecture.of(config), config, finetuning, real=True, trust_remote_code=families.OWN_CODE)
    assert counted.output_trains is trains_the_head and not counted.plain_head  # plain_head: as the trainer asks
