"""Tokenizer classes written for transformers 4.x, adapted (see the package docstring for what and why)."""

import functools
import inspect
from pathlib import Path


def adapt_tokenizer_class(cls) -> None:
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
