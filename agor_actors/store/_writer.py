"""The store writer: the single writer of the database, with group commit.

Writes queue up while a commit is in flight and go together in the next one
(one worker-thread hop and one transaction per group).  Consecutive chunks
of one streamed message in a group are merged into one write whose event
covers their seqs.  Committed events go to their rooms in commit order, and
only then are the writers answered: nobody sees an event a crash could take
back, and a ``call`` is answered only once its write is durable.  In a
cluster each room's committed events are also offered to the broker's
publisher (``announce``), for the other daemons.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, TypeVar

import attrs
import outcome

from ..marks import mark
from ..metrics import Metrics
from ..runtime import (
    ActorContext,
    Await,
    AwaitInline,
    Behaviour,
    Effect,
    Effects,
    Reply,
    ReplyTo,
    Request,
    Send,
    StartTimer,
    TrySend,
)
from ..world import World
from ._backend import (
    Append,
    EventDraft,
    Mutation,
    SqlStore,
    StoredEvent,
    WriteRequest,
    WriteResult,
)
from ._schema import StoreError, StoreUnavailable

__all__ = [
    "WRITER_NAME",
    "Committed",
    "Flush",
    "Resync",
    "StoreWriter",
    "Write",
    "WriterState",
    "coalesce",
    "runs",
]

WRITER_NAME = "store:writer"

log = logging.getLogger(__name__)

_T = TypeVar("_T")


@attrs.frozen
class Write:
    """Ask the writer to commit ``request``; the reply is a
    :class:`~agor_actors.store.WriteResult` or a ``StoreError`` (raised).
    Writes with the same ``coalesce_key`` that are consecutive in a group
    are merged (their ``Append`` values concatenated, other values: last
    wins; their single events merged by :func:`coalesce`)."""

    request: WriteRequest
    coalesce_key: str | None = None


@attrs.frozen
class Flush:
    """Ask the writer to answer (``None``) once every write it received
    before this one has been answered: what a reader reads of the store
    afterwards counts them, committed or not.  A restarted session reads
    its records after one, so that a chunk its crashed predecessor sent is
    not overtaken by a load of the message's length (which would plan the
    next chunk at an offset the earlier one then takes)."""


FLUSHES_MAX = 4096
"""Flushes a writer holds until the writes before them are answered
(overflow policy: the newest is refused with ``StoreUnavailable``)."""


@attrs.frozen
class Committed:
    """Sent to ``room:<room>``: events just made durable, in seq order."""

    room: str
    events: tuple[StoredEvent, ...]
    committed_s: float = 0.0
    """When the commit ended (the world's clock): a room measures its
    delivery latency from here."""


@attrs.frozen
class Resync:
    """Sent to ``room:<room>``: what the log holds past your head may never
    have reached you (a commit whose answer was lost); read it."""


@attrs.frozen
class _Done:
    batch: tuple[tuple[Request, ...], ...]
    result: outcome.Outcome[list[WriteResult | StoreError]]


@attrs.frozen
class _Linger:
    """The linger after a drained mailbox ended: commit what gathered."""


@attrs.frozen
class _Checkpointed:
    result: outcome.Outcome[tuple[int, int] | None]
    tail: bool = False


CHECKPOINT_GROUPS = 64
CHECKPOINT_WRITES = 1024
"""Groups, or writes, committed between two checkpoints of a SQLite file's
log (see :meth:`SqlStore.checkpoint`), whichever comes first (a few
thousand pages of log, as SQLite's own 1,000 pages: a group of one write
adds ~10, a write in a large group ~1): each copies the log in a worker thread while
commits go on, then what those commits added between two groups (a short
copy), so that the next commit starts the log over: SQLite does only when
all of it was copied, which commits beside a checkpoint never let happen."""


SHIFTS_MAX = 1024
"""Streamed messages whose refused chunks, and whose chunks of unknown
outcome, the writer remembers (overflow policy, each: the oldest is
forgotten)."""
BUSY_S = 0.05
"""A writer that started a group this recently is busy: it lingers."""


@attrs.define
class WriterState:
    shifts: dict[str, int] = attrs.field(factory=dict)
    """Per coalesce key (a streamed message as its session knew it): the
    characters of its chunks the store refused.  Chunks of that key still
    on their way were planned with offsets that count them: their events'
    offsets are moved back by as much (the content never held them)."""
    uncertain: dict[str, None] = attrs.field(factory=dict)
    """Coalesce keys with chunks in a group that failed as a whole: the
    commit may have happened (its answer lost) or not, so nobody knows
    where the chunks of that key still on their way land.  They are
    landed where the row ends when they commit (``WriteRequest.land``),
    not at the offsets their session planned."""
    pending: list[Request] = attrs.field(factory=list)
    received: int = 0
    """Writes received (``writes``: taken into groups, answered once the
    group ends)."""
    flushes: list[tuple[int, ReplyTo]] = attrs.field(factory=list)
    """:class:`Flush` requests waiting: answered once ``writes`` reaches the
    count of writes received before each."""
    groups: int = 0
    writes: int = 0
    merged: int = 0
    max_group: int = 0
    started_s: float = -1e9  # when the group being (or last) committed started
    lingering: bool = False
    since_checkpoint: int = 0
    """Groups committed since the last checkpoint began."""
    writes_since_checkpoint: int = 0
    checkpointing: bool = False
    checkpoints: int = 0


def coalesce(writes: Sequence[Write]) -> WriteRequest:
    """Merge consecutive writes of one streamed message into one request.
    Each must have one mutation per row and at most one event."""
    first = writes[0].request
    mutations: dict[tuple[str, str], dict[str, Any]] = {}
    keys: dict[tuple[str, str], Mutation] = {}
    for write in writes:
        for mutation in write.request.mutations:
            ident = (mutation.table, repr(sorted(mutation.key.items())))
            values = mutations.setdefault(ident, {})
            keys.setdefault(ident, mutation)
            for column, value in mutation.values.items():
                old = values.get(column)
                if isinstance(value, Append) and isinstance(old, Append):
                    values[column] = attrs.evolve(old, text=old.text + value.text)
                else:
                    values[column] = value
    merged_mutations = tuple(
        Mutation(keys[ident].op, keys[ident].table, keys[ident].key, values)
        for ident, values in mutations.items()
    )
    events = [w.request.events[0] for w in writes if w.request.events]
    merged_events: tuple[EventDraft, ...] = ()
    if events:
        data = dict(events[0].data)
        for event in events[1:]:
            for k, v in event.data.items():
                if k == "chunk":
                    data[k] = data.get(k, "") + v
                elif k != "offset":  # a merged chunk starts where its first did
                    data[k] = v
        last = events[-1]
        merged_events = (
            EventDraft(
                room=last.room,
                event=last.event,
                data=data,
                ts=last.ts,
                user_id=last.user_id,
                origin=last.origin,
                temp_id=last.temp_id,
                merge_count=sum(e.merge_count for e in events),
            ),
        )
    return WriteRequest(
        mutations=merged_mutations,
        events=merged_events,
        history=tuple(h for w in writes for h in w.request.history),
        expect=first.expect,
    )


def _appended(request: WriteRequest) -> int:
    """Characters ``request`` appends (a streamed chunk's)."""
    return sum(
        len(value.text)
        for mutation in request.mutations
        for value in mutation.values.values()
        if isinstance(value, Append)
    )


def _shifted(request: WriteRequest, shift: int) -> WriteRequest:
    """``request`` with its chunk events' offsets moved back by ``shift``."""
    if not shift:
        return request
    events = tuple(
        attrs.evolve(e, data={**e.data, "offset": e.data["offset"] - shift})
        if isinstance(e.data.get("offset"), int)
        else e
        for e in request.events
    )
    return attrs.evolve(request, events=events)


def _expected(request: WriteRequest) -> int | None:
    """The length a streamed chunk's ``Append`` expects its column to have
    (``Append.expect``), None if it names none."""
    for mutation in request.mutations:
        for value in mutation.values.values():
            if isinstance(value, Append) and value.expect is not None:
                return value.expect
    return None


def _planned(run: tuple[Request, ...], state: WriterState) -> WriteRequest:
    """The request to commit for ``run`` (its writes merged): a key with
    chunks of unknown outcome lands where its row ends; else its offsets
    are moved back by what the store refused of its key, or, for chunks
    that name their offset (``Append.expect``), the store checks it there:
    the length they were planned on counted a refused chunk."""
    request = coalesce([r.body for r in run]) if len(run) > 1 else run[0].body.request
    key = run[0].body.coalesce_key
    if key is None:
        return request
    if key in state.uncertain:
        return attrs.evolve(request, land=True)
    shift = state.shifts.get(key, 0)
    if shift and _expected(request) is not None:
        return attrs.evolve(request, land=True)
    return _shifted(request, shift)


def _touches(request: WriteRequest) -> list[tuple[str, ...]]:
    return [("room", e.room) for e in request.events] + [
        ("row", m.table, *(f"{k}={v!r}" for k, v in sorted(m.key.items())))
        for m in request.mutations
    ]


def _second_run(batch: list[tuple[Request, ...]], taken: list[Request]) -> int | None:
    """The position in ``taken`` of the first write that starts a second
    run of a coalesce key (None: each key has one run)."""
    seen: set[str] = set()
    for run in batch:
        key = run[0].body.coalesce_key
        if key is None:
            continue
        if key in seen:
            first = run[0]
            return next(i for i, req in enumerate(taken) if req is first)
        seen.add(key)
    return None


def runs(writes: Sequence[Write], items: list[_T]) -> list[tuple[_T, ...]]:
    """Group ``items`` (one per write, in order) into runs to commit as one
    request each.  A write with a coalesce key (a chunk of a streamed
    message) joins the run of its key, also when writes of other keys came
    between, unless one of those touched a room or a row this write
    touches: then it starts a new run.  So what a room sees and what a row
    goes through keep their order; only writes whose order nothing can tell
    are moved together.  A write that touches nothing ends every run.  A
    chunk that names its offset (``Append.expect``) joins a run only where
    the run ends at that offset, so that a merged request's one offset
    stands for each of its chunks.  A write under an idempotency key
    (``WriteRequest.once``) is a run of its own: its key takes that write
    alone."""
    batch: list[tuple[_T, ...]] = []
    open_run: dict[str, int] = {}  # coalesce key -> index in batch of its run
    ends: dict[str, int | None] = {}  # coalesce key -> the offset its open run ends at
    last: dict[tuple[str, ...], int] = {}  # what was touched -> last index touching it
    barrier = 0  # runs before this index are closed
    for write, item in zip(writes, items, strict=True):
        key = write.coalesce_key
        touches = _touches(write.request)
        index = open_run.get(key) if key is not None else None
        if index is not None and (index < barrier or any(last.get(t, -1) > index for t in touches)):
            index = None
        if key is not None:
            expect = _expected(write.request)
            if index is not None and expect is not None and ends.get(key) != expect:
                index = None
            ends[key] = None if expect is None else expect + _appended(write.request)
        alone = write.request.once is not None
        if alone:
            index = None
        if index is None:
            batch.append((item,))
            index = len(batch) - 1
            if key is not None and not alone:
                open_run[key] = index
        else:
            batch[index] = (*batch[index], item)
        if not touches:
            barrier = len(batch)
        for t in touches:
            if last.get(t, -1) < index:
                last[t] = index
    return batch


class StoreWriter(Behaviour[WriterState]):
    """The single writer.  Writes gather while the mailbox has any; once it
    is drained (or ``max_group`` are pending) they commit as one group, which
    the writer's own loop awaits (:class:`AwaitInline`): what arrives during
    a commit waits in the bounded mailbox (overflow policy: the senders
    wait) and goes in the next group."""

    mailbox_size = 4096

    def __init__(
        self,
        store: SqlStore,
        world: World,
        *,
        max_group: int = 512,
        linger_s: float = 0.0,
        metrics: Metrics | None = None,
        announce: str | None = None,
    ) -> None:
        self.store = store
        self.world = world
        self.max_group = max_group
        self.linger_s = linger_s
        """When the writer is busy (a group started within the last
        ``BUSY_S``), how long a drained mailbox waits for more writes before
        the group commits: fewer, larger commits (each one costs a worker
        thread's round trip and a transaction) for a bounded delay.  An idle
        writer commits at once.  0: never waits."""
        self.metrics = metrics
        self.announce = announce
        """An actor (the broker's publisher) offered every ``Committed``
        too, without waiting: dropped if its mailbox is full."""

    async def init(self, ctx: ActorContext) -> WriterState:
        return WriterState()

    def handle(self, state: WriterState, msg: Any, now: float) -> Effects:
        if isinstance(msg, Request) and isinstance(msg.body, Write):
            state.pending.append(msg)
            state.received += 1
            if len(state.pending) >= self.max_group:
                return self._start(state, now)
            return ()
        if isinstance(msg, Request) and isinstance(msg.body, Flush):
            # between groups (a group is awaited inline): every write taken
            # so far is answered; the pending ones are not
            if not state.pending:
                return [Reply(msg.reply_to, None)]
            if len(state.flushes) >= FLUSHES_MAX:
                return [Reply(msg.reply_to, error=StoreUnavailable("too many flushes waiting"))]
            state.flushes.append((state.received, msg.reply_to))
            return ()
        if isinstance(msg, _Done):
            effects = self._finish(state, msg, now)
            flushes = state.flushes
            while flushes and flushes[0][0] <= state.writes:
                effects.append(Reply(flushes.pop(0)[1], None))
            return effects
        if isinstance(msg, _Linger):
            state.lingering = False
            return self._start(state, now) if state.pending else ()
        if isinstance(msg, _Checkpointed):
            try:
                msg.result.unwrap()
            except Exception as exc:  # SQLite checkpoints on commit past its limit anyway
                log.warning("store writer: the checkpoint failed: %r", exc)
                state.checkpointing = False
                return ()
            if not msg.tail:
                return [self._tail()]
            state.checkpointing = False
            state.checkpoints += 1
            return ()
        raise TypeError(f"store writer: unexpected {msg!r}")

    def caught_up(self, state: WriterState, now: float) -> Effects:
        if not state.pending or state.lingering:
            return ()
        if self.linger_s > 0 and now - state.started_s < BUSY_S:
            state.lingering = True
            return [StartTimer("linger", self.linger_s, _Linger())]
        return self._start(state, now)

    def _start(self, state: WriterState, now: float) -> list[Effect]:
        state.started_s = now
        taken, state.pending = state.pending[: self.max_group], state.pending[self.max_group :]
        batch = runs([req.body for req in taken], taken)
        cut = _second_run(batch, taken)
        if cut is not None:
            # a message's chunks in two runs: the second's offsets would not
            # be moved back if the first is refused (shifts are taken when a
            # group starts), so it waits for the next group
            taken, state.pending = taken[:cut], taken[cut:] + state.pending
            batch = runs([req.body for req in taken], taken)
            mark("writer.group_cut")
        requests = [_planned(run, state) for run in batch]
        state.groups += 1
        state.writes += len(taken)
        state.merged += len(taken) - len(batch)
        if len(batch) < len(taken):
            mark("writer.merged")
        state.max_group = max(state.max_group, len(taken))
        store, blocking = self.store, self.world.blocking

        async def commit() -> list[WriteResult | StoreError]:
            return await blocking.run(lambda: store.commit(requests), local=store.local)

        frozen = tuple(batch)
        return [AwaitInline(commit, lambda result: _Done(frozen, result))]

    def _checkpoint(self, state: WriterState, writes: int) -> list[Effect]:
        """A checkpoint in a worker thread every :data:`CHECKPOINT_GROUPS`
        groups or :data:`CHECKPOINT_WRITES` writes (one at a time), if the
        store keeps a log to copy back."""
        state.since_checkpoint += 1
        state.writes_since_checkpoint += writes
        store = self.store
        if state.checkpointing or (
            state.since_checkpoint < CHECKPOINT_GROUPS
            and state.writes_since_checkpoint < CHECKPOINT_WRITES
        ):
            return []
        if not store.checkpoints:
            return []
        state.checkpointing, state.since_checkpoint, state.writes_since_checkpoint = True, 0, 0
        blocking = self.world.blocking

        async def checkpoint() -> tuple[int, int] | None:
            return await blocking.run(store.checkpoint)

        return [Await(checkpoint, _Checkpointed)]

    def _tail(self) -> AwaitInline:
        """The checkpoint's tail, between two groups (no commit runs):
        what the commits beside the checkpoint added, and then the log is
        all copied."""
        store, blocking = self.store, self.world.blocking

        async def tail() -> tuple[int, int] | None:
            return await blocking.run(store.checkpoint, local=store.local)

        return AwaitInline(tail, lambda result: _Checkpointed(result, tail=True))

    def _finish(self, state: WriterState, done: _Done, now: float) -> list[Effect]:
        effects: list[Effect] = self._checkpoint(state, sum(len(run) for run in done.batch))
        metrics = self.metrics
        if metrics is not None:
            metrics.commit_seconds.observe(now - state.started_s)
            metrics.commit_groups.observe(sum(len(run) for run in done.batch))
        try:
            results = done.result.unwrap()
        except Exception as exc:  # the worker itself failed: nothing is known to be durable
            error = exc if isinstance(exc, StoreError) else StoreUnavailable(str(exc))
            mark("writer.group_failed")
            for run in done.batch:
                effects.extend(Reply(req.reply_to, error=error) for req in run)
                key = run[0].body.coalesce_key
                if key is not None:
                    # landed or not, nobody knows: later chunks of the key
                    # land where the row ends (a shift would guess)
                    state.shifts.pop(key, None)
                    state.uncertain[key] = None
                    while len(state.uncertain) > SHIFTS_MAX:
                        del state.uncertain[next(iter(state.uncertain))]
            # the group may be durable all the same (the answer was lost):
            # its rooms read their log to find out, so no event is skipped
            rooms = sorted(
                {e.room for run in done.batch for r in run for e in r.body.request.events}
            )
            effects.extend(Send(f"room:{room}", Resync()) for room in rooms)
            return effects
        by_room: dict[str, list[StoredEvent]] = {}
        for result in results:
            if isinstance(result, WriteResult):
                for event in result.events:
                    by_room.setdefault(event.room, []).append(event)
        announce = self.announce
        for room, events in by_room.items():
            committed = Committed(room, tuple(events), now)
            if announce is not None:
                effects.append(TrySend(announce, committed))
            effects.append(Send(f"room:{room}", committed))
        if metrics is not None:
            metrics.events_committed.inc(sum(len(events) for events in by_room.values()))
        for run, result in zip(done.batch, results, strict=True):
            key = run[0].body.coalesce_key
            if key is not None and not isinstance(result, WriteResult):
                refused = sum(_appended(req.body.request) for req in run)
                state.shifts[key] = state.shifts.pop(key, 0) + refused
                while len(state.shifts) > SHIFTS_MAX:
                    del state.shifts[next(iter(state.shifts))]
            for req in run:
                if isinstance(result, WriteResult):
                    effects.append(Reply(req.reply_to, result))
                else:
                    effects.append(Reply(req.reply_to, error=result))
        return effects

    def describe(self, state: WriterState) -> dict[str, Any]:
        return {
            "pending": len(state.pending),
            "groups": state.groups,
            "writes": state.writes,
            "merged": state.merged,
            "max_group": state.max_group,
            "checkpoints": state.checkpoints,
        }
