"""Data formats: every supported format becomes the same `Conversation`, an optional system text and a
list of (user, assistant) turns. Formats are detected from the records or forced with `--data_format`:

- alpaca       `instruction`, `input`, `output` (+ optional `system`, `history` = [[user, assistant], ...])
- promptcblue  `input`, `target` (extra fields such as `type`, `answer_choices`, `sample_id` ignored)
- columns      any `--prompt_column` / `--response_column` pair
- xtuner       `conversation`: [{system?, input, output}, ...]
- sharegpt     `conversations`: [{from: system|human|gpt, value}, ...] (+ optional `system`)

A mistake in the data stops the run with one line naming the file, the line (JSON Lines) or record
(JSON array), and the field.
"""

from dataclasses import dataclass
from typing import Literal

from fora.data.records import Record, read_records
from fora.data.templates import Turn
from fora.errors import UserError

DataFormat = Literal["auto", "alpaca", "promptcblue", "columns", "xtuner", "sharegpt"]
EmptyResponse = Literal["train", "skip", "error"]


@dataclass
class Conversation:
    where: str  # the record's location, for error messages
    system: str | None
    turns: list[Turn]  # the last assistant is None when the record has no reference (prediction only)


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
