"""fora/args/chat.py: the chat's flags, predict_fora.py's model flags with the same meaning, and their mistakes."""

import pytest

from fora.args import ChatArguments, PredictArguments, parse_args
from fora.errors import UserError


def test_the_model_flags_are_predict_fora_s():
    (args,) = parse_args((ChatArguments,), ["--model_dir", "out/adapter", "--temperature", "0", "--side_by_side"])
    assert (args.model_dir, args.temperature, args.side_by_side, args.max_new_tokens) == ("out/adapter", 0.0, True, 256)
    chat, predict = ChatArguments.__dataclass_fields__, PredictArguments.__dataclass_fields__
    for name in ("model_dir", "ori_model_dir", "template", "max_source_length", "torch_dtype", "quantization_bit",
                 "trust_remote_code"):
        assert (chat[name].default, chat[name].metadata) == (predict[name].default, predict[name].metadata), name


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model_dir", "a,b"], "--model_dir a,b: give one adapter or model folder, not a list"),
        (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1, got 0"),
        (["--max_source_length", "-3"], "--max_source_length must be at least 1, got -3"),
        (["--temperature", "-0.5"], "--temperature must not be negative, got -0.5"),
        (["--top_p", "0"], "--top_p must be in (0, 1], got 0.0"),
    ],
)
def test_mistakes_are_one_line(flags, message):
    with pytest.raises(UserError) as error:
        parse_args((ChatArguments,), flags)
    assert str(error.value) == message
