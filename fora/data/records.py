"""Reading a data file: a JSON array or JSON Lines, whatever its suffix, each record with its location
("FILE: line N" for JSON Lines, "FILE: record N" for an array) for the one-line errors that name it."""

import json
from dataclasses import dataclass
from pathlib import Path

from fora.errors import UserError
from fora.io import utf8_text


@dataclass
class Record:
    where: str  # "FILE: line N" or "FILE: record N", for error messages
    value: object


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
