"""What a run records for the invariants: violations as they are found,
the writes clients made and how they were answered, and the events each
client applied."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal

import attrs
import orjson

from protocols import Event

from ._trace import Trace, now_us

__all__ = [
    "DEFINITE_ERRORS",
    "Applied",
    "Recorder",
    "Violation",
    "WriteRecord",
    "event_digest",
]

DEFINITE_ERRORS: Final = frozenset(
    {
        "invalid_field",
        "not_found",
        "conflict",
        "unauthorized",
        "forbidden",
        "bad_request",
        "invalid_data",
        "unknown_method",
        "unknown_service",
        "rate_limited",
        "too_many_pending",
    }
)
"""Error codes that mean the write did not happen.  Any other error
(``unavailable``, ``internal``, ``connection_lost``, a timeout) leaves the
outcome unknown: the write may or may not be durable."""


@attrs.frozen
class Violation:
    kind: str
    at_us: int
    who: str
    detail: str

    def describe(self) -> str:
        return f"[{self.kind}] at {self.at_us / 1e6:.6f}s {self.who}: {self.detail}"


Outcome = Literal["pending", "ok", "failed", "unknown"]


@attrs.define
class WriteRecord:
    """One write call, from the client's side.  ``wid`` is its ``temp_id``."""

    wid: str
    client: str
    service: str
    method: str
    target: str | None
    session_id: str | None
    data: Any
    stamp: tuple[int, int, str] | None = None
    """The client's hybrid logical clock stamp (wall_ms, counter, writer)."""
    sent_us: int = 0
    outcome: Outcome = "pending"
    result: Any = None
    error: str | None = None
    error_data: Any = None
    """A refusal's details (a streamed chunk's ``conflict``: the length)."""


@attrs.frozen
class Applied:
    epoch: str
    seq: int
    end: int
    digest: bytes


def event_digest(event: Event) -> bytes:
    """The content of an event as logged (what must match the server's log)."""
    payload = orjson.dumps(
        [
            event.event,
            event.data,
            event.ts,
            event.user_id,
            event.origin,
            event.temp_id,
            event.last_seq,
        ],
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.blake2b(payload, digest_size=12).digest()


class Recorder:
    def __init__(self, trace: Trace, *, max_violations: int = 200) -> None:
        self.trace = trace
        self.violations: list[Violation] = []
        self._max = max_violations
        self.writes: dict[str, WriteRecord] = {}
        self.applied: dict[tuple[str, str], list[Applied]] = {}
        """(client, room) -> events applied, in order."""
        self.counters: dict[str, int] = {}
        self.exact_streams: dict[str, tuple[list[str], int]] = {}
        """Messages streamed by a :class:`~agor_actors.client.MessageWriter`
        (each chunk naming its offset): their chunks and how many of them
        the writer saw land, for the check that the content is a gap-free
        prefix of them."""
        self.on_frame: Callable[[str, Any, bytes | str], None] | None = None
        """Sees every frame a client receives, before its protocol machine
        does: ``(client name, machine, frame)`` (the server's claims)."""

    def frame_in(self, client: str, machine: Any, frame: bytes | str) -> None:
        if self.on_frame is not None:
            self.on_frame(client, machine, frame)

    def violate(self, kind: str, who: str, detail: str) -> None:
        if len(self.violations) < self._max:
            self.violations.append(Violation(kind, now_us(), who, detail))
        self.trace.emit("VIOLATION", f"[{kind}] {who}: {detail}")

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def write_sent(self, record: WriteRecord) -> None:
        record.sent_us = now_us()
        self.writes[record.wid] = record

    def write_answered(
        self, wid: str, ok: bool, data: Any, code: str | None, error_data: Any = None
    ) -> None:
        record = self.writes.get(wid)
        if record is None:
            return
        if ok:
            record.outcome = "ok"
            record.result = data
        else:
            record.outcome = "failed" if code in DEFINITE_ERRORS else "unknown"
            record.error = code
            record.error_data = error_data
        self.trace.emit(
            "answer", f"{wid} {'ok' if ok else code}", lambda: _short(data) if ok else ""
        )

    def applied_event(self, client: str, room: str, event: Event, epoch: str) -> None:
        self.applied.setdefault((client, room), []).append(
            Applied(epoch, event.seq, event.end_seq, event_digest(event))
        )

    def kinds(self) -> Mapping[str, int]:
        out: dict[str, int] = {}
        for v in self.violations:
            out[v.kind] = out.get(v.kind, 0) + 1
        return out


def _short(value: Any, limit: int = 160) -> str:
    text = orjson.dumps(value, default=str).decode()
    return text if len(text) <= limit else text[: limit - 3] + "..."
