"""Hybrid logical clocks and the per-field merge rule (pure, no trio)."""

from __future__ import annotations

from typing import Any

import attrs

__all__ = ["Hlc", "HlcClock", "MergeOutcome", "merge_fields"]


@attrs.frozen(order=True)
class Hlc:
    """A stamp ``(wall_ms, counter, writer)``; compares in that order, so a
    tie on time is broken by the writer id: the same everywhere."""

    wall_ms: int
    counter: int
    writer: str

    def encode(self) -> str:
        return f"{self.wall_ms:013d}:{self.counter:06d}:{self.writer}"

    @classmethod
    def decode(cls, text: str) -> Hlc:
        wall, counter, writer = text.split(":", 2)
        return cls(int(wall), int(counter), writer)

    @classmethod
    def parse_client(cls, value: Any, writer: str) -> Hlc | None:
        """A client-supplied stamp: ``[wall_ms, counter]`` or ``{"wall_ms":..,"counter":..}``."""
        if isinstance(value, list | tuple) and len(value) == 2:
            wall, counter = value
        elif isinstance(value, dict):
            wall, counter = value.get("wall_ms"), value.get("counter", 0)
        else:
            return None
        if type(wall) is not int or type(counter) is not int or wall < 0 or counter < 0:
            return None  # (not a bool either)
        return cls(wall, counter, writer)


@attrs.define
class HlcClock:
    """The local clock of one writer (a session actor)."""

    node: str
    last: Hlc | None = None

    def tick(self, now_ms: int, writer: str) -> Hlc:
        """A stamp for a local event at wall time ``now_ms``."""
        if self.last is None or now_ms > self.last.wall_ms:
            stamp = Hlc(now_ms, 0, writer)
        else:
            stamp = Hlc(self.last.wall_ms, self.last.counter + 1, writer)
        self.last = stamp
        return stamp

    def observe(self, remote: Hlc, now_ms: int) -> None:
        """Take a remote stamp into account so later ticks order after it."""
        wall = max(now_ms, remote.wall_ms, self.last.wall_ms if self.last else 0)
        counter = 0
        if self.last is not None and wall == self.last.wall_ms:
            counter = self.last.counter + 1
        if wall == remote.wall_ms:
            counter = max(counter, remote.counter + 1)
        self.last = Hlc(wall, counter, self.node)


@attrs.frozen
class MergeOutcome:
    """What a per-field merge decided."""

    applied: dict[str, Any]
    """Fields whose new value won."""
    overwritten: list[tuple[str, Any, str | None]]
    """(field, old value, old stamp) that the write replaced: kept in history."""
    lost: list[tuple[str, Any, Any, str]]
    """(field, the writer's value, the current value, the current stamp): the
    write came with an older stamp; its value is kept in history and the
    writer is told."""


def merge_fields(
    current: dict[str, Any], clocks: dict[str, str], patch: dict[str, Any], stamp: Hlc
) -> MergeOutcome:
    """Merge ``patch`` stamped ``stamp`` into ``current`` field by field: the
    later stamp wins.  Pure: returns the decision; the caller applies it."""
    applied: dict[str, Any] = {}
    overwritten: list[tuple[str, Any, str | None]] = []
    lost: list[tuple[str, Any, Any, str]] = []
    for field in sorted(patch):
        value = patch[field]
        old_stamp_text = clocks.get(field)
        old_stamp = Hlc.decode(old_stamp_text) if old_stamp_text else None
        if old_stamp is None or stamp > old_stamp:
            applied[field] = value
            if field in current and current[field] != value:
                overwritten.append((field, current[field], old_stamp_text))
        else:
            lost.append((field, value, current.get(field), old_stamp_text or ""))
    return MergeOutcome(applied, overwritten, lost)
