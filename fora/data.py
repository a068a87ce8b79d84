"""Data: read a file → validate → normalise every format to a conversation → tokenize and mask → cache.

Every supported format becomes the same `Conversation`: an optional system text and a list of
(user, assistant) turns. Formats are detected from the records or forced with `--data_format`:

- alpaca       `instruction`, `input`, `output` (+ optional `system`, `history` = [[user, assistant], ...])
- promptcblue  `input`, `target` (extra fields such as `type`, `answer_choices`, `sample_id` ignored)
- columns      any `--prompt_column` / `--response_column` pair
- xtuner       `conversation`: [{system?, input, output}, ...]
- sharegpt     `conversations`: [{from: system|human|gpt, value}, ...] (+ optional `system`)

A file may be a JSON array or JSON Lines whatever its suffix. A mistake in the data stops the run
with one line naming the file, the line (JSON Lines) or record (JSON array), and the field.
"""

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from fora.errors import UserError, utf8_text
from fora.templates import Segment, Turn

IGNORE_INDEX = -100
FORMATS = ("auto", "alpaca", "promptcblue", "columns", "xtuner", "sharegpt")
MOSTLY_EMPTY = 0.5  # --empty_response train refuses a file in which more than this share of responses is empty
CACHE_VERSION = "3"  # bump when encoding changes so old caches are not reused


@dataclass
class Record:
    where: str  # "FILE: line N" or "FILE: record N", for error messages
    value: object


@dataclass
class Conversation:
    where: str  # the record's location, for error messages
    system: str | None
    turns: list[Turn]  # the last assistant is None when the record has no reference (prediction only)


def read_records(path: str) -> list[Record]:
    """Records of a JSON array or JSON Lines file, each with its location for error messages."""
    file = Path(path)
    if not file.exists():
        raise UserError(f"{path}: no such file")
    if file.is_dir():
        raise UserError(f"{path}: is a directory, expected a JSON or JSON Lines file")
    raw = file.read_bytes()
    text = utf8_text(raw, path)
    if not text.strip():
        raise UserError(f"{path}: the file is empty")
    first_line = text.lstrip().split("\n", 1)[0].rstrip()
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as error:
        # JSON Lines when the first value ended on its line ("Extra data" follows) or when a record
        # starts on the first line; otherwise a JSON document (array, or object over several lines).
        json_lines = error.msg == "Extra data" and "\n" not in text[: error.pos].strip()
        json_lines = json_lines or (first_line.startswith("{") and first_line != "{")
        if not json_lines:
            raise UserError(f"{path}: line {error.lineno}: invalid JSON ({error.msg}, column {error.colno})") from None
    else:
        if isinstance(whole, list):
            if not whole:
                raise UserError(f"{path}: the JSON array is empty")
            return [Record(f"{path}: record {i}", value) for i, value in enumerate(whole, 1)]
        if "\n" in text.strip():  # one value over several lines; a one-line value is JSON Lines, below
            return [Record(f"{path}: record 1", whole)]
    records = []
    # Split on "\n" only: str.splitlines() would also split at U+2028 and other breaks inside strings.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append(Record(f"{path}: line {number}", json.loads(line)))
        except json.JSONDecodeError as error:
            raise UserError(f"{path}: line {number}: invalid JSON ({error.msg}, column {error.colno})") from None
    return records


@dataclass
class Columns:
    """Which field of a record holds what (alpaca / promptcblue / columns formats)."""

    prompt: str
    response: str
    instruction: str | None = None
    system: str | None = None
    history: str | None = None


def detect_format(
    records: list[Record], path: str, data_format: str, prompt_column: str | None, response_column: str | None
) -> str:
    if data_format != "auto":
        return data_format
    keys = set().union(*(r.value.keys() for r in records if isinstance(r.value, dict)))
    if "conversations" in keys:
        return "sharegpt"
    if "conversation" in keys:
        return "xtuner"
    if "instruction" in keys:
        return "alpaca"
    if {"input", "target"} <= keys:
        return "promptcblue"
    if prompt_column and response_column:
        return "columns"
    raise UserError(
        f"{path}: cannot tell the data format from the fields {sorted(keys)}; "
        "pass --data_format or --prompt_column and --response_column"
    )


def columns_for(data_format: str, prompt_column: str | None, response_column: str | None) -> Columns:
    defaults = {
        "alpaca": Columns("input", "output", instruction="instruction", system="system", history="history"),
        "promptcblue": Columns("input", "target"),
        "columns": Columns(prompt_column or "", response_column or ""),
    }[data_format]
    if data_format == "columns" and not (prompt_column and response_column):
        raise UserError("--data_format columns needs --prompt_column and --response_column")
    defaults.prompt = prompt_column or defaults.prompt
    defaults.response = response_column or defaults.response
    return defaults


def load_conversations(
    path: str,
    data_format: str = "auto",
    prompt_column: str | None = None,
    response_column: str | None = None,
    require_response: bool = True,
    empty_response: str = "train",
) -> tuple[list[Conversation], int]:
    """Read and validate a data file; every record becomes a `Conversation`.

    With `require_response=False` (prediction) a record may lack its reference: its last turn's
    assistant is None. A reply that is empty text is handled by `empty_response`: "train" keeps it
    (the model learns to answer with EOS alone, as extraction data with nothing to extract needs),
    "skip" drops the record, "error" stops. Returns the conversations and how many had an empty reply.
    """
    conversations = _convert(
        read_records(path), path, data_format, prompt_column, response_column, require_response,
        reject_empty=empty_response == "error",
    )
    empty = [c for c in conversations if any(a is not None and not a.strip() for _, a in c.turns)]
    if empty_response == "skip":
        skipped = {id(c) for c in empty}
        conversations = [c for c in conversations if id(c) not in skipped]
    return conversations, len(empty)


