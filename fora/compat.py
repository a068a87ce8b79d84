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
  for them and passes the model's tuples back under the old name; the removed
  `_extract_past_from_model_output` is offered to the model's own `_update_model_kwargs_for_generation`,
  which is kept from extending an absent mask and whose cache goes back where beam search reorders it.
A model's positions are left to it: left padding shifts a row's rotary positions by a constant,
which attention does not see.
"""

import functools
import inspect
import json
from pathlib import Path

from fora.errors import UserError

ADAPTED = "_fora_adapted"  # marks a class already adapted (classes are shared by every load)

# The generation fields every transformers 4.x config carried, with their 4.x defaults.
LEGACY_GENERATION_DEFAULTS = {
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "early_stopping": False,
    "num_beams": 1,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "num_return_sequences": 1,
    "output_scores": False,
    "return_dict_in_generate": False,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "remove_invalid_values": False,
    "exponential_decay_length_penalty": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
}


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
        _adapt_tokenizer_class(cls)
    elif issubclass(cls, PretrainedConfig):
        _adapt_config_class(cls)
    elif issubclass(cls, PreTrainedModel):
        _adapt_model_class(cls)
    setattr(cls, ADAPTED, True)
    return cls


def adapt_tokenizer(tokenizer):
    """Per-instance adaptations of a loaded tokenizer; returns it."""
    # ChatGLM3: role tokens in a prompt are single ids only with this on (its own build_chat_input
    # inserts them as ids); the templates write them as text.
    if getattr(tokenizer, "encode_special_tokens", None) is False:
        tokenizer.encode_special_tokens = True
    return tokenizer


# --- tokenizers ------------------------------------------------------------------------------------


def _adapt_tokenizer_class(cls) -> None:
    if "_pad" in cls.__dict__ and "padding_side" not in inspect.signature(cls._pad).parameters:
        side = inspect.signature(cls.__init__).parameters.get("padding_side")
        cls._pad = _pad_with_side(cls._pad, side.default if side and isinstance(side.default, str) else None)
    if "get_vocab" in cls.__dict__:
        cls.get_vocab = _vocab_during_init(cls.get_vocab)
        cls.__init__ = _init_registering_special_tokens(cls.__init__)
    from transformers import PreTrainedTokenizerFast

    if issubclass(cls, PreTrainedTokenizerFast) and "__init__" in cls.__dict__:
        cls.convert_to_native_format = classmethod(_native_from_sentencepiece(cls.convert_to_native_format.__func__))


def _native_from_sentencepiece(convert):
    """`convert_to_native_format` for a remote fast tokenizer with its own `__init__`, as transformers treats a
    class without one: a tokenizer.json goes to `__init__` whole (transformers means to do so for remote code,
    but from_pretrained never tells it the code is remote, and rebuilds a bare BPE from the file's vocabulary
    and merges instead); without one, the backend is built from the SentencePiece model."""

    @functools.wraps(convert)
    def convert_to_native_format(cls, trust_remote_code=False, **kwargs):
        vocab_file, tokenizer_file = kwargs.get("vocab_file"), kwargs.get("tokenizer_file")
        if isinstance(tokenizer_file, str) and Path(tokenizer_file).is_file():
            return kwargs  # `tokenizer_file` kept: `__init__` loads it, as transformers has it for remote code
        if not (isinstance(vocab_file, str) and vocab_file.endswith(".model") and Path(vocab_file).is_file()):
            return convert(cls, trust_remote_code=trust_remote_code, **kwargs)
        kwargs.pop("tokenizer_file", None)
        kwargs["tokenizer_object"] = _tokenizer_from_sentencepiece(vocab_file, kwargs.get("added_tokens_decoder") or {})
        return kwargs

    return convert_to_native_format


def _tokenizer_from_sentencepiece(path: str, added_tokens_decoder: dict):
    """A `tokenizers.Tokenizer` encoding like the SentencePiece model at `path`, its pieces renamed as
    tokenizer_config.json's added_tokens_decoder names them (InternLM2's chat tokens)."""
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = _sentencepiece_proto(path)
    names = {int(index): str(token) for index, token in added_tokens_decoder.items()}
    pieces = [names.get(index, piece.piece) for index, piece in enumerate(proto.pieces)]
    if proto.trainer_spec.model_type == 1:  # unigram
        vocab = [(piece, item.score) for piece, item in zip(pieces, proto.pieces)]
    else:
        vocab = {piece: index for index, piece in enumerate(pieces)}
    return SpmConverter.build_tokenizer_from_spm_proto(proto=proto, vocab=vocab)


def _sentencepiece_proto(path: str):
    """The parsed SentencePiece model. transformers reads it with sentencepiece's own protobuf module first,
    which does not import when the installed protobuf is older than the one it was generated with; the
    copy transformers ships reads the same format."""
    from transformers.convert_slow_tokenizer import import_protobuf

    data = Path(path).read_bytes()
    try:
        proto = import_protobuf().ModelProto()
    except Exception:  # any import or version error of that module
        from transformers.utils import sentencepiece_model_pb2_new

        proto = sentencepiece_model_pb2_new.ModelProto()
    proto.ParseFromString(data)
    return proto


def _pad_with_side(pad, own_side: str | None):
    """`pad` taking `padding_side`. `own_side` is the side the class pads by default (ChatGLM's `_pad`
    asserts it, also when nothing is padded); unpadded encodings run under it, whatever side the
    tokenizer was loaded with."""
    from transformers.utils import PaddingStrategy

    @functools.wraps(pad)
    def _pad(self, encoded_inputs, *args, padding_side=None, **kwargs):
        side = padding_side or self.padding_side
        if own_side and kwargs.get("padding_strategy") in (None, PaddingStrategy.DO_NOT_PAD):
            side = own_side
        if side == self.padding_side:
            return pad(self, encoded_inputs, *args, **kwargs)
        saved, self.padding_side = self.padding_side, side
        try:
            return pad(self, encoded_inputs, *args, **kwargs)
        finally:
            self.padding_side = saved

    return _pad


def _vocab_during_init(get_vocab):
    @functools.wraps(get_vocab)
    def wrapped(self):
        try:
            return get_vocab(self)
        except (AttributeError, TypeError):
            if not self.__dict__.get("_fora_initializing"):
                raise
            # Asked by the base __init__ before the subclass built its vocabulary: nothing but the
            # added tokens is known yet; the special tokens are registered again after __init__.
            self.__dict__["_fora_vocab_deferred"] = True
            return dict(self.__dict__.get("_added_tokens_encoder", {}))

    return wrapped


def _init_registering_special_tokens(init):
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if self.__dict__.get("_fora_initializing"):  # a subclass's wrapped __init__ is already running
            return init(self, *args, **kwargs)
        self.__dict__["_fora_initializing"] = True
        saved_added = dict(kwargs.get("added_tokens_decoder") or {})
        try:
            init(self, *args, **kwargs)
        finally:
            del self.__dict__["_fora_initializing"]
        if self.__dict__.pop("_fora_vocab_deferred", False):
            # The base gave the special tokens ids past an empty vocabulary; give them their real ones.
            self._added_tokens_decoder = dict(saved_added)
            self._added_tokens_encoder = {token.content: index for index, token in saved_added.items()}
            self._add_tokens(
                [token for token in self.all_special_tokens if token not in self._added_tokens_encoder], special_tokens=True
            )

    return __init__


# --- configs ---------------------------------------------------------------------------------------


def _adapt_config_class(cls) -> None:
    if not hasattr(cls, "use_cache"):
        cls.use_cache = True  # read by the modeling code; transformers 5 configs no longer carry it
    if "rope_scaling" not in vars(cls):
        cls.rope_scaling = _legacy_rope_scaling()


def _legacy_rope_scaling() -> property:
    """`rope_scaling` as 4.x configs held it: None without scaling, else {"type": ..., "factor": ...}.
    transformers 5 makes it an alias of `rope_parameters`, which is never None once standardized
    ({"rope_type": "default", "rope_theta": ...}), so 4.x code testing `rope_scaling is None` then
    reading `rope_scaling["type"]` fails (InternLM2)."""

    def get(self):
        parameters = getattr(self, "rope_parameters", None)
        if not isinstance(parameters, dict) or not ({"type", "rope_type"} & parameters.keys()):
            return parameters  # None, or per-layer-type parameters: left as they are
        kind = parameters.get("type", parameters.get("rope_type"))
        if kind == "default":
            return None
        return {"type": kind, **{key: value for key, value in parameters.items() if key not in ("type", "rope_type", "rope_theta")}}

    def set(self, value):
        # As transformers' own setter, without its deprecation warning (the 4.x __init__ assigns it on every load).
        self.rope_parameters = value
        if value is not None and getattr(self, "_post_init_done", False):
            self.standardize_rope_params()

    return property(get, set)


# --- models ----------------------------------------------------------------------------------------


def _adapt_model_class(cls) -> None:
    from transformers import GenerationMixin, PreTrainedModel

    cls.__init__ = _init_with_real_tensors(_init_with_post_init(cls.__init__))
    if isinstance(getattr(cls, "_tied_weights_keys", None), (list, tuple)):
        cls._tied_weights_keys = _tied_to_input_embeddings(cls._tied_weights_keys)
    # On the file's first model class, so that every model class of the file, nested ones too, has it.
    base = next(klass for klass in reversed(cls.__mro__) if klass.__module__ == cls.__module__)
    if base._init_weights is not PreTrainedModel._init_weights and not hasattr(base._init_weights, "_fora_resets"):
        base._init_weights = _init_weights_after_reset(base._init_weights)
    if not hasattr(cls.from_pretrained, "_fora_restores"):  # a subclass inherits its parent's
        cls.from_pretrained = _from_pretrained_restoring_buffers(cls.from_pretrained.__func__)
    enable = cls.gradient_checkpointing_enable
    if enable is not PreTrainedModel.gradient_checkpointing_enable and not hasattr(enable, "_fora_own_arguments"):
        cls.gradient_checkpointing_enable = _with_its_own_arguments(enable)
    # Only a class that defines its own generation step generates; others (ChatGLM's sequence classifier takes
    # `past_key_values` too) are adapted for what they have, and a subclass inherits its parent's adaptation.
    if "prepare_inputs_for_generation" not in vars(cls):
        return
    if not issubclass(cls, GenerationMixin):
        cls.__bases__ = (*cls.__bases__, GenerationMixin)  # PreTrainedModel brought `generate` until 4.50
    if "past_key_values" in inspect.signature(cls.forward).parameters:
        cls._supports_default_dynamic_cache = classmethod(lambda klass: False)
        cls.prepare_inputs_for_generation = _prepare_legacy_inputs(cls.prepare_inputs_for_generation)
        if not hasattr(cls, "_extract_past_from_model_output"):
            cls._extract_past_from_model_output = _extract_past_from_model_output
        if "_update_model_kwargs_for_generation" in vars(cls):
            cls._update_model_kwargs_for_generation = _update_without_empty_inputs(cls._update_model_kwargs_for_generation)


def _init_with_real_tensors(init):
    """`__init__` that, under transformers 5's meta-device build, puts only the parameters on the meta device."""

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        import torch

        if torch.get_default_device().type != "meta":  # built for real, or already inside this wrapper
            return init(self, *args, **kwargs)
        from accelerate import init_empty_weights

        # Tensors computed here and kept outside parameters and buffers (Baichuan2-7B's rotary cos/sin caches)
        # are never in the checkpoint: built on meta, they would stay without data. 4.x built them for real.
        with torch.device("cpu"), init_empty_weights(include_buffers=False):
            init(self, *args, **kwargs)
        # `post_init` saw the CPU and ran the weight initialisation transformers skips on meta, marking every module
        # done: unmarked, a module the checkpoint lacks (ChatGLM's sequence-classification head) is initialised once
        # it is off the meta device, as for any model.
        for module in self.modules():
            module.__dict__.pop("_is_hf_initialized", None)
        # transformers then swaps every non-persistent buffer for an empty one, which it leaves as it is for remote
        # code: the values computed here are kept until the model is loaded (`_from_pretrained_restoring_buffers`).
        for module in self.modules():
            built = {name: module._buffers[name] for name in module._non_persistent_buffers_set if module._buffers.get(name) is not None}
            if built:
                module.__dict__["_fora_built_buffers"] = built

    return __init__


