"""Batched generation shared by prediction, chat and federated evaluation.

build_prompt: a conversation → the prompt ids for the reply to its last turn, rendered and cut
(the end of the user's text, never the template) exactly as training renders and cuts them.
generate_ids: prompts → newly generated ids per prompt, in input order. Prompts are sorted by
length (longest first) and batched; the attention mask gives every row its own positions, so greedy
output does not depend on the batch size in float32 (in bf16 a matmul's rounding does). On native
transformers models the tokens every prompt starts with are encoded once and the rest of each batch
in length-sorted chunks (see `SharedPrefix`);
otherwise, and for beam search, batches are left-padded. Each row is cut before its first stop token
and to its own token budget; a batch stops when every row has produced a stop token or the largest
budget in the batch is spent (KV cache on). Beam search with budgets that differ within a batch
searches to the largest one, then cuts, so it may differ from one-at-a-time."""

import copy
from collections.abc import Callable

import torch
from transformers import GenerationConfig
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from fora.args.data import DEFAULT_LENGTH
from fora.data.encode import encode, render_turns
from fora.data.formats import Conversation
from fora.errors import note_once


def build_prompt(
    tokenizer, template, conversation: Conversation, max_source_length: int, max_target_length: int
) -> tuple[list[int], bool]:
    """Prompt ids for the reply to the last turn, and whether anything was cut (see `fit_turns`)."""
    ids, cut, left_out = fit_turns(tokenizer, template, conversation, max_source_length, max_target_length)
    return ids, cut or left_out > 0


def inference_lengths(max_source_length: int | None, recorded: dict) -> tuple[int, int]:
    """The prompt and reply lengths prediction and chat cut to: --max_source_length, else the ones training
    recorded (`recorded`: the run record as a dict, empty without one), else DEFAULT_LENGTH."""
    source = max_source_length or recorded.get("max_source_length") or DEFAULT_LENGTH
    return source, recorded.get("max_target_length") or DEFAULT_LENGTH


def fit_turns(
    tokenizer, template, conversation: Conversation, max_source_length: int, max_target_length: int
) -> tuple[list[int], bool, int]:
    """Prompt ids for the reply to the last turn, whether a turn was cut, and how many of the oldest
    turns were left out (the chat reports them).

    Every prompt is fitted to `max_source_length` as training fits it (the end of the user's text
    cut, the template and its assistant header kept whole), each history reply cut to
    `max_target_length`; when the turn to answer no longer fits after them, the oldest turns are
    left out until it does, so the prompt always ends with the question being asked.
    """
    turns = list(conversation.turns)
    turns[-1] = (turns[-1][0], None)  # the reply is generated, never shown
    for first in range(len(turns)):
        segments = render_turns(
            tokenizer, template, conversation.where, conversation.system, turns[first:], max_source_length
        )
        ids, _, cut = encode(segments, max_source_length, max_target_length)
        last_prompt = segments[-1].prompt
        if ids[len(ids) - len(last_prompt):] == last_prompt:
            return ids, cut, first
    raise AssertionError("unreachable: a single turn always fits")


