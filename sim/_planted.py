"""Planted bugs: patches the simulator's own test suite applies, one at a
time, to prove that the simulator catches each kind of bug.

The product has no switch for them: each is a wrapper around one of its
functions or methods, put in place by :func:`plant` in the simulator's own
worker process (and taken away by ``plant()`` with no names), so the hot
paths of the product carry nothing of them.

``resume_off_by_one``
    ``RoomBehaviour._subscribe``: a resume from memory starts one event
    late (the first event after ``since`` is skipped).
``dedupe_off``
    ``ClientConnection._on_event``: the client machine applies an event it
    has already applied instead of dropping it.
``ack_before_durable``
    ``StoreWriter._start``: the writer answers the writers of a group before
    the group is committed.
``merge_tiebreak``
    ``merge_fields`` (as the session actor calls it): a tie between two
    stamps of the same wall time is broken by an object's address instead
    of the writer id.
``fanout_reorder``
    ``RoomBehaviour._deliver``: a delivery of several events offers the
    first one last.
``presence_never_offline``
    ``status_of``: a user who left a board never goes offline there (the
    grace period never ends).
``lagged_resume_high``
    the outbox's ``Lagged``: a ``lagged`` notice names one seq past the
    first one not sent (the client resumes from ``min(last, resume_from -
    1)``, so only the simulator's claims oracle can see it).
``retry_seq_reused``
    ``SqlStore._commit_group``: a request refused in its group (on its own,
    or in the redo with every request isolated) is answered as committed,
    with the seqs it was given before it was taken back; those seqs were
    never written, and the next commit hands them out again.
``revoke_keeps_subscription``
    ``RoomBehaviour._revoke``: a revoked member is sent ``left``
    ``forbidden`` but stays subscribed (the room's events keep reaching a
    user who may no longer see it).
``keys_ignored``
    ``SqlStore._claim``: the store takes no idempotency key, so a write sent
    again under its key after its commit's answer was lost (or after the
    daemon restarted) runs a second time; the daemon's own table of keys
    still answers a write sent again while it lives.
``two_nodes_one_seq``
    ``SqlStore._commit_group`` of a *shared* store (a cluster node's): it
    takes each room's next seq from its own memory of what it last
    committed, as a single writer's store does, instead of the locked head
    row, and nothing in the database stops a second writer: the heads are
    written without their compare-and-set and an event row at a seq this
    store believes free is replaced (what a log without a unique ``(room,
    seq)`` would keep twice).  Two nodes writing one room assign one seq
    twice.  Only the multi-node runs (``--profile cluster``) have shared
    stores.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

import agor_actors.domain.presence as presence
import agor_actors.domain.session as session
import agor_actors.outbox._outbox as outbox
from agor_actors.domain.hlc import Hlc
from agor_actors.domain.room import Revoke, RoomBehaviour, RoomState, Subscribe
from agor_actors.runtime import Effect, Reply
from agor_actors.store import SqlStore, StoreWriter, WriteResult
from agor_actors.store._writer import WriterState
from protocols import (
    ClientConnection,
    ClientEvent,
    Event,
    EventApplied,
    Lagged,
    RoomStatus,
    Since,
)

__all__ = ["PLANTED", "plant"]


def _resume_off_by_one(original: Any) -> Any:
    def _subscribe(self: RoomBehaviour, state: RoomState, body: Subscribe) -> Any:
        since = body.since
        if since is not None and since.seq < state.head and since.epoch in ("", state.epoch):
            oldest = state.ring[0].event.seq if state.ring else state.head + 1
            if since.seq + 1 >= oldest:
                body = Subscribe(body.sub, Since(since.epoch, since.seq + 1), body.quiet)
        return original(self, state, body)

    return _subscribe


def _fanout_reorder(original: Any) -> Any:
    def _deliver(self: RoomBehaviour, state: RoomState, entries: list[Any]) -> None:
        if len(entries) > 1:
            entries = [*entries[1:], entries[0]]
        original(self, state, entries)

    return _deliver


def _ack_before_durable(original: Any) -> Any:
    def _start(self: StoreWriter, state: WriterState, now: float) -> list[Effect]:
        taken = state.pending[: self.max_group]
        effects = original(self, state, now)
        return [*(Reply(r.reply_to, WriteResult(())) for r in taken), *effects]

    return _start


def _merge_tiebreak(original: Any) -> Any:
    def merge_fields(
        current: dict[str, Any], clocks: dict[str, str], patch: dict[str, Any], stamp: Hlc
    ) -> Any:
        node = "" if id(patch) >> 4 & 1 else "~"
        skewed = dict(clocks)
        for field in patch:
            text = clocks.get(field)
            old = Hlc.decode(text) if text else None
            if old is not None and old.wall_ms == stamp.wall_ms:
                skewed[field] = Hlc(old.wall_ms, old.counter, node).encode()
        return original(current, skewed, patch, stamp)

    return merge_fields


def _presence_never_offline(original: Any) -> Any:
    def status_of(last_input_s: float, now: float, **kw: Any) -> Any:
        return original(last_input_s, now, **{**kw, "gone_since_s": None})

    return status_of


def _dedupe_off(original: Any) -> Any:
    def _on_event(self: ClientConnection, event: Event) -> list[ClientEvent]:
        track = self.rooms.get(event.room)
        live = track is not None and track.status is RoomStatus.LIVE and track.seq is not None
        if live and track is not None and track.seq is not None and event.end_seq <= track.seq:
            return [EventApplied(event)]
        result: list[ClientEvent] = original(self, event)
        return result

    return _on_event


def _lagged_resume_high(original: Any) -> Any:
    def lagged(*, room: str, resume_from: int) -> Lagged:
        made: Lagged = original(room=room, resume_from=resume_from + 1)
        return made

    return lagged


def _retry_seq_reused(original: Any) -> Any:
    def _commit_group(self: SqlStore, requests: Any, *, isolate_events: bool) -> Any:
        results, heads = original(self, requests, isolate_events=isolate_events)
        last: dict[str, tuple[str, int]] = {}  # room -> (epoch, last seq handed out)
        for index, (request, result) in enumerate(zip(requests, results, strict=True)):
            if isinstance(result, WriteResult):
                for e in result.events:
                    last[e.room] = (e.epoch, e.end_seq)
                continue
            if not request.events:
                continue
            taken = []  # the events it had been given before it was taken back
            for draft in request.events:
                if draft.room not in last:
                    head = heads.get(draft.room)
                    # memory only: room_head would read through the store's
                    # one in-memory connection, whose lock this commit holds
                    known = (head.epoch, head.base) if head else self.cached_head(draft.room)
                    last[draft.room] = known or ("", 0)
                epoch, seq = last[draft.room]
                event = draft.stored(epoch, seq + 1)
                taken.append(event)
                last[draft.room] = (epoch, event.end_seq)
            results[index] = WriteResult(tuple(taken))
        return results, heads

    return _commit_group


def _revoke_keeps_subscription(original: Any) -> Any:
    def _revoke(self: RoomBehaviour, state: RoomState, body: Revoke) -> bool:
        member = state.subscribers.get(body.key)
        revoked: bool = original(self, state, body)
        if member is not None:
            state.subscribers[body.key] = member
        return revoked

    return _revoke


def _keys_ignored(original: Any) -> Any:
    def _claim(self: SqlStore, cursor: Any, once: Any, stored: Any = ()) -> None:
        return None

    return _claim


def _two_nodes_one_seq(original: Any) -> Any:
    def lock_heads(self: SqlStore, conn: sa.Connection, requests: Any) -> None:
        memory: dict[str, tuple[str, int]] = self.__dict__.setdefault("_planted_heads", {})
        self._heads.clear()
        for room in sorted({d.room for r in requests for d in r.events}):
            head = memory.get(room)
            if head is None:
                row = conn.execute(
                    sa.text("SELECT epoch, head_seq FROM rooms WHERE room = :room"),
                    {"room": room},
                ).first()
                if row is None:
                    continue
                head = (row[0], row[1])
            self._heads[room] = head
            conn.execute(
                sa.text("DELETE FROM events WHERE room = :room AND seq > :head"),
                {"room": room, "head": head[1]},
            )

    def write_heads(self: SqlStore, cursor: Any, group: Any) -> None:
        for room, h in group.items():
            cursor.execute(
                "INSERT INTO rooms (room, epoch, head_seq) VALUES (?, ?, ?) ON CONFLICT(room)"
                " DO UPDATE SET epoch = excluded.epoch, head_seq = excluded.head_seq",
                (room, h.epoch, h.head),
            )

    def _commit_group(self: SqlStore, requests: Any, *, isolate_events: bool) -> Any:
        if not self.shared:
            return original(self, requests, isolate_events=isolate_events)
        self.__dict__["_lock_heads"] = lock_heads.__get__(self)
        self.__dict__["_write_heads"] = write_heads.__get__(self)
        try:
            results, heads = original(self, requests, isolate_events=isolate_events)
        finally:
            del self.__dict__["_lock_heads"], self.__dict__["_write_heads"]
        memory: dict[str, tuple[str, int]] = self.__dict__.setdefault("_planted_heads", {})
        for result in results:
            if isinstance(result, WriteResult):
                for event in result.events:
                    memory[event.room] = (event.epoch, event.end_seq)
        return results, heads

    return _commit_group


_Patch = tuple[Any, str, Callable[[Any], Any]]

_PATCHES: dict[str, _Patch] = {
    "resume_off_by_one": (RoomBehaviour, "_subscribe", _resume_off_by_one),
    "dedupe_off": (ClientConnection, "_on_event", _dedupe_off),
    "ack_before_durable": (StoreWriter, "_start", _ack_before_durable),
    "merge_tiebreak": (session, "merge_fields", _merge_tiebreak),
    "fanout_reorder": (RoomBehaviour, "_deliver", _fanout_reorder),
    "presence_never_offline": (presence, "status_of", _presence_never_offline),
    "lagged_resume_high": (outbox, "Lagged", _lagged_resume_high),
    "retry_seq_reused": (SqlStore, "_commit_group", _retry_seq_reused),
    "revoke_keeps_subscription": (RoomBehaviour, "_revoke", _revoke_keeps_subscription),
    "keys_ignored": (SqlStore, "_claim", _keys_ignored),
    "two_nodes_one_seq": (SqlStore, "_commit_group", _two_nodes_one_seq),
}

PLANTED: tuple[str, ...] = tuple(_PATCHES)
"""The names of the planted bugs."""

_ORIGINALS: dict[str, Any] = {
    name: getattr(owner, attr) for name, (owner, attr, _) in _PATCHES.items()
}


def plant(*names: str) -> tuple[str, ...]:
    """Put exactly the bugs ``names`` in place (none: the product as it is)
    in this process; returns their names.  For the simulator's own
    processes only."""
    unknown = sorted(set(names) - set(PLANTED))
    if unknown:
        raise ValueError(f"no planted bug {', '.join(unknown)}; known: {', '.join(PLANTED)}")
    for name, (owner, attr, _wrap) in _PATCHES.items():
        setattr(owner, attr, _ORIGINALS[name])
    # then the planted ones (two may wrap one function: retry_seq_reused and
    # two_nodes_one_seq; restoring it after the first would undo it)
    for name, (owner, attr, wrap) in _PATCHES.items():
        if name in names:
            setattr(owner, attr, wrap(_ORIGINALS[name]))
    return tuple(n for n in PLANTED if n in names)
