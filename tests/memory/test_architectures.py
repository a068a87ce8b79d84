"""fora/memory/architectures.py: a config's shape, and the built-in table the model scripts' names look up."""

import re

import pytest

from fora.errors import UserError
from fora.memory.architectures import ALIASES, BUILT_IN, Architecture, built_in_config
from support import REPO


def test_every_model_script_name_is_built_in():
    names = [re.search(r"NAME=(\S+)", path.read_text()).group(1) for path in sorted((REPO / "scripts" / "models").glob("*.sh"))]
    assert names and [name for name in names if built_in_config(name) is None] == []


def test_names_are_looked_up_case_insensitively_by_a_hub_ids_last_part():
    assert built_in_config("meta-llama/Llama-2-7b-hf") == BUILT_IN["llama-2-7b-chat"]
    assert built_in_config("THUDM/chatglm3-6b/") == BUILT_IN["chatglm3-6b"]
    assert built_in_config("no-such-model") is None
    assert set(ALIASES.values()) <= set(BUILT_IN)


@pytest.mark.parametrize("name", list(BUILT_IN))
def test_every_entry_has_a_consistent_shape(name):
    arch = Architecture.of(BUILT_IN[name])
    assert arch.q_width % arch.heads == 0 and arch.heads % arch.kv_heads == 0
    assert arch.attention[0].inputs == arch.hidden and arch.linears[-1].outputs == arch.hidden
    assert arch.mlp[-1].inputs == arch.intermediate


def test_family_shapes():
    chatglm = Architecture.of(BUILT_IN["chatglm3-6b"])
    assert (chatglm.kv_heads, chatglm.attention[0].outputs, chatglm.mlp[0].outputs) == (2, 4096 + 2 * 2 * 128, 2 * 13696)
    falcon = Architecture.of(BUILT_IN["falcon-7b-instruct"])
    assert falcon.kv_heads == 1 and falcon.parallel and falcon.norms == ("input_layernorm",)
    assert Architecture.of(BUILT_IN["baichuan2-13b-chat"]).alibi and not Architecture.of(BUILT_IN["baichuan2-7b-chat"]).eager_attention
    assert Architecture.of(BUILT_IN["bloom-7b1"]).eager_attention


def test_a_config_without_a_shape_is_one_line():
    with pytest.raises(UserError, match="model_type 'mystery'.*cannot read its shape"):
        Architecture.of({"model_type": "mystery"})
