"""The one exception type a user can cause.

Anything a user can get wrong (a path, a flag, a file's contents) raises ``UserError`` with a
message that says what is wrong, where, and what to do. The CLI prints it without a traceback and
exits with status 2; library callers can catch it like any exception.
"""


class UserError(Exception):
    """A bad input, explained in one paragraph for the person who typed it."""


_KINDS = {type(None): "null", bool: "a boolean", int: "an int", float: "a float", str: "a string", list: "a list",
          dict: "an object (a mapping)"}


def kind_of(value) -> str:
    """A value's type as an error message names it, with its article: "an int", "a list", "null" (JSON's words for
    what a data file or YAML preset held)."""
    name = _KINDS.get(type(value)) or type(value).__name__
    return name if name in _KINDS.values() else ("an " if name[0].lower() in "aeiou" else "a ") + name
