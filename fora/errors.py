"""The one exception type for mistakes a user can make (bad data, bad flags, bad paths).

Raised with a one-line message that names the file, the record or line, and the field or flag;
caught once, at the entry point, which prints it and exits non-zero. Anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A problem in the user's input, explained in one line."""
