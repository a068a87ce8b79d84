"""From a conversation to training ids: render each turn with the template (prompts cut inside the user's
text), concatenate, and mask every prompt position, so only replies are trained."""

from fora.data.templates import Segment, Turn
from fora.errors import UserError

IGNORE_INDEX = -100


def render_turns(
    tokenizer, template, where: str, system: str | None, turns: list[Turn], max_source_length: int
) -> list[Segment]:
    """`template.encode` with every prompt fitted to `max_source_length` (the end of the user's text
    cut, the template kept whole); a limit too small for the template names the record."""
    try:
        return template.encode(tokenizer, system, turns, max_source_length)
    except UserError as error:
        raise UserError(f"{where}: {error}") from None


def encode(segments: list[Segment], max_source_length: int, max_target_length: int) -> tuple[list[int], list[int], bool]:
    """Concatenate rendered turns into input ids and labels (-100 on every prompt position).

    Prompts arrive fitted to `max_source_length` by `render_turns`. Each reply is cut to
    `max_target_length` (its stop token too when it falls past the cut); later turns that no longer
    fit in `max_source_length + max_target_length` are left out. Returns whether anything was cut,
    so callers can count and report it.
    """
    input_ids, labels, truncated = [], [], False
    for prompt_ids, response_ids, prompt_cut in segments:
        truncated = truncated or prompt_cut or len(response_ids) > max_target_length
        response_ids = response_ids[:max_target_length]
        if input_ids and len(input_ids) + len(prompt_ids) + len(response_ids) > max_source_length + max_target_length:
            truncated = True
            break
        input_ids += prompt_ids + response_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + response_ids
    return input_ids, labels, truncated


def tokenize_conversation(conversation: dict, tokenizer, template, max_source_length: int, max_target_length: int) -> dict:
    """One record ({"where", "system", "turns"}) as training input ids, labels and length."""
    turns = [tuple(t) for t in conversation["turns"]]
    segments = render_turns(tokenizer, template, conversation["where"], conversation["system"], turns, max_source_length)
    input_ids, labels, truncated = encode(segments, max_source_length, max_target_length)
    return {"input_ids": input_ids, "labels": labels, "length": len(input_ids), "truncated": truncated}
