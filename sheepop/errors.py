"""One exception type for everything a user can get wrong.

The CLI catches `UserError` and prints its message as a single line (no traceback) with a
non-zero exit. Raise it wherever the input alone shows the problem, as early as possible.
"""


class UserError(Exception):
    """Bad input: the message names the bad value and what would be valid."""

    exit_code = 2
