"""The one exception type for mistakes a user can make (bad data, bad flags, bad paths).

Raised with a one-line message that names the file, the record or line, and the field or flag;
caught once, at the entry point, which prints it and exits non-zero. Anything else is a bug and
keeps its traceback. `read_json` and `utf8_text` read the files a user names and raise it.
`note_once` prints the one-line note a fallback gives the first time it is taken.
"""

import json
import sys
from collections.abc import Callable
from pathlib import Path


class UserError(Exception):
    """A problem in the user's input, explained in one line."""


def read_json(path: str | Path, flag: str = ""):
    """The parsed contents of a JSON file; a missing file, a folder, text that is not UTF-8 or bad JSON is a
    UserError that names the flag (when given), the file and the line."""
    where = f"{flag} {path}" if flag else str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{where}: is a directory, expected a JSON file") from None
    try:
        return json.loads(utf8_text(raw, where))
    except json.JSONDecodeError as error:
        raise UserError(f"{where}: line {error.lineno}: invalid JSON ({error.msg})") from None


def utf8_text(raw: bytes, where: str) -> str:
    """`raw` decoded as UTF-8 (a byte-order mark is accepted); any other encoding is a UserError naming the line."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise UserError(
            f"{where}: line {line}: not valid UTF-8 (byte {error.start}); convert it first, e.g. iconv -f GBK -t UTF-8"
        ) from None


def exit_on_user_error(main: Callable[[], object]) -> None:
    """Run an entry point: a user's mistake is one line on stderr and exit code 2; anything else is a bug."""
    from tqdm import tqdm

    try:
        main()
    except UserError as error:
        tqdm.write(f"error: {error}", file=sys.stderr)  # on a line of its own, also when a progress bar is open
        sys.exit(2)


_noted: set[str] = set()


def note_once(message: str) -> None:
    """Print `message` to stderr, the first time this process is given it."""
    if message not in _noted:
        _noted.add(message)
        print(message, file=sys.stderr)
