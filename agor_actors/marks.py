"""Coverage marks: a named call at each rare path of the product (an
isolated store retry, a ring eviction, a passivation, ...), so that the
simulator can show that its sweep ran every one of them.

``mark("room.ring_evicted")`` costs one global read and a ``None`` test
unless counting is on; only the simulator turns it on (:func:`counting`),
in its own worker process.  Every name used must be in :data:`MARKS` (a
test reads the call sites); the simulator's sweep reports how often each
ran, and its CI sweep fails if one never did.

Layer 0: it imports nothing of ours.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

__all__ = ["MARKS", "counting", "mark"]

MARKS: Final[dict[str, str]] = {
    "store.isolated_retry": "a commit group redone with every request in its own savepoint",
    "store.request_failed": "one request of a group refused by the database, the others commit",
    "store.epoch_reset": "a room's log reset: a new epoch, seqs from 1",
    "store.repeated": "a write sent again under an idempotency key the store holds: not run again",
    "writer.merged": "consecutive chunks of one streamed message committed as one event",
    "writer.group_cut": "a group ended early: a message's chunks would have been in two runs",
    "writer.group_failed": "a whole commit group failed or its answer was lost",
    "room.ring_evicted": "an event left a room's in-memory ring",
    "room.catch_up": "a join older than the ring: replayed from the log at the client's pace",
    "room.log_read": "a room read its log (a hole, a lost commit answer, a head check)",
    "room.other_epoch": "a join since a seq of another epoch of the room",
    "room.reactivated": "a room actor started again on a head this process had committed",
    "actor.passivated": "an idle actor stopped (it is spawned again on first use)",
    "actor.restarted": "an actor restarted by its supervisor after a crash",
    "supervisor.restart": "a supervisor restarted a child",
    "supervisor.gave_up": "a supervisor's restarts passed its intensity: it stopped its"
    " children and failed to its own supervisor (the actors' registry, restarted by the root)",
    "outbox.lagged": "a subscription fell behind its outbox's bound: lagged, resume later",
    "session.conflict": "a write refused with a conflict receipt (stale base_rev/If-Match)",
    "hub.activity_join": "a connection joined an activity: room",
    "hub.drain": "the hub waited for every queued write to be durable",
    "presence.offline": "a user went offline on a board after the grace",
}
"""Every mark, with what it means."""

_counts: dict[str, int] | None = None


def mark(name: str) -> None:
    """Count one pass through the path ``name`` (when counting is on)."""
    counts = _counts
    if counts is not None:
        counts[name] = counts.get(name, 0) + 1


@contextmanager
def counting() -> Iterator[dict[str, int]]:
    """Count marks for the block; yields the counts (live, by name)."""
    global _counts
    saved = _counts
    counts: dict[str, int] = {}
    _counts = counts
    try:
        yield counts
    finally:
        _counts = saved
