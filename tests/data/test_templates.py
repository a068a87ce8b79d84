"""fora/data/templates.py: which template applies, the text each renders, the trained part, a long prompt's cut, family templates."""

import json
from pathlib import Path

import pytest

from fora.data.templates import NAMED_TEMPLATES, ChatTemplate, get_template
from fora.errors import UserError
from fora.models.tokenizer import load_tokenizer

TURNS = [("Hi", "Hello"), ("And?", "Bye")]


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def rendered(tokenizer, template, system, turns) -> str:
    """The whole conversation as text, prompts and replies concatenated."""
    segments = template.encode(tokenizer, system, turns)
    return "".join(decode(tokenizer, s.prompt) + decode(tokenizer, s.response) for s in segments)


# --- which template applies ------------------------------------------------------------------


def test_tokenizer_chat_template_is_used_when_there_is_one(tokenizer):
    assert isinstance(get_template(tokenizer, None), ChatTemplate)
    assert isinstance(get_template(tokenizer, "auto"), ChatTemplate)


def test_default_template_without_a_chat_template(plain_tokenizer):
    assert plain_tokenizer.chat_template is None
    assert get_template(plain_tokenizer, None) is NAMED_TEMPLATES["default"]


def test_named_template_wins_over_the_chat_template(tokenizer):
    assert get_template(tokenizer, "chatml") is NAMED_TEMPLATES["chatml"]


def test_unknown_template_name_is_a_user_error(tokenizer):
    with pytest.raises(UserError, match=r"^template 'nope' is unknown; choose one of: .*chatml.*llama3") as error:
        get_template(tokenizer, "nope")
    assert "\n" not in str(error.value)


def test_chat_template_requested_but_tokenizer_has_none(plain_tokenizer):
    with pytest.raises(UserError, match="^--template chat_template: this tokenizer has no chat template"):
        get_template(plain_tokenizer, "chat_template")


# --- named templates: literal text ---------------------------------------------------------------


def test_default_renders_human_assistant(plain_tokenizer):
    assert rendered(plain_tokenizer, NAMED_TEMPLATES["default"], None, TURNS) == (
        "Human: Hi\n\nAssistant: Hello<|im_end|>\n\nHuman: And?\n\nAssistant: Bye<|im_end|>"
    )


def test_default_writes_a_system_text_on_its_own_paragraph(plain_tokenizer):
    assert rendered(plain_tokenizer, NAMED_TEMPLATES["default"], "Be brief.", TURNS[:1]) == (
        "Be brief.\n\nHuman: Hi\n\nAssistant: Hello<|im_end|>"
    )


def test_chatml_renders_literally(plain_tokenizer):
    assert rendered(plain_tokenizer, NAMED_TEMPLATES["chatml"], "Be brief.", TURNS) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nAnd?<|im_end|>\n<|im_start|>assistant\nBye<|im_end|>"
    )


def test_llama3_renders_literally(plain_tokenizer):
    assert rendered(plain_tokenizer, NAMED_TEMPLATES["llama3"], "Be brief.", TURNS) == (
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nBye<|eot_id|>"
    )


def test_llama2_puts_the_system_inside_the_first_instruction(plain_tokenizer):
    assert rendered(plain_tokenizer, NAMED_TEMPLATES["llama2"], "Be brief.", TURNS) == (
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]Hello<|im_end|>[INST] And? [/INST]Bye<|im_end|>"
    )


def test_chatglm2_numbers_its_rounds(plain_tokenizer):
    assert rendered(plain_tokenizer, NAMED_TEMPLATES["chatglm2"], None, TURNS) == (
        "[Round 1]\n\n问：Hi\n\n答：Hello<|im_end|>\n\n[Round 2]\n\n问：And?\n\n答：Bye<|im_end|>"
    )


def test_alpaca_uses_its_default_system(plain_tokenizer):
    text = rendered(plain_tokenizer, NAMED_TEMPLATES["alpaca"], None, TURNS[:1])
    assert text == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nHi\n\n### Response:\nHello<|im_end|>"
    )


# --- named templates: the trained part -----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(NAMED_TEMPLATES))
def test_only_the_reply_and_its_stop_are_trained(plain_tokenizer, name):
    template = NAMED_TEMPLATES[name]
    stop = template.stop or plain_tokenizer.eos_token
    segments = template.encode(plain_tokenizer, "Sys text", [("first question", "first answer"), ("second", "end")])
    assert [decode(plain_tokenizer, s.response) for s in segments] == ["first answer" + stop, "end" + stop]
    prompts = [decode(plain_tokenizer, s.prompt) for s in segments]
    assert "Sys text" in prompts[0] and "first question" in prompts[0]
    assert "second" in prompts[1] and "Sys text" not in prompts[1]