def generation_config(
    tokenizer,
    stop_ids: list[int],
    do_sample: bool = False,
    num_beams: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    model=None,
) -> GenerationConfig:
    """A complete config: `generate` fills every field left unset from the model's generation_config.json
    (Baichuan2's carries repetition_penalty 1.05, top_k 5, sampling on), so every sampling and penalty
    field is set here, to off unless asked for. With `model`, its own generation config is the start
    instead, and only the stop, padding and cache fields are set."""
    if model is not None:
        config = copy.deepcopy(model.generation_config)
        config.update(eos_token_id=list(stop_ids), pad_token_id=tokenizer.pad_token_id, use_cache=True)
        return config
    return GenerationConfig(
        do_sample=do_sample,
        num_beams=num_beams,
        eos_token_id=list(stop_ids),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        use_cache=True,
        # Sampling filters act only when sampling; otherwise they get transformers' own defaults, which it does
        # not warn about, instead of the model's (unused, but reported as "not valid" flags).
        **(dict(temperature=temperature, top_p=top_p, top_k=0, min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)
           if do_sample else dict(temperature=1.0, top_p=1.0, top_k=50)),
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        length_penalty=1.0,
        min_length=0,
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
    on_shrink: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """The new token ids for each prompt, in input order, cut before the first stop token.

    `max_new_tokens` is one budget for all or one per prompt. `config` (see `generation_config`)
    chooses greedy, beam search or sampling; default greedy. Sampled output depends on the batching.
    With `on_shrink`, a batch that runs out of memory (`out_of_memory`) is tried again at half the size,
    and so are the batches after it, the finished ones kept; `on_shrink(old, new)` is told each time.
    """
    from tqdm import tqdm

    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(budgets)} budgets")
    config = decodable_only(config or generation_config(tokenizer, stop_ids), model, tokenizer)
    stop = set(stop_ids)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # stable: equal lengths keep input order
    device = next(model.parameters()).device
    results: list[list[int] | None] = [None] * len(prompts)
    with tqdm(total=len(prompts), desc="Generating", unit="sample", disable=not progress) as bar, torch.inference_mode():
        # generate() cannot widen a given cache for beams, so beam search takes the plain path.
        use_prefix = config.num_beams == 1 and takes_reserved_cache(model)
        if config.num_beams == 1 and not use_prefix:
            note_once(f"note: {model.config.model_type}: generating with left-padded batches, without the shared-prefix "
                      "and reserved-cache fast path (proven for transformers' own full-attention models only)")
        shared = SharedPrefix.encode(model, prompts, device) if use_prefix else None
        start = 0
        while start < len(order):
            rows = order[start : start + batch_size]
            batch = [prompts[i] for i in rows]
            # The batch runs to its largest budget (or until every row has stopped); each row is cut to its own.
            batch_config = copy.deepcopy(config)
            batch_config.max_new_tokens = max(budgets[i] for i in rows)
            if shared is None:
                input_ids, attention_mask = left_padded(batch, tokenizer.pad_token_id, device)
                cache = None
            else:
                input_ids, attention_mask, cache = shared.prefill(
                    model, batch, tokenizer.pad_token_id, batch_config.max_new_tokens
                )
            given_cache = {} if cache is None else {"cache": cache}  # remote-code models take no `cache` argument
            try:
                output = model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, generation_config=batch_config, **given_cache
                )
            except (RuntimeError, MemoryError) as error:
                if on_shrink is None or batch_size == 1 or not out_of_memory(error):
                    raise
                del input_ids, attention_mask, cache, given_cache
                release_device_memory()
                on_shrink(batch_size, batch_size // 2)
                batch_size //= 2
                continue
            for row, index in enumerate(rows):
                new = output[row, input_ids.shape[1] :].tolist()[: budgets[index]]
                cut = next((k for k, token in enumerate(new) if token in stop), len(new))
                results[index] = new[:cut]
            bar.update(len(rows))
            start += len(rows)
    return results


# What an allocation that failed says: torch's OutOfMemoryError ("CUDA out of memory"), cuBLAS and cuDNN failing to
# get their workspace, the CPU allocator. accelerate's batch search knows only some of them.
OUT_OF_MEMORY_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                          "CUDNN_STATUS_NOT_SUPPORTED", "can't allocate memory")


def out_of_memory(error: BaseException) -> bool:
    """True when `error` says an allocation failed (so a smaller batch may fit)."""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or any(m in str(error) for m in OUT_OF_MEMORY_MESSAGES)


def release_device_memory() -> None:
    """Give back what a failed batch held before a smaller one tries."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def decodable_only(config: GenerationConfig, model, tokenizer) -> GenerationConfig:
    """`config`, never choosing an id the tokenizer has no text for: many models pad their output vocabulary past
    the tokenizer's (ChatGLM2: 65024 rows for 64794 ids), and decoding such an id fails."""
    head, config_of = model.get_output_embeddings(), model.config
    # ChatGLM keeps its head out of sight of get_output_embeddings; its config names the padded width.
    outputs = head.weight.shape[0] if head is not None else getattr(config_of, "padded_vocab_size", None) or config_of.vocab_size
    if outputs <= len(tokenizer):
        return config
    config = copy.deepcopy(config)
    config.suppress_tokens = list(range(len(tokenizer), outputs))
    return config


def left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return input_ids, attention_mask


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()



# --- Prefill from a shared prefix into a reserved cache ---------------------------------------------
# Prompts of one task share their start (the system prompt and the instruction, often a third of a
# prompt), so its keys and values are computed once and copied into every batch. The rows are laid
# out [shared prefix | padding | rest of the prompt]: the prefix sits in the same columns in every row,
# and positions come from the attention mask, so the padding gap changes nothing. The rest is
# encoded in length-sorted chunks of about PREFILL_TOKENS (little padding, bounded activations) into
# one cache for the whole batch, which then decodes together: decoding is bound by streaming the
# weights, so more rows per step cost little, while prefill costs per padded token.

PREFILL_TOKENS = 4096


