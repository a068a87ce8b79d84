"""Batched generation shared by prediction, chat and federated evaluation.

build_prompt: a conversation → the prompt ids for the reply to its last turn, rendered with the
template and cut with `fora.data.encode`, exactly as training renders and cuts them.
generate_ids: prompts → newly generated ids per prompt, in input order. Prompts are sorted by
length (longest first) and batched with left padding; the attention mask gives every row its
own positions, so greedy output does not depend on the batch size. Each row is cut before its
first stop token and to its own token budget; a batch stops when every row has produced a stop
token or the largest budget in the batch is spent (KV cache on). Beam search with budgets that
differ within a batch searches to the largest one, then cuts, so it may differ from one-at-a-time.
"""

import copy

import torch
from transformers import GenerationConfig

from fora.data import Conversation, encode


def build_prompt(
    tokenizer, template, conversation: Conversation, max_source_length: int, max_target_length: int
) -> tuple[list[int], bool]:
    """Prompt ids for the reply to the last turn, and whether anything was cut.

    History turns are kept as training keeps them (each prompt cut to `max_source_length`, each
    reply to `max_target_length`); when the turn to answer no longer fits after them, the oldest
    turns are left out until it does, so the prompt always ends with the question being asked.
    """
    turns = list(conversation.turns)
    turns[-1] = (turns[-1][0], None)  # the reply is generated, never shown
    for first in range(len(turns)):
        segments = template.encode(tokenizer, conversation.system, turns[first:])
        ids, _, cut = encode(segments, max_source_length, max_target_length)
        last_prompt = segments[-1][0][:max_source_length]
        if ids[len(ids) - len(last_prompt):] == last_prompt:
            return ids, cut or first > 0
    raise AssertionError("unreachable: a single turn always fits")


def generation_config(
    tokenizer,
    stop_ids: list[int],
    do_sample: bool = False,
    num_beams: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> GenerationConfig:
    """A complete config, so nothing is inherited from the model's own generation_config.json."""
    sampling = dict(temperature=temperature, top_p=top_p) if do_sample else {}
    return GenerationConfig(
        do_sample=do_sample,
        num_beams=num_beams,
        eos_token_id=list(stop_ids),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        use_cache=True,
        **sampling,
    )


def generate_ids(
    model,
    tokenizer,
    prompts: list[list[int]],
    stop_ids: list[int],
    max_new_tokens: int | list[int],
    batch_size: int = 8,
    config: GenerationConfig | None = None,
    progress: bool = True,
) -> list[list[int]]:
    """The new token ids for each prompt, in input order, cut before the first stop token.

    `max_new_tokens` is one budget for all or one per prompt. `config` (see `generation_config`)
    chooses greedy, beam search or sampling; default greedy. Sampled output depends on the batching.
    """
    from tqdm import tqdm

    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(budgets)} budgets")
    config = config or generation_config(tokenizer, stop_ids)
    stop = set(stop_ids)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # stable: equal lengths keep input order
    device = next(model.parameters()).device
    results: list[list[int] | None] = [None] * len(prompts)
    with tqdm(total=len(prompts), desc="Generating", unit="sample", disable=not progress) as bar, torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in rows)
            input_ids = torch.tensor(
                [[tokenizer.pad_token_id] * (width - len(prompts[i])) + prompts[i] for i in rows], device=device
            )
            attention_mask = torch.tensor(
                [[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in rows], device=device
            )
            # The batch runs to its largest budget (or until every row has stopped); each row is cut to its own.
            batch_config = copy.deepcopy(config)
            batch_config.max_new_tokens = max(budgets[i] for i in rows)
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=batch_config)
            for row, index in enumerate(rows):
                new = output[row, width:].tolist()[: budgets[index]]
                cut = next((k for k, token in enumerate(new) if token in stop), len(new))
                results[index] = new[:cut]
            bar.update(len(rows))
    return results


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def generate_batched(
    model,
    tokenizer,
    prompts: list[list[int]],
    stop_ids: list[int],
    max_new_tokens: int | list[int],
    batch_size: int = 8,
    config: GenerationConfig | None = None,
    progress: bool = True,
) -> list[str]:
    """The generated text for each prompt, in input order (see `generate_ids`)."""
    ids = generate_ids(model, tokenizer, prompts, stop_ids, max_new_tokens, batch_size, config, progress)
    return [decode(tokenizer, i) for i in ids]