def test_prediction_turn_has_a_prompt_and_no_reply(plain_tokenizer):
    template = NAMED_TEMPLATES["default"]
    (prompt, response, _), = template.encode(plain_tokenizer, None, [("Hi", None)])
    assert response == []
    assert decode(plain_tokenizer, prompt) == "Human: Hi\n\nAssistant: "


def test_stop_token_ids(plain_tokenizer):
    eos = plain_tokenizer.eos_token_id
    assert NAMED_TEMPLATES["default"].stop_token_ids(plain_tokenizer) == [eos]
    assert NAMED_TEMPLATES["chatml"].stop_token_ids(plain_tokenizer) == [eos]  # <|im_end|> is SmolLM2's EOS
    llama3_stop = plain_tokenizer.encode("<|eot_id|>", add_special_tokens=False)
    assert NAMED_TEMPLATES["llama3"].stop_token_ids(plain_tokenizer) == sorted({eos, *llama3_stop})


def test_braces_in_the_text_are_kept(plain_tokenizer):
    text = rendered(plain_tokenizer, NAMED_TEMPLATES["default"], None, [('{"a": "{content}"}', "{index}")])
    assert text == 'Human: {"a": "{content}"}\n\nAssistant: {index}<|im_end|>'


# --- the tokenizer's chat template -----------------------------------------------------------------


def test_chat_template_matches_apply_chat_template(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}]
    for user, assistant in TURNS:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    reference = tokenizer.apply_chat_template(messages, tokenize=False)
    assert reference.endswith("<|im_end|>\n")
    # The newline after the last end token is not part of any turn.
    assert rendered(tokenizer, ChatTemplate(), "Be brief.", TURNS) == reference[:-1]


def test_chat_template_splits_prompts_and_replies(tokenizer):
    segments = ChatTemplate().encode(tokenizer, None, TURNS)
    prompts = [decode(tokenizer, s.prompt) for s in segments]
    replies = [decode(tokenizer, s.response) for s in segments]
    assert replies == ["Hello<|im_end|>", "Bye<|im_end|>"]
    # No system given: SmolLM2's template writes its own.
    assert prompts[0] == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompts[1] == "\n<|im_start|>user\nAnd?<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_empty_reply_trains_the_end_token_alone(tokenizer):
    (_, response, _), = ChatTemplate().encode(tokenizer, None, [("Anything?", "")])
    assert response == [tokenizer.eos_token_id]


