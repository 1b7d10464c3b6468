"""Text shown to the user: one-line errors and notes, with untrusted text made printable."""

from __future__ import annotations

import sys
import unicodedata
from collections.abc import Sequence
from typing import Any

PROG = "pyroflows"

#: Unicode categories shown as escapes: control, format (e.g. bidi overrides), surrogates,
#: line and paragraph separators.
_HIDDEN = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


class CLIError(Exception):
    """A problem with the user's input: printed as one line, exit status 1."""


def _escape(char: str) -> str:
    code = ord(char)
    if char in "\n\r\t":
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[char]
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: object) -> str:
    """``text`` with control characters (ESC, newlines, ``\\r``, bidi overrides, ...) escaped.

    Everything that comes from a model file, a CSV header or a path goes through this before
    it reaches the terminal or a CSV header.

    >>> printable("a\\x1b[31mb\\nc")
    'a\\\\x1b[31mb\\\\nc'
    """
    text = str(text)
    if text.isprintable():
        return text
    return "".join(
        _escape(c) if c != " " and unicodedata.category(c) in _HIDDEN else c for c in text
    )


def one_line(message: object) -> str:
    """``message`` as one printable line (line breaks inside it are shown escaped)."""
    return " ".join(printable(str(message).strip()).split()) or "unknown error"


def note(message: str) -> None:
    """An informational message; on stderr so stdout stays clean for data."""
    print(f"{PROG}: {printable(message)}", file=sys.stderr)


def say(message: str) -> None:
    """A line of the command's report on stdout."""
    print(printable(message))


def rows_text(rows: Sequence[Any], limit: int = 10) -> str:
    """``0, 3, 7`` or ``0, 1, ... (123 in all)``."""
    shown = ", ".join(str(r) for r in list(rows)[:limit])
    return shown + (f", ... ({len(rows)} in all)" if len(rows) > limit else "")


def names_text(names: Sequence[Any], limit: int = 12) -> str:
    """Quoted, printable names: ``'x', 'y'``."""
    shown = ", ".join(f"'{printable(n)}'" for n in list(names)[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
