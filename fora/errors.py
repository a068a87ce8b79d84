"""The one exception type for mistakes a user can make (bad data, bad flags, bad paths).

Raised with a one-line message that names the file, the record or line, and the field or flag;
caught once, at the entry point, which prints it and exits non-zero. Anything else is a bug and
keeps its traceback.
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