def test_chat_template_prediction_turn(tokenizer):
    (prompt, response, _), = ChatTemplate().encode(tokenizer, "S", [("Hi", None)])
    assert response == []
    assert decode(tokenizer, prompt).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_that_rewrites_earlier_turns_is_refused(tiny_model):
    tokenizer = load_tokenizer(str(tiny_model))  # a fresh copy: the session fixture stays untouched
    tokenizer.chat_template = (
        "turns: {{ messages | length }}\n{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    with pytest.raises(UserError, match="pass --template NAME"):
        ChatTemplate().encode(tokenizer, None, [("Hi", "Hello"), ("And?", "Bye")])


# --- a prompt longer than max_source_length: the end of the user's text is cut, the template stays --------
# Through generate.build_prompt, the prediction prompt; training cuts the same way (data/test_encode.py, infer/test_generate.py).

LONG_USER = "请你帮我抽取出关系三元组。文本：" + "The pump leaks oil; 发动机水温高，风扇转速慢。" * 30


SYSTEM = "Be brief."


def all_templates():
    return [pytest.param(name, id=name) for name in [*sorted(NAMED_TEMPLATES), ChatTemplate.name]]


def template_and_tokenizer(name, tokenizer, plain_tokenizer):
    return (ChatTemplate(), tokenizer) if name == ChatTemplate.name else (NAMED_TEMPLATES[name], plain_tokenizer)


def uncut_prompt(tokenizer, template, user: str) -> list[int]:
    return template.encode(tokenizer, SYSTEM, [(user, None)])[0][0]


def prompt_for(tokenizer, template, user: str, max_source_length: int) -> tuple[list[int], bool]:
    from fora.data.formats import Conversation
    from fora.infer.generate import build_prompt

    conversation = Conversation("test.json: line 1", SYSTEM, [(user, None)])
    return build_prompt(tokenizer, template, conversation, max_source_length, 64)


@pytest.mark.parametrize("name", all_templates())
def test_long_prompt_keeps_the_template_and_the_start_of_the_user_text(tokenizer, plain_tokenizer, name):
    template, tokenizer = template_and_tokenizer(name, tokenizer, plain_tokenizer)
    marked = uncut_prompt(tokenizer, template, "USER-TEXT-HERE")
    head, tail = decode(tokenizer, marked).split("USER-TEXT-HERE")  # the system part and the assistant header
    limit = len(marked) + 40
    prompt, cut = prompt_for(tokenizer, template, LONG_USER, limit)
    assert cut
    text = decode(tokenizer, prompt)
    assert text.startswith(head) and text.endswith(tail)
    kept = text[len(head) : len(text) - len(tail)]
    assert 0 < len(kept) < len(LONG_USER) and LONG_USER.startswith(kept)
    # Every special token of the template is there, in order (the header's included).
    specials = set(tokenizer.all_special_ids)
    assert [t for t in prompt if t in specials] == [t for t in marked if t in specials]
    # Exactly the limit, or fewer only where one more character would not fit.
    assert len(prompt) == limit or len(uncut_prompt(tokenizer, template, LONG_USER[: len(kept) + 1])) > limit
    assert len(prompt) <= limit


@pytest.mark.parametrize("name", all_templates())
def test_prompt_that_fits_is_encoded_as_without_a_limit(tokenizer, plain_tokenizer, name):
    """Prompts that fit keep the ids they always had, so caches and references made before still hold."""
    template, tokenizer = template_and_tokenizer(name, tokenizer, plain_tokenizer)
    uncut = uncut_prompt(tokenizer, template, LONG_USER)
    assert prompt_for(tokenizer, template, LONG_USER, len(uncut)) == (uncut, False)


def test_every_turn_of_a_conversation_is_fitted(tokenizer):
    """The chat template renders each turn after the earlier ones as they were cut."""
    turns = [(LONG_USER, "first answer"), (LONG_USER, "second answer"), ("short", None)]
    segments = ChatTemplate().encode(tokenizer, None, turns, 80)
    assert [s.cut for s in segments] == [True, True, False]
    header = "<|im_end|>\n<|im_start|>assistant\n"
    for segment in segments:
        assert len(segment.prompt) <= 80 and decode(tokenizer, segment.prompt).endswith(header)
    assert [decode(tokenizer, s.response) for s in segments[:2]] == ["first answer<|im_end|>", "second answer<|im_end|>"]


@pytest.mark.parametrize("name", ["alpaca", ChatTemplate.name])
def test_limit_below_the_template_alone_is_a_user_error(tokenizer, plain_tokenizer, name):
    template, tokenizer = template_and_tokenizer(name, tokenizer, plain_tokenizer)
    bare = uncut_prompt(tokenizer, template, "")
    with pytest.raises(UserError) as error:
        prompt_for(tokenizer, template, LONG_USER, len(bare) - 1)
    assert str(error.value) == (
        f"test.json: line 1: --max_source_length {len(bare) - 1} leaves no room for the user's text: "
        f"the template and system text alone take {len(bare)} tokens"
    )


# --- the family's own template, from its config and tokenizer (the families themselves: test_families.py) ------


class StubTokenizer:
    """What family_template reads from a tokenizer: its folder and its id → token mapping."""

    def __init__(self, folder: Path, tokens: dict[int, str]):
        self.name_or_path, self.tokens = str(folder), tokens

    def convert_ids_to_tokens(self, index):
        return self.tokens.get(index)

    def convert_tokens_to_ids(self, token):
        return next((i for i, t in self.tokens.items() if t == token), 0)


@pytest.mark.parametrize(
    ("model_type", "generation", "tokens", "expected"),
    [
        ("baichuan", {"user_token_id": 195}, {195: "<reserved_102>"}, "baichuan"),  # Baichuan-13B-Chat
        ("baichuan", {"user_token_id": 195}, {195: "<reserved_106>"}, "baichuan2"),
        ("baichuan", None, {195: "<reserved_102>"}, None),  # Baichuan-7B: a base model, no chat format
        ("internlm2", None, {}, "internlm2"),
        ("llama", None, {}, None),  # Llama 2 or 3, chat or base: the tokenizer's chat template decides
    ],
)
def test_family_template_from_config_and_tokenizer(model_type, generation, tokens, expected, tmp_path):
    from fora.data.templates import family_template

    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    if generation:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    assert family_template(StubTokenizer(tmp_path, tokens)) == expected


def test_family_template_with_a_broken_generation_config(tmp_path):
    """A hand-edited generation_config.json that is not JSON is a one-line error naming the file and line."""
    from fora.data.templates import family_template
    from fora.errors import UserError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "baichuan"}))
    (tmp_path / "generation_config.json").write_text('{\n  "user_token_id": 195,\n}')
    with pytest.raises(UserError, match=r"generation_config.json: line 3: invalid JSON"):
        family_template(StubTokenizer(tmp_path, {195: "<reserved_106>"}))