def _init_with_post_init(init):
    from transformers import PretrainedConfig

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        config = args[0] if args and isinstance(args[0], PretrainedConfig) else kwargs.get("config")
        # Generation fields exist on the config only while the model is built: the modeling code reads
        # them there, and transformers 5 refuses to save or generate with a config that holds them.
        missing = [name for name in LEGACY_GENERATION_DEFAULTS if config is not None and not hasattr(config, name)]
        for name in missing:
            setattr(config, name, LEGACY_GENERATION_DEFAULTS[name])
        try:
            init(self, *args, **kwargs)
        finally:
            for name in missing:
                delattr(config, name)
        if missing and getattr(self, "generation_config", None) is not None:
            from transformers import GenerationConfig

            # Built by PreTrainedModel.__init__ while the fields were there; rebuilt from the config as it is.
            self.generation_config = GenerationConfig.from_model_config(config)
        if not hasattr(self, "all_tied_weights_keys"):  # the remote __init__ skipped post_init()
            self.post_init()
        _parameters_in_build_dtype(self)

    return __init__


def _from_pretrained_restoring_buffers(from_pretrained):
    """`from_pretrained` after which every module gets back the non-persistent buffers its `__init__` computed
    (kept by `_init_with_real_tensors`)."""
    import torch

    @functools.wraps(from_pretrained)
    def wrapped(cls, *args, **kwargs):
        loaded = from_pretrained(cls, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives a tuple
        with torch.no_grad():
            for module in model.modules():
                for name, value in module.__dict__.pop("_fora_built_buffers", {}).items():
                    target = module._buffers.get(name)
                    if target is not None and target.shape == value.shape:
                        target.copy_(value)
        return loaded

    wrapped._fora_restores = True
    return classmethod(wrapped)


def _init_weights_after_reset(init_weights):
    @functools.wraps(init_weights)
    def _init_weights(self, module):
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()  # torch's own initialisation, which 4.x gave every module when it was built
        return init_weights(self, module)

    _init_weights._fora_resets = True
    return _init_weights


def _with_its_own_arguments(method):
    """`method` called with only the keyword arguments its signature names (all of them if it takes **kwargs)."""
    parameters = inspect.signature(method).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return method

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        return method(self, *args, **{key: value for key, value in kwargs.items() if key in parameters})

    wrapped._fora_own_arguments = True
    return wrapped


def _parameters_in_build_dtype(model) -> None:
    """Floating parameters built in another dtype than the model's (`config.dtype`) are converted to it;
    modules the class keeps in float32 (`_keep_in_fp32_modules`) are left alone."""
    import torch

    dtype = getattr(model.config, "dtype", None)
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        return
    kept = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, module in model.named_modules():
        if kept.intersection(name.split(".")):
            continue
        for key, param in list(module.named_parameters(recurse=False)):
            if param.is_floating_point() and param.dtype != dtype:
                module._parameters[key] = torch.nn.Parameter(param.to(dtype), requires_grad=param.requires_grad)


def _tied_to_input_embeddings(targets) -> property:
    """`_tied_weights_keys` as transformers 5 reads it, {target: source}, from the 4.x list of targets, whose
    source was the input embeddings (InternLM2 lists "output.weight"); save_pretrained calls `.keys()` on it."""

    def get(self):
        embeddings = self.get_input_embeddings()
        source = next((f"{name}.weight" for name, module in self.named_modules() if module is embeddings), None)
        return {target: source for target in targets} if source else {}

    return property(get)


def _prepare_legacy_inputs(prepare):
    @functools.wraps(prepare)
    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        # transformers 5 hands the previous step's cache back as `cache`; the model reads `past_key_values`.
        cache = kwargs.pop("cache", None)
        if kwargs.get("past_key_values") is None and cache is not None:
            kwargs["past_key_values"] = cache
        kwargs.pop("next_sequence_length", None)
        kwargs.pop("position_ids", None)  # generate's, made for the whole sequence; the model derives its own
        return prepare(self, input_ids, *args, **kwargs)

    return prepare_inputs_for_generation



def _update_without_empty_inputs(update):
    @functools.wraps(update)
    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        # transformers 5 keeps `attention_mask: None` where it dropped an all-ones mask; ChatGLM's
        # override extends whatever key is present.
        model_kwargs = {key: value for key, value in model_kwargs.items() if value is not None or key != "attention_mask"}
        model_kwargs = update(self, outputs, model_kwargs, *args, **kwargs)
        # The override stores the cache under its old name; generate (beam reordering) looks under `cache` first.
        if "past_key_values" in model_kwargs:
            model_kwargs["cache"] = model_kwargs.pop("past_key_values")
        return model_kwargs

    return _update_model_kwargs_for_generation


def _extract_past_from_model_output(self, outputs, standardize_cache_format: bool = False):
    """The cache of a model output (removed from transformers, called by ChatGLM's generation override)."""
    return outputs.get("cache", outputs.get("past_key_values"))
