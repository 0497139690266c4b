"""Text bound for a terminal or a log line, with its control characters
escaped: a name or a path a client chose is shown as it is, never run as an
escape sequence, and never starts a line of its own (a forged log line)."""

from __future__ import annotations

from typing import Final

__all__ = ["escape_controls"]

_ESCAPES: Final = {
    c: {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}.get(c, f"\\x{c:02x}")
    for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))
}
_ESCAPES_BUT_NEWLINES: Final = {c: e for c, e in _ESCAPES.items() if c != 0x0A}


def escape_controls(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with each C0 and C1 control character (and DEL) written as
    an escape (``\\n``, ``\\x1b``...); ``keep_newlines``: newlines stay (a
    table's rows)."""
    return text.translate(_ESCAPES_BUT_NEWLINES if keep_newlines else _ESCAPES)
