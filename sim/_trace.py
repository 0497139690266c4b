"""The trace of a run: one line per thing that happened, hashed.

Every line starts with the virtual time in microseconds.  The hash covers
the lines only; ``detail`` (decoded frames and the like, computed only when
the trace is printed) is not hashed, so a printed replay hashes the same as
a silent one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TextIO

import trio

__all__ = ["Trace", "now_us", "reached"]


def now_us() -> int:
    """trio's (virtual) clock in integer microseconds (-1 outside a run)."""
    try:
        return round(trio.current_time() * 1_000_000)
    except RuntimeError:
        return -1


def reached(at_us: int) -> bool:
    """Whether the clock has reached ``at_us``, compared the way trio
    compares deadlines (so that waking at ``at_us / 1e6`` always counts)."""
    return trio.current_time() >= at_us / 1_000_000


class Trace:
    def __init__(self, echo: TextIO | None = None) -> None:
        self._hash = hashlib.blake2b(digest_size=16)
        self._echo = echo
        self.lines = 0

    @property
    def echo(self) -> bool:
        return self._echo is not None

    def emit(self, kind: str, text: str, detail: Callable[[], str] | None = None) -> None:
        line = f"{now_us():>13} {kind:<9} {text}"
        self._hash.update(line.encode())
        self._hash.update(b"\n")
        self.lines += 1
        if self._echo is not None:
            if detail is not None:
                line = f"{line}  {detail()}"
            print(line, file=self._echo)

    def fold(self, label: str, value: str) -> None:
        """Hash a value that is not a line of the trace (final states)."""
        self._hash.update(f"#{label}={value}\n".encode())

    def digest(self) -> str:
        return self._hash.hexdigest()