def takes_reserved_cache(model) -> bool:
    """Native transformers models whose layers all attend to the full context (no sliding window)
    accept a cache built outside `generate`; remote code keeps its own cache format, and prefix and prompt
    tuning put virtual tokens in the cache or the input (PEFT's own generate)."""
    if hasattr(model, "active_peft_config") and model.active_peft_config.is_prompt_learning:
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.is_custom_code():  # checked first: a remote config may not describe its layers the way DynamicCache reads them
        return False
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=base.config).layers)


class ReservedLayer(DynamicLayer):
    """A KV-cache layer whose room is allocated once, so a decoding step writes one column instead of
    concatenating the whole cache anew (DynamicLayer). `keys`/`values` are views of the filled part."""

    def __init__(self, batch_size: int, room: int):
        super().__init__()
        self.batch_size, self.room = batch_size, room

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        heads, _, dim = key_states.shape[1:]
        # Zeros, not empty: padding columns are masked, but a masked NaN would still poison attention.
        self.key_room = key_states.new_zeros(self.batch_size, heads, self.room, dim)
        self.value_room = value_states.new_zeros(self.batch_size, heads, self.room, value_states.shape[-1])
        self.keys, self.values = self.key_room[:, :, :0], self.value_room[:, :, :0]
        self.is_initialized = True

    def write(self, rows: slice, start: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Put states into columns `start`… of `rows`; the filled part grows to cover them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = start + key_states.shape[-2]
        self.key_room[rows, :, start:end] = key_states
        self.value_room[rows, :, start:end] = value_states
        filled = max(end, self.keys.shape[-2])
        self.keys, self.values = self.key_room[:, :, :filled], self.value_room[:, :, :filled]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.write(slice(None), self.get_seq_length(), key_states, value_states)
        return self.keys, self.values


class SharedPrefix:
    """The keys and values of the tokens every prompt starts with, and the prefill that reuses them."""

    def __init__(self, ids: list[int], cache: DynamicCache):
        self.ids, self.cache = ids, cache

    @classmethod
    def encode(cls, model, prompts: list[list[int]], device) -> "SharedPrefix":
        first, shortest = prompts[0], min(map(len, prompts))
        length = 0  # at least one token of every prompt is left to the batch, which needs its logits
        while length < shortest - 1 and all(p[length] == first[length] for p in prompts):
            length += 1
        cache = DynamicCache()
        if length:
            ids = torch.tensor([first[:length]], device=device)
            model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        return cls(first[:length], cache)

    def repeated(self, rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's prefix keys and values, repeated for `rows` rows (views, not copies)."""
        layers = self.cache.layers
        return [(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1)) for layer in layers]

    def prefill(self, model, prompts: list[list[int]], pad_id: int, new_tokens: int):
        """input_ids and attention_mask for `generate`, and a cache holding every column but the last:
        `generate` encodes the last prompt token of every row itself, which gives the first logits.
        `prompts` must be sorted longest first and all start with the prefix."""
        device = next(model.parameters()).device
        start = len(self.ids)
        width = max(map(len, prompts))
        input_ids = torch.tensor([self.ids + [pad_id] * (width - len(p)) + p[start:] for p in prompts], device=device)
        attention_mask = torch.tensor(
            [[1] * start + [0] * (width - len(p)) + [1] * (len(p) - start) for p in prompts], device=device
        )
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        layers = model.config.get_text_config(decoder=True).num_hidden_layers
        cache = Cache(layers=[ReservedLayer(len(prompts), width + new_tokens) for _ in range(layers)])
        for layer, (keys, values) in zip(cache.layers, self.repeated(len(prompts))):
            layer.write(slice(None), 0, keys, values)
        first = 0
        while first < len(prompts):
            # Rows are sorted longest first, so the chunk's first row sets its width.
            rest = len(prompts[first]) - start
            count = max(1, PREFILL_TOKENS // rest)
            rows = slice(first, first + count)
            columns = slice(width - rest, width - 1)
            if rest > 1:
                states = DynamicCache(self.repeated(len(prompts[rows])))  # a copy: encoding appends to it
                model(
                    input_ids=input_ids[rows, columns],
                    attention_mask=torch.cat([attention_mask[rows, :start], attention_mask[rows, columns]], dim=-1),
                    position_ids=positions[rows, columns],
                    cache=states,
                    use_cache=True,
                    logits_to_keep=1,
                )
                for layer, chunk_layer in zip(cache.layers, states.layers):
                    layer.write(rows, columns.start, chunk_layer.keys[:, :, start:], chunk_layer.values[:, :, start:])
            first += count
        return input_ids, attention_mask, cache
