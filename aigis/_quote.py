"""How user-supplied text appears in error messages: control characters escaped, length bounded.

Config and manifest errors echo keys and values the user wrote; a raw escape sequence would
drive the terminal and a 10 MB value would make a 10 MB log line. Every such message goes
through these two functions.
"""

from __future__ import annotations

import reprlib

VALUE_LIMIT = 80  # characters of a value (its repr) shown in a message
LINE_LIMIT = 1000  # characters of one message line, file name included

_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxstring = VALUE_LIMIT
_repr.maxother = VALUE_LIMIT
_repr.maxlist = _repr.maxtuple = _repr.maxset = _repr.maxdict = 6
_repr.maxlong = 40


def escape(text: str, limit: int = LINE_LIMIT) -> str:
    """``text`` with every non-printable character escaped (``\\x1b``, ``\\n``, ``\\u202e``),
    cut to ``limit`` characters with a note of how many were left out."""
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
    if len(text) > limit:
        text = f"{text[: limit - 30]}... ({len(text) - limit + 30} more characters)"
    return text


def shown(value: object, limit: int = VALUE_LIMIT) -> str:
    """A short, escaped ``repr`` of ``value`` for a message (nesting and length bounded)."""
    try:
        text = _repr.repr(value)
    except (RecursionError, MemoryError, ValueError):  # ValueError: int too long to print
        text = f"<{type(value).__name__}>"
    return escape(text, limit)
