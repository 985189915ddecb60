"""The one exception type a user can cause.

Anything a user can get wrong (a path, a flag, a file's contents) raises ``UserError`` with a
message that says what is wrong, where, and what to do. The CLI prints it without a traceback and
exits with status 2; library callers can catch it like any exception.
"""


class UserError(Exception):
    """A bad input, explained in one paragraph for the person who typed it."""
