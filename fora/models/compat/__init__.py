"""What the installed transformers needs from remote-code families written for transformers 4.x.

Baichuan, Baichuan2, ChatGLM2/3 and InternLM2 ship their architecture as Python files in the model folder
(`auto_map` in config.json / tokenizer_config.json). Those files rely on behaviour transformers 5 removed. Here the
classes they define are adapted at load time, in memory, keyed on what a class does rather than on its
name; the user's model folder and site-packages are never touched.

    compat.prepare_remote_code(path, trust_remote_code)  # refuses code without the flag; adapts the
    X.from_pretrained(path, ...)                          # folder's classes before they are instantiated
    compat.adapt_tokenizer(tokenizer)                     # per instance, after loading

Tokenizer classes
- `get_vocab` reached from the base `__init__` before the subclass has built its vocabulary
  (Baichuan2 calls `super().__init__` before loading `sp_model`): answered with the added tokens
  only while `__init__` runs, and the special tokens are registered again against the real
  vocabulary once it exists.
- `_pad` without the `padding_side` parameter (ChatGLM2/3): wrapped to accept it.
- role tokens encoded as text unless `encode_special_tokens` is on (ChatGLM3): switched on per
  instance, so `<|user|>` is one id, as in the model's own `build_chat_input`.
- a fast tokenizer class with its own `__init__` (InternLM2, which transformers 5 loads even when asked
  for the slow one): transformers builds a correct backend only for classes without an `__init__`, and
  hands this one bare vocabulary and merges (no byte fallback, no whitespace handling: it encodes unlike
  the slow tokenizer), from tokenizer.json or, without one, from the SentencePiece model; its own 4.x
  converter no longer runs. A tokenizer.json goes to its `__init__` whole; otherwise the backend is built
  from the .model as transformers builds it for the others, pieces renamed as added_tokens_decoder says.
Config classes
- `use_cache`, read by the modeling code, gone from transformers 5 configs: a class default (True, as in
  4.x). A depth named `num_layers` (ChatGLM) needs no `num_hidden_layers`: nothing builds a Cache from it.
- `rope_scaling`, in transformers 5 an alias of the standardized `rope_parameters` (never None): read as 4.x
  had it, None without scaling, else {"type", "factor"} (InternLM2 tests `is None`, then reads ["type"]).
Model classes
- tensors `__init__` computes that no checkpoint holds: plain attributes (Baichuan2-7B's rotary cos/sin
  caches) and non-persistent buffers (Baichuan-7B's, InternLM2's): transformers 5 builds the model under
  `torch.device("meta")`, so they stayed without data ("Cannot copy out of meta tensor", or garbage); as
  4.x did, a remote class is built with only its parameters on the meta device (accelerate's
  `init_empty_weights`), the rest computed on the CPU. transformers then swaps every non-persistent buffer
  for an empty one, which it leaves empty for remote code: `from_pretrained` puts the computed ones back.
- a generative class (its own `prepare_inputs_for_generation`) that does not inherit `GenerationMixin`,
  which `PreTrainedModel` no longer brings: given it as a last base, so `generate` exists.
- generation fields (`max_length`, ...) read from the config by `__init__` but gone from transformers 5
  configs: present, with their 4.x defaults, while `__init__` runs only (transformers 5 refuses to save
  or generate with a config holding them).
- `__init__` that never calls `post_init()` (ChatGLM): called after it.
- a parameter `__init__` builds in a hard-coded floating dtype (ChatGLM's sequence-classification head
  is always float16): given the dtype the model is built in (`config.dtype`, which transformers also
  makes torch's default while building), so a model loaded in float32 runs in float32 throughout.
- `_init_weights` of its own (ChatGLM's does nothing): transformers 5 builds a model on the meta device, so
  a module whose weights the checkpoint lacks (that sequence-classification head) holds only what
  `_init_weights` gives it, uninitialised memory here. The module's own `reset_parameters()` runs first,
  as its construction did under 4.x; the model's `_init_weights` then does what it does.
- `gradient_checkpointing_enable` of its own (ChatGLM3's takes only `gradient_checkpointing_kwargs`):
  transformers 5 calls it with `every_n_layers` and `offload` too; it gets the arguments it takes.
- `_tied_weights_keys` as a 4.x list of the weights tied to the input embeddings (InternLM2): read as the
  {target: source} mapping transformers 5 expects (saving calls `.keys()` on it).
- `position_ids`, which transformers 5's generate makes for every model whose `forward` takes them and
  passes for the whole sequence so far: 4.x passed none to a model's own `prepare_inputs_for_generation`,
  which derives its own (Baichuan-7B, Baichuan2-7B and InternLM2 would use them unsliced); left out.
- legacy tuple caches (`past_key_values` in `forward`): `generate` keeps no Cache object of its own
  for them and passes the model's tuples back under the old name; a Cache object given anyway (PEFT's
  prefix tuning passes its prefixes as one) reaches the 4.x code as tuples; the removed
  `_extract_past_from_model_output` is offered to the model's own `_update_model_kwargs_for_generation`,
  which is kept from extending an absent mask and whose cache goes back where beam search reorders it.
A model's positions are left to it: left padding shifts a row's rotary positions by a constant,
which attention does not see.
"""