def _convert(
    records, path, data_format, prompt_column, response_column, require_response, reject_empty
) -> list[Conversation]:
    for record in records:
        if not isinstance(record.value, dict):
            raise UserError(f"{record.where}: the record is a {_json_type(record.value)}, expected an object")
    data_format = detect_format(records, path, data_format, prompt_column, response_column)
    if data_format in ("alpaca", "promptcblue", "columns"):
        columns = columns_for(data_format, prompt_column, response_column)
        for flag, column in (("--prompt_column", prompt_column), ("--response_column", response_column)):
            if column and not any(column in r.value for r in records):
                raise UserError(f"{path}: column {column!r} given by {flag} is in no record")
        if not any(columns.response in r.value for r in records) and require_response:
            raise UserError(f"{path}: no record has the response field {columns.response!r}")
        return [_from_columns(r, columns, require_response, reject_empty) for r in records]
    convert = _from_xtuner if data_format == "xtuner" else _from_sharegpt
    return [convert(r, require_response, reject_empty) for r in records]


def _from_columns(record: Record, columns: Columns, require_response: bool, reject_empty: bool) -> Conversation:
    value = record.value
    instruction = _text(record, columns.instruction) if columns.instruction else ""
    query = _text(record, columns.prompt)
    user = "\n".join(part for part in (instruction, query) if part)
    if not user.strip():
        raise UserError(f"{record.where}: field {columns.prompt!r} is missing or empty (and there is no instruction)")
    history = []
    if columns.history and value.get(columns.history):
        pairs = value[columns.history]
        if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in pairs
        ):
            raise UserError(f"{record.where}: field {columns.history!r} must be a list of [user, assistant] string pairs")
        history = [tuple(p) for p in pairs]
        for i, (_, assistant) in enumerate(history):
            _response(record, f"{columns.history}[{i}][1]", assistant, True, reject_empty)
    system = _text(record, columns.system) if columns.system else ""
    response = _response(record, columns.response, value.get(columns.response), require_response, reject_empty)
    return Conversation(record.where, system or None, history + [(user, response)])


def _from_xtuner(record: Record, require_response: bool, reject_empty: bool) -> Conversation:
    turns_value = record.value.get("conversation")
    if not isinstance(turns_value, list) or not turns_value:
        raise UserError(f"{record.where}: field 'conversation' must be a non-empty list of {{input, output}} objects")
    system, turns = None, []
    for i, turn in enumerate(turns_value):
        field = f"conversation[{i}]"
        if not isinstance(turn, dict):
            raise UserError(f"{record.where}: {field} is a {_json_type(turn)}, expected an object")
        if i == 0 and turn.get("system"):
            system = _check_str(record, f"{field}.system", turn["system"])
        user = _check_str(record, f"{field}.input", turn.get("input"))
        last = i == len(turns_value) - 1
        assistant = _response(record, f"{field}.output", turn.get("output"), require_response or not last, reject_empty)
        turns.append((user, assistant))
    return Conversation(record.where, system, turns)


def _from_sharegpt(record: Record, require_response: bool, reject_empty: bool) -> Conversation:
    messages = record.value.get("conversations")
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{record.where}: field 'conversations' must be a non-empty list of {{from, value}} objects")
    system = record.value.get("system")
    system = _check_str(record, "system", system) if system is not None else None
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    turns, user = [], None
    for i, message in enumerate(messages):
        field = f"conversations[{i}]"
        if not isinstance(message, dict):
            raise UserError(f"{record.where}: {field} is a {_json_type(message)}, expected an object")
        role = roles.get(message.get("from"))
        value = _check_str(record, f"{field}.value", message.get("value"))
        if role == "system" and i == 0:
            system = value
        elif role == "user" and user is None:
            user = value
        elif role == "assistant" and user is not None:
            turns.append((user, _response(record, f"{field}.value", value, True, reject_empty)))
            user = None
        else:
            raise UserError(
                f"{record.where}: {field}.from is {message.get('from')!r}; expected human and gpt turns in alternation"
            )
    if user is not None:  # a final user turn without its answer
        if require_response:
            raise UserError(f"{record.where}: the last turn of 'conversations' has no gpt answer")
        turns.append((user, None))
    if not turns:
        raise UserError(f"{record.where}: field 'conversations' has no human turn")
    return Conversation(record.where, system, turns)


def _text(record: Record, field: str) -> str:
    """An optional text field: missing or null is empty."""
    value = record.value.get(field)
    return "" if value is None else _check_str(record, field, value)


def _check_str(record: Record, field: str, value) -> str:
    if value is None:
        raise UserError(f"{record.where}: field {field!r} is missing")
    if not isinstance(value, str):
        raise UserError(f"{record.where}: field {field!r} must be a string, got {_json_type(value)}")
    return value


def _response(record: Record, field: str, value, required: bool, reject_empty: bool) -> str | None:
    """A reply: missing or null is an error in training and "no reference" in prediction.

    Empty text is a valid reply unless `reject_empty` (--empty_response error).
    """
    if value is None and not required:
        return None
    value = _check_str(record, field, value)
    if reject_empty and not value.strip():
        raise UserError(
            f"{record.where}: field {field!r} is empty (pass --empty_response train or skip to accept such records)"
        )
    return value


def _json_type(value) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


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
