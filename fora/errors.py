"""The one exception type for mistakes a user can make (bad data, bad flags, bad paths).

Raised with a one-line message that names the file, the record or line, and the field or flag;
caught once, at the entry point (`fora.cli`), which prints it and exits non-zero. Anything else is a
bug and keeps its traceback. `note_once` prints the one-line note a fallback gives the first time it
is taken.
"""

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem in the user's input, explained in one line."""


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
