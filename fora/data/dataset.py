"""The tokenized training dataset of a data file, cached on disk under a key of everything that shapes it."""

import contextlib
import hashlib
import os
import shutil
from pathlib import Path

from fora.data.encode import tokenize_conversation
from fora.data.formats import load_conversations
from fora.errors import UserError

MOSTLY_EMPTY = 0.5  # --empty_response train refuses a file in which more than this share of responses is empty
CACHE_VERSION = "3"  # bump when encoding changes so old caches are not reused


def build_dataset(path: str, tokenizer, template, data_args, main_process_first, log):
    """Tokenized training dataset for `path`, cached under `--cache_dir` (rebuilt with `--overwrite_cache`).

    `main_process_first` is the Trainer's context manager, so under a multi-process launcher one
    rank builds the cache and the others load it.
    """
    import datasets

    key = _cache_key(path, tokenizer, template, data_args)
    cache = Path(data_args.cache_dir or Path(path).parent / ".fora_cache") / f"{Path(path).stem}-{key}"
    # Under a launcher only the first local rank rebuilds; the others then load what it wrote.
    rebuild = data_args.overwrite_cache and os.environ.get("LOCAL_RANK", "0") == "0"
    with main_process_first(desc=f"tokenizing {path}"):
        if cache.is_dir() and not rebuild:
            log(f"Reusing tokenized {path} from {cache}")
        else:
            _tokenize_to(cache, path, tokenizer, template, data_args, log)
        dataset = datasets.load_from_disk(str(cache))
    cut = sum(dataset["truncated"])
    if cut:
        log(
            f"{path}: {cut} of {len(dataset)} records were cut to --max_source_length "
            f"{data_args.max_source_length} / --max_target_length {data_args.max_target_length} (kept, shortened)"
        )
    return dataset.remove_columns("truncated")


def _tokenize_to(cache: Path, path: str, tokenizer, template, data_args, log) -> None:
    import datasets

    conversations, empty = load_conversations(
        path, data_args.data_format, data_args.prompt_column, data_args.response_column,
        empty_response=data_args.empty_response,
    )
    if empty:
        action = "left out" if data_args.empty_response == "skip" else "trained to answer with EOS alone"
        log(f"{path}: {empty} records have an empty response: {action} (--empty_response)")
    total = len(conversations) + (empty if data_args.empty_response == "skip" else 0)
    if data_args.empty_response == "train" and empty > MOSTLY_EMPTY * total:
        raise UserError(
            f"{path}: {empty} of {total} records have an empty response (a test split without references?); "
            "training on them teaches the model to answer nothing: pass --empty_response skip or error, or other data"
        )
    if not conversations:
        raise UserError(f"{path}: no records left to train on (all {empty} have an empty response; --empty_response skip)")
    rows = [{"where": c.where, "system": c.system, "turns": [list(t) for t in c.turns]} for c in conversations]
    dataset = datasets.Dataset.from_list(rows).map(
        tokenize_conversation,
        fn_kwargs=dict(
            tokenizer=tokenizer,
            template=template,
            max_source_length=data_args.max_source_length,
            max_target_length=data_args.max_target_length,
        ),
        remove_columns=["where", "system", "turns"],
        num_proc=data_args.preprocessing_num_workers if len(rows) >= 64 else None,
        desc=f"Tokenizing {Path(path).name}",
    )
    # Write to a temporary folder and rename, so an interrupted run never leaves half a cache. The
    # folder it replaces is renamed away, not deleted in place, so a run building the same cache at
    # the same moment never finds a half-deleted one.
    partial = cache.with_name(cache.name + f".tmp{os.getpid()}")
    stale = cache.with_name(cache.name + f".stale{os.getpid()}")
    dataset.save_to_disk(str(partial))
    with contextlib.suppress(FileNotFoundError):
        cache.rename(stale)
    try:
        partial.rename(cache)
    except OSError:  # another run put the same cache there in between: keep that one
        shutil.rmtree(partial)
    shutil.rmtree(stale, ignore_errors=True)


def _cache_key(path: str, tokenizer, template, data_args) -> str:
    digest = hashlib.sha256(Path(path).read_bytes() if Path(path).is_file() else b"")
    for part in (
        CACHE_VERSION,
        tokenizer.name_or_path,
        type(tokenizer).__name__,
        len(tokenizer),
        getattr(tokenizer, "chat_template", None),
        template.name,
        data_args.data_format,
        data_args.prompt_column,
        data_args.response_column,
        data_args.max_source_length,
        data_args.max_target_length,
        data_args.empty_response,
    ):
        digest.update(repr(part).encode())
    return digest.hexdigest()[:16]