import json
from pathlib import Path

from fora.errors import UserError
from fora.models.compat.models import adapt_config_class, adapt_model_class
from fora.models.compat.tokenizers import adapt_tokenizer_class

ADAPTED = "_fora_adapted"  # marks a class already adapted (classes are shared by every load)


def auto_map(folder: str) -> dict:
    """The `auto_map` entries of a local folder's config.json and tokenizer_config.json ({} for hub ids)."""
    entries = {}
    for name in ("config.json", "tokenizer_config.json"):
        path = Path(folder) / name
        if path.is_file():
            try:
                entries.update(json.loads(path.read_text(encoding="utf-8")).get("auto_map") or {})
            except (json.JSONDecodeError, AttributeError):
                pass  # a broken file is reported by transformers when it is read
    return entries


def needs_remote_code(folder: str) -> bool:
    """True when transformers can load the folder only by running its own Python files."""
    from transformers import CONFIG_MAPPING

    config_file = Path(folder) / "config.json"
    if not auto_map(folder):
        return False
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type") if config_file.is_file() else None
    except json.JSONDecodeError:
        return False
    return model_type not in CONFIG_MAPPING  # transformers loads known architectures natively, code or not


def prepare_remote_code(folder: str, trust_remote_code: bool, flag: str = "--model_name_or_path") -> None:
    """Before `from_pretrained(folder, ...)`: a folder that needs its own code is refused without
    --trust_remote_code (one line naming the flag); with it, every class the folder's `auto_map`
    names is adapted before transformers instantiates it (transformers reuses the loaded class
    while the folder's files are unchanged)."""
    entries = auto_map(folder)
    if entries and not trust_remote_code and needs_remote_code(folder):
        raise UserError(
            f"{flag} {folder}: the model ships its own Python code (auto_map in config.json); "
            "pass --trust_remote_code if you trust that folder"
        )
    if entries and trust_remote_code:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        for reference in entries.values():
            for name in reference if isinstance(reference, list) else [reference]:
                if name:
                    adapt_class(get_class_from_dynamic_module(name, folder))


def adapt_class(cls: type) -> type:
    """Adapt a remote-code tokenizer, config or model class in place (once)."""
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    if cls.__dict__.get(ADAPTED):
        return cls
    if issubclass(cls, PreTrainedTokenizerBase):
        adapt_tokenizer_class(cls)
    elif issubclass(cls, PretrainedConfig):
        adapt_config_class(cls)
    elif issubclass(cls, PreTrainedModel):
        adapt_model_class(cls)
    setattr(cls, ADAPTED, True)
    return cls


def adapt_tokenizer(tokenizer):
    """Per-instance adaptations of a loaded tokenizer; returns it."""
    # ChatGLM3: role tokens in a prompt are single ids only with this on (its own build_chat_input
    # inserts them as ids); the templates write them as text.
    if getattr(tokenizer, "encode_special_tokens", None) is False:
        tokenizer.encode_special_tokens = True
    return tokenizer
