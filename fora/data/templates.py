"""Prompt templates: how a conversation becomes token ids, with the trained spans marked.

A conversation is an optional system text and a list of (user, assistant) turns. Rendering gives,
per turn, the prompt ids (masked in training) and the response ids (trained). Training and
prediction both go through `Template.encode`, so a prompt is built one way only. A prompt longer
than `max_source_length` loses the end of the user's text only (see `fit_user_text`).

Two kinds of template:
- `ChatTemplate` uses the tokenizer's own Jinja chat template (SmolLM2, Qwen2, Llama 3 instruct...).
- `NamedTemplate` is a fixed format chosen with `--template` for base models and the model families
  whose tokenizers ship without one (Baichuan2, ChatGLM2/3, InternLM...).
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from fora.errors import UserError
from fora.io import read_json

Turn = tuple[str, str | None]  # (user, assistant); assistant is None for the turn to be generated


class Segment(NamedTuple):
    """One rendered turn."""

    prompt: list[int]  # masked in training
    response: list[int]  # trained; empty for the turn to be generated
    cut: bool = False  # the user's text was shortened so the prompt fits max_source_length


def fit_user_text(encode_prompt: Callable[[str], list[int]], user: str, max_length: int | None) -> tuple[list[int], str]:
    """The prompt ids `encode_prompt(user)` and the user's text they hold, cut to fit `max_length`.

    Only the user's text is cut, and at its end: a record's instruction comes first and stays, and
    what the template writes around the text (system text, role headers, special tokens) stays whole.
    The shortened prompt is rendered and tokenized as a whole, like any other (a prompt that fits keeps
    exactly the ids it had), and has `max_length` tokens, or fewer only where one more character would
    not fit (a character of several tokens). A text is never cut inside a character.
    """
    ids = encode_prompt(user)
    if max_length is None or len(ids) <= max_length:
        return ids, user
    ids = encode_prompt("")
    if len(ids) > max_length:
        raise UserError(
            f"--max_source_length {max_length} leaves no room for the user's text: the template and system text "
            f"alone take {len(ids)} tokens"
        )
    # Binary search for the longest start of the text that fits: user[:fits] fits, user[:too_long] does not.
    fits, too_long = 0, len(user)
    while too_long - fits > 1:
        middle = (fits + too_long) // 2
        middle_ids = encode_prompt(user[:middle])
        if len(middle_ids) <= max_length:
            fits, ids = middle, middle_ids
        else:
            too_long = middle
    return ids, user[:fits]


@dataclass(frozen=True)
class NamedTemplate:
    name: str
    user: str  # one user message, ending with the assistant header; "{content}" and "{index}" (1, 2, ...) are replaced
    system: str = "{content}"  # how a system text is written before the first turn
    system_in_user: bool = False  # the system text goes inside the first user message (Llama 2)
    default_system: str = ""
    separator: str = ""  # between an assistant reply and the next user message (masked)
    stop: str | None = None  # text that ends a reply; None = the tokenizer's EOS token

    def encode(
        self, tokenizer, system: str | None, turns: list[Turn], max_source_length: int | None = None
    ) -> list[Segment]:
        system = system or self.default_system
        stop_ids = _stop_ids(tokenizer, self.stop)
        segments = []
        for index, (user, assistant) in enumerate(turns):
            system_text = self.system.format(content=system) if index == 0 and system else ""

            def encode_prompt(text: str, index: int = index, system_text: str = system_text) -> list[int]:
                if self.system_in_user:
                    prompt = self.user.format(content=system_text + text, index=index + 1)
                else:
                    prompt = system_text + self.user.format(content=text, index=index + 1)
                prompt = (self.separator if index else "") + prompt
                # The tokenizer's own special prefix (BOS, ChatGLM's [gMASK]sop) goes on the first segment only.
                return tokenizer.encode(prompt, add_special_tokens=index == 0)

            prompt_ids, kept = fit_user_text(encode_prompt, user, max_source_length)
            response_ids = [] if assistant is None else tokenizer.encode(assistant, add_special_tokens=False) + stop_ids
            segments.append(Segment(prompt_ids, response_ids, kept != user))
        return segments

    def stop_token_ids(self, tokenizer) -> list[int]:
        return sorted({tokenizer.eos_token_id, *_stop_ids(tokenizer, self.stop)} - {None})


class ChatTemplate:
    """The tokenizer's own chat template, split into turns by rendering growing prefixes."""

    name = "chat_template"

    def encode(
        self, tokenizer, system: str | None, turns: list[Turn], max_source_length: int | None = None
    ) -> list[Segment]:
        messages = [{"role": "system", "content": system}] if system else []
        segments, rendered = [], ""
        for user, assistant in turns:
            messages.append({"role": "user", "content": user})

            def render_with_header(text: str) -> str:
                messages[-1]["content"] = text
                return self._render(tokenizer, messages, add_generation_prompt=True)

            def encode_prompt(text: str, rendered: str = rendered) -> list[int]:
                return tokenizer.encode(render_with_header(text)[len(rendered):], add_special_tokens=False)

            prompt_ids, kept = fit_user_text(encode_prompt, user, max_source_length)
            with_header = render_with_header(kept)
            if not with_header.startswith(rendered):
                raise UserError(
                    "the tokenizer's chat template renders earlier turns differently once a turn is added; "
                    "pass --template NAME to use a fixed format"
                )
            response = ""
            if assistant is not None:
                messages.append({"role": "assistant", "content": assistant})
                full = self._render(tokenizer, messages, add_generation_prompt=False)
                response = full[len(with_header):]
                # Train on the reply and its end token only; what follows the end token (a newline)
                # belongs to the next prompt.
                end = response.find(tokenizer.eos_token, len(assistant))
                if end >= 0:
                    response = response[: end + len(tokenizer.eos_token)]
                rendered = with_header + response
            response_ids = tokenizer.encode(response, add_special_tokens=False) if response else []
            if assistant is not None and tokenizer.eos_token_id not in response_ids[-1:]:
                response_ids.append(tokenizer.eos_token_id)
            segments.append(Segment(prompt_ids, response_ids, kept != user))
        return segments

    @staticmethod
    def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def stop_token_ids(self, tokenizer) -> list[int]:
        return [tokenizer.eos_token_id]


