"""Config and model classes written for transformers 4.x, adapted (see the package docstring for what and why)."""

import functools
import inspect

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


def adapt_config_class(cls) -> None:
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


def adapt_model_class(cls) -> None:
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
        cls.forward = _forward_taking_caches_as_tuples(cls.forward)
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


def _forward_taking_caches_as_tuples(forward):
    """`forward` given a Cache object as `past_key_values` (PEFT's prefix tuning passes its prefixes so) reads it
    as the tuple of (key, value) per layer the 4.x code indexes."""
    from transformers.cache_utils import Cache

    @functools.wraps(forward)
    def wrapped(self, *args, **kwargs):
        cache = kwargs.get("past_key_values")
        if isinstance(cache, Cache):
            kwargs["past_key_values"] = tuple((layer.keys, layer.values) for layer in cache.layers) if cache.get_seq_length() else None
        return forward(self, *args, **kwargs)

    return wrapped


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
