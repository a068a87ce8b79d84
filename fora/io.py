"""Files the toolkit reads and writes, in one place: JSON a user names (one-line errors), atomic writes, and
the guard that keeps an earlier run's output from being overwritten.

- `read_json`, `utf8_text`: a missing file, a folder, text that is not UTF-8 or bad JSON is a `UserError`
  naming the flag, the file and the line.
- `write_text` / `write_json`: through a temporary file beside the target and a rename, so a reader finds
  the old file or the whole new one, never half of one. Folders are staged the same way (`STAGING_PREFIX`).
- `refuse_earlier_output`: an output folder holding an earlier run's files is replaced only with
  --overwrite_output_dir.
"""

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from fora.errors import UserError

# Files and folders are written under this prefix and renamed into place once complete. Nothing that looks
# for checkpoints or outputs matches a name that starts with it.
STAGING_PREFIX = ".tmp-"


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


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: `path` is the old file or the whole new one."""
    path = Path(path)
    partial = path.with_name(f"{STAGING_PREFIX}{path.name}.{os.getpid()}")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def write_json(path: Path, value, indent: int | None = 2) -> None:
    write_text(path, json.dumps(value, indent=indent, ensure_ascii=False) + "\n")


def refuse_earlier_output(folder: Path, markers: Iterable[str], overwrite: bool, otherwise: str = "") -> list[str]:
    """The names of an earlier run's files (those matching the glob patterns `markers`, in their order) in the
    output folder `folder`; without `overwrite` finding any is a UserError, `otherwise` naming another way out."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--output_dir {folder}: is a file, expected a folder")
    found = [path.name for marker in markers for path in sorted(folder.glob(marker))] if folder.is_dir() else []
    if found and not overwrite:
        raise UserError(f"--output_dir {folder} holds an earlier run ({found[0]}); pass --overwrite_output_dir to "
                        f"replace it{otherwise}")
    return found


def replace_dir(staging: Path, output_dir: Path) -> None:
    """Move the finished `staging` folder to `output_dir`, replacing what is there only once it is complete."""
    if output_dir.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
        backup.rmdir()
        output_dir.rename(backup)
        try:
            staging.rename(output_dir)
        except BaseException:
            backup.rename(output_dir)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    else:
        staging.rename(output_dir)