def _stop_ids(tokenizer, stop: str | None) -> list[int]:
    if stop is None:
        return [tokenizer.eos_token_id]
    return tokenizer.encode(stop, add_special_tokens=False)


NAMED_TEMPLATES = {
    t.name: t
    for t in [
        NamedTemplate("default", user="Human: {content}\n\nAssistant: ", system="{content}\n\n", separator="\n\n"),
        NamedTemplate("empty", user="{content}"),
        NamedTemplate(
            "alpaca",
            user="### Instruction:\n{content}\n\n### Response:\n",
            system="{content}\n\n",
            default_system="Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.",
            separator="\n\n",
        ),
        NamedTemplate(
            "vicuna",
            user="USER: {content} ASSISTANT:",
            system="{content} ",
            default_system="A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        ),
        NamedTemplate(
            "chatml",
            user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
            system="<|im_start|>system\n{content}<|im_end|>\n",
            separator="\n",
            stop="<|im_end|>",
        ),
        NamedTemplate(
            "qwen",
            user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
            system="<|im_start|>system\n{content}<|im_end|>\n",
            default_system="You are a helpful assistant.",
            separator="\n",
            stop="<|im_end|>",
        ),
        NamedTemplate(
            "llama2", user="[INST] {content} [/INST]", system="<<SYS>>\n{content}\n<</SYS>>\n\n", system_in_user=True
        ),
        NamedTemplate(
            "llama3",
            user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
            stop="<|eot_id|>",
        ),
        NamedTemplate("baichuan", user="<reserved_102>{content}<reserved_103>"),
        NamedTemplate("baichuan2", user="<reserved_106>{content}<reserved_107>"),
        NamedTemplate("chatglm2", user="[Round {index}]\n\n问：{content}\n\n答：", separator="\n\n"),
        NamedTemplate("chatglm3", user="<|user|>\n {content}<|assistant|>", system="<|system|>\n {content}"),
        NamedTemplate(
            "internlm2",
            user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
            system="<|im_start|>system\n{content}<|im_end|>\n",
            separator="\n",
            stop="<|im_end|>",
        ),
    ]
}


def _chatglm_template(tokenizer, folder: Path) -> str | None:
    if tokenizer.convert_ids_to_tokens(tokenizer.convert_tokens_to_ids("<|user|>")) == "<|user|>":
        return "chatglm3"  # its role tokens are in the vocabulary
    return "chatglm2" if hasattr(tokenizer, "build_prompt") else None  # ChatGLM-6B (v1) has its own format


def _baichuan_template(tokenizer, folder: Path) -> str | None:
    # The chat models name their user token in generation_config.json; the base models have none.
    path = folder / "generation_config.json"
    user_token_id = read_json(path).get("user_token_id") if path.is_file() else None
    user_token = tokenizer.convert_ids_to_tokens(user_token_id) if user_token_id is not None else None
    return {"<reserved_106>": "baichuan2", "<reserved_102>": "baichuan"}.get(user_token)


# `--template auto` for families whose format is known: config.json model_type → the chosen template name.
FAMILY_TEMPLATES = {
    "chatglm": _chatglm_template,
    "baichuan": _baichuan_template,
    "internlm2": lambda tokenizer, folder: "internlm2",
}


def family_template(tokenizer) -> str | None:
    """The named template of the tokenizer's model family (read from its folder's config.json), if known."""
    folder = Path(getattr(tokenizer, "name_or_path", "") or "")
    config = folder / "config.json"
    if not config.is_file():
        return None
    choose = FAMILY_TEMPLATES.get(read_json(config).get("model_type"))
    return choose(tokenizer, folder) if choose else None


def get_template(tokenizer, name: str | None) -> NamedTemplate | ChatTemplate:
    """`--template NAME` wins; otherwise the model family's format (FAMILY_TEMPLATES); otherwise the
    tokenizer's chat template; otherwise `default`."""
    if name is None or name == "auto":
        if family := family_template(tokenizer):
            return NAMED_TEMPLATES[family]
        return ChatTemplate() if getattr(tokenizer, "chat_template", None) else NAMED_TEMPLATES["default"]
    if name == ChatTemplate.name:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("--template chat_template: this tokenizer has no chat template")
        return ChatTemplate()
    if name not in NAMED_TEMPLATES:  # flags are checked by their choices; this is a run record's
        raise UserError(f"template {name!r} is unknown; choose one of: auto, {ChatTemplate.name}, {', '.join(NAMED_TEMPLATES)}")
    return NAMED_TEMPLATES[name]


# --template's choices.
TemplateName = Literal[("auto", ChatTemplate.name, *NAMED_TEMPLATES)]
