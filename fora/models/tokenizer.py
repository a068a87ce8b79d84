"""The tokenizer, always from the folder holding the model's weights (the base under an adapter), so training,
prediction, merging and chat encode a prompt to the same ids; adapter and merged folders get the base's
tokenizer files byte for byte."""

import shutil
from pathlib import Path

from fora.errors import UserError
from fora.models import compat

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")

# Every file a tokenizer may be made of, remote-code tokenizers (tokenization_*.py, *.tiktoken) included.
TOKENIZER_PATTERNS = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "chat_template.*",
    "*.model", "*.tiktoken", "tokenization_*.py",
)


def load_tokenizer(
    model_path: str, trust_remote_code: bool = False, padding_side: str = "right", flag: str = "--model_name_or_path"
):
    """The tokenizer of the model folder `model_path` (the base, under an adapter); `flag` names where the
    path came from, for the error message. A missing pad token becomes EOS (padding is masked anyway)."""
    from transformers import AutoTokenizer

    folder = Path(model_path)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{flag} {model_path}: the folder has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    compat.prepare_remote_code(model_path, trust_remote_code, flag)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code, padding_side=padding_side)
    except OSError as error:  # e.g. a path that does not exist, taken for a hub id, with no network
        problem = "cannot load its tokenizer" if folder.is_dir() else "no such folder, and not fetchable as a hub id"
        raise UserError(f"{flag} {model_path}: {problem} ({str(error).splitlines()[0]})") from None
    compat.adapt_tokenizer(tokenizer)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked by attention_mask and labels, so any token serves.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def save_base_tokenizer(base: str, destination: Path, trust_remote_code: bool) -> None:
    """The base's tokenizer files into `destination`, byte for byte: re-saving a tokenizer can change it
    (transformers 5 drops settings such as Baichuan2's add_bos_token: false), and an adapter or merged
    folder must encode as training did, also for someone loading it with plain transformers.
    A hub id's tokenizer (no local files to copy) is saved by transformers."""
    if not Path(base).is_dir():
        load_tokenizer(base, trust_remote_code, flag="--base_model").save_pretrained(destination)
        return
    for pattern in TOKENIZER_PATTERNS:
        for source in Path(base).glob(pattern):
            if source.is_file():
                shutil.copy2(source, Path(destination) / source.name)
