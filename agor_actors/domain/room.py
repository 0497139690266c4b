"""The room: one per channel (``session:<id>``, ``board:<id>``).

It receives durable events from the store writer in seq order, keeps the
recent ones in memory, and offers them to every subscriber's outbox: the
events of one delivery are encoded once per codec and joined into one frame
(an :class:`~agor_actors.world.OutFrame`, framed once by the transport),
and every subscriber that is up to date gets those same bytes.  It never
waits for a subscriber: one whose outbox overflows is dropped from the room
(its outbox queues ``lagged``) and catches up from the log at its own pace
when it rejoins.

Batching (the 100 ms window): a quiet room delivers each commit at once.  A
room that has already made ``window_sends_max`` sends to subscribers within
the current ``batch_window_s`` holds further events and delivers them all
at the window's end, in one frame per subscriber: under load each
subscriber gets at most one frame per window holding everything since its
last, so deliveries per second grow with the load while latency stays
bounded by the window.  Events held for the window are already in the
room's memory (joins and resumes see them).  Windows are aligned to the
clock (they start at multiples of ``batch_window_s``), so every busy room's
window ends at the same instant; their deliveries are offered ``hold``-ing,
and a connection joined to several busy rooms gets them all in one frame
per window (its writer sends them together once the rooms have offered).
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import attrs
import outcome

from protocols import Codec, Event, Joined, Left, Limits, Presence, Since, Viewport, encode

from ..marks import mark
from ..metrics import Metrics
from ..outbox import Frame, Outbox, OutboxClosed, OutboxOverflow, join_frame
from ..runtime import (
    ActorContext,
    Await,
    Behaviour,
    CancelTimer,
    Effect,
    Effects,
    Reply,
    Request,
    StartTimer,
    TrySend,
)
from ..store import Committed, Resync, SqlStore, StoredEvent, StoreUnavailable
from ..world import OutFrame
from .cluster_presence import NodePresence, PresenceOut, RemotePresence, merged_entry, vanished
from .presence import CursorMoved, PresenceConfig, UserEntry, WatchPrefs, color_for

__all__ = [
    "AccessCheck",
    "CatchUp",
    "Resync",
    "Revoke",
    "RoomBehaviour",
    "RoomState",
    "Subscribe",
    "Subscription",
    "Unsubscribe",
    "to_event",
]


@attrs.frozen(eq=False)
class Subscription:
    """One connection in one room: who it is and the outbox it is offered
    to.  Immutable: the hub keeps it to name the subscription, the room
    keeps its own record of what it offered (``_Member``), and what was
    offered but not yet sent is the outbox's to know."""

    connection_id: str
    room: str
    outbox: Outbox
    user_id: str = ""
    activity: bool = False
    """Subscribed to ``activity:<board>``: the board's events, projected
    as ``activity:new`` entries with the same seqs (gap-free, resumable)."""
    key: str = attrs.field(
        init=False,
        default=attrs.Factory(lambda self: f"{self.connection_id}/{self.room}", takes_self=True),
    )


@attrs.define(slots=True)
class _Member:
    """The room's own record of one subscription."""

    sub: Subscription
    last_offered: int
    """The end seq of the last event offered to its outbox."""


@attrs.frozen
class Subscribe:
    """Join ``sub`` to the room from ``since``.  Replies ``"live"`` (the
    ``joined`` notice and any replay are queued, live events follow) or a
    :class:`CatchUp` (the gap is older than memory: the caller replays the
    log up to ``head`` and subscribes again with ``quiet=True``)."""

    sub: Subscription
    since: Since | None
    quiet: bool = False


@attrs.frozen
class CatchUp:
    epoch: str
    head: int


@attrs.frozen
class Unsubscribe:
    key: str  # Subscription.key


@attrs.frozen
class Revoke:
    """Drop the subscription ``key`` (its user may no longer see the room)
    and queue ``left`` ``reason`` in its outbox, in the room's own order:
    nothing of the room follows it.  Replies whether the room had it.

    ``ahead``: the subscription is being joined and may not have reached
    the room yet: if the room does not have it, it remembers the key, and
    a :class:`Subscribe` of that key that comes later is answered
    ``"revoked"`` (``left`` queued, no ``joined``, nothing of the room).
    Without ``ahead`` such a remembered key is forgotten."""

    key: str
    reason: str
    ahead: bool = False


REVOKED_AHEAD_MAX = 1024
"""Keys a room remembers as revoked before their join reached it; beyond,
the oldest is forgotten (overflow policy: drop oldest; its join then ends
itself with ``left`` a moment later, as the hub's join does)."""
WAITING_MAX = 1024
"""Joins from past its head that a cluster node's room holds while it reads
its log; beyond, a join is answered at once from what the room has."""
ACCESS_RETRY_S = 1.0
"""A cluster node's room whose access check failed (the store away) runs
it again after this long; it delivers nothing past the event meanwhile."""

AccessCheck = Callable[[StoredEvent], Callable[[], Awaitable[None]] | None]
"""A cluster node's (the hub's): for an event that may change who sees rooms
(a session's permissions, a board's members; committed by any daemon), the
check to run before anything of the room after that event is delivered
(the hub forgets what its gate knew and rechecks its subscriptions: who
lost sight is sent ``left`` through :class:`Revoke`); None for any other
event."""


@attrs.frozen
class ActivityQuery:
    """The newest activity entries from memory; the reply is None when memory
    cannot answer whole (then the store does)."""

    user_id: str | None
    actions: list[str] | None
    limit: int


@attrs.frozen
class _Ring:
    event: Event
    end_seq: int
    frames: dict[tuple[Codec, bool], Frame]
    committed_s: float = 0.0
    """When it was made durable (0: read back from the log)."""
    size: int = 0
    """Its JSON frame's length: what the ring counts against ``ring_bytes_max``."""


@attrs.define
class _Watch:
    """What one connection wants of board presence."""

    viewport: Viewport | None = None
    hide_cursors: bool = False
    follow: str | None = None
    full: bool = True  # send the whole facepile in its next frame


@attrs.define
class BoardPresence:
    """Board presence: latest state per user, what changed since the last flush."""

    users: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    cursors: dict[str, tuple[float, float]] = attrs.field(factory=dict)
    viewports: dict[str, Viewport] = attrs.field(factory=dict)
    watch: dict[str, _Watch] = attrs.field(factory=dict)
    users_dirty: bool = False
    cursors_dirty: dict[str, None] = attrs.field(factory=dict)
    viewports_dirty: dict[str, None] = attrs.field(factory=dict)
    highlights: list[dict[str, Any]] = attrs.field(factory=list)
    flush_pending: bool = False
    last_flush_s: float = -math.inf
    frames: int = 0
    local: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    """This daemon's users' entries (``users`` merges them with ``nodes``')."""
    nodes: dict[str, NodePresence] = attrs.field(factory=dict)
    """A cluster node's: the other daemons' users here, per daemon."""
    out_users: dict[str, dict[str, Any] | None] = attrs.field(factory=dict)
    out_cursors: dict[str, tuple[float, float]] = attrs.field(factory=dict)
    out_viewports: dict[str, Viewport] = attrs.field(factory=dict)
    """A cluster node's: what changed of its own users since it last told
    the other daemons (latest wins)."""
    own_viewports: dict[str, Viewport] = attrs.field(factory=dict)
    """A cluster node's: where its own users last looked on its own
    connections (``viewports`` has the latest from any daemon), for its
    heartbeats."""
    beating: bool = False
    """The heartbeat timer runs (own users to announce, daemons to watch, or
    farewells to repeat)."""
    farewells: int = 0
    """A cluster node's: heartbeats still to send once none of its own users
    is here (each a full message with none): the goodbye of its last user
    is a change the broker may lose (at most once), which the other
    daemons would otherwise correct only after their liveness timeout and
    the grace."""
    asked_s: float = -math.inf
    """A cluster node's: when this room last asked the other daemons for
    their users (its first subscriber; again at a resync, at most once per
    flush period)."""


@attrs.frozen
class _PresenceFlush:
    pass


@attrs.frozen
class _PresenceBeat:
    """A cluster node's board room: announce its users, forget vanished daemons."""


@attrs.frozen
class _HeadCheck:
    """While a room has subscribers it reads its log's head now and then, so
    that events whose announcement was lost (a writer crash, a lost commit
    answer) reach the subscribers even if nothing else is written.

    ``again``: the room sent it to itself, behind what its mailbox held,
    after a check found the store's record of its head past its own (the
    commit's ``Committed`` is usually just queued: a busy room sees that at
    most checks, and read its log for nothing each time)."""

    again: bool = False


@attrs.frozen
class _Filled:
    result: outcome.Outcome[list[StoredEvent]]


@attrs.frozen
class _AccessChecked:
    """The hub's access check of the event the room paused at ended."""

    result: outcome.Outcome[None]


@attrs.frozen
class _AccessRetry:
    """Run the failed access check again."""


@attrs.frozen
class _WindowEnd:
    """The batch window ended: deliver what was held for it."""


@attrs.define
class RoomState:
    room: str
    epoch: str
    head: int
    ring: deque[_Ring] = attrs.field(factory=deque)
    ring_bytes: int = 0
    """The ring's events as JSON, in bytes (``_Ring.size``)."""
    subscribers: dict[str, _Member] = attrs.field(factory=dict)
    revoked_ahead: dict[str, str] = attrs.field(factory=dict)
    """Keys revoked before their join reached the room (see :class:`Revoke`)."""
    delivered: int = 0
    lagged: int = 0
    presence: BoardPresence = attrs.field(factory=BoardPresence)
    filling: bool = False
    refill: bool = False
    held: list[StoredEvent] = attrs.field(factory=list)
    head_check: bool = False
    head_seen: tuple[str, int] | None = None
    """The store's record of this room's head when a check last found it
    past the room's own; the room reads its log if it has not reached it by
    the next check."""
    filled: int = 0
    window_start_s: float = -math.inf
    window_sends: int = 0
    """Frames offered to subscribers since ``window_start_s``."""
    unsent: list[_Ring] = attrs.field(factory=list)
    """Events held for the end of the batch window (already in the ring)."""
    window_timer: bool = False
    windows: int = 0
    """Windows that ended with a held delivery (the room was under load)."""
    waiting: list[Request] = attrs.field(factory=list)
    """A cluster node's joins from past this room's head (another daemon's
    commits had not reached it): answered once it has read its log."""
    checking: Callable[[], Awaitable[None]] | None = None
    """A cluster node's: the access check under way; the room delivers
    nothing past its head (the event that changed access) until it ends."""
    paused: list[StoredEvent] = attrs.field(factory=list)
    """Events past the head, in order, waiting for the check (bounded by
    ``max_held``: past it, or past a hole, they are read from the log)."""
    paused_lost: bool = False
    access_checks: int = 0


def activity_entry(event: Event | StoredEvent) -> dict[str, Any]:
    """An activity log entry: one per event of a board room."""
    return {
        "id": event.seq,
        "action": event.event,
        "user_id": event.user_id,
        "ts": event.ts,
        "data": event.data,
    }


def as_activity(event: Event, room: str) -> Event:
    """A board event projected into the ``activity:<board>`` stream."""
    return Event(
        room=room,
        seq=event.seq,
        event="activity:new",
        data=activity_entry(event),
        ts=event.ts,
        user_id=event.user_id,
        origin=event.origin,
        last_seq=event.last_seq,
    )


def to_event(stored: StoredEvent, room: str | None = None) -> Event:
    """The wire event of a logged one; ``room`` ``activity:<board>``
    projects a board event into the activity stream."""
    if room is not None and room.startswith("activity:"):
        return as_activity(to_event(stored), room)
    return Event(
        room=stored.room,
        seq=stored.seq,
        event=stored.event,
        data=stored.data,
        ts=stored.ts,
        user_id=stored.user_id,
        origin=stored.origin,
        temp_id=stored.temp_id,
        last_seq=stored.last_seq,
    )


class RoomBehaviour(Behaviour[RoomState]):
    """``ring_size`` recent events (at most ``ring_bytes_max`` of them as
    JSON) stay in memory for resumes; older gaps come from the log.  A room
    with subscribers never passivates."""

    mailbox_size = 1024
    idle_s = 300.0

    batch_window_s = 0.1
    window_sends_max = 2000
    """Sends to subscribers per window before the room holds events for the
    window's end (one room of 1,000 subscribers: two deliveries at once per
    window; a session room of 2 viewers: 1,000)."""
    max_batch = Limits().max_batch
    """Messages per frame: a client refuses frames holding more."""

    ring_bytes_max = 8 * 1024 * 1024
    """The ring's bound in bytes (its events as JSON; with their other
    encodings and decoded data, some 3 to 4 times that in memory): a
    writer's 1 MB events would otherwise keep 1,024 of them, per room."""

    max_highlights = 64
    activity_memory = 100
    max_held = 10_000
    fill_page = 1000
    head_check_s = 5.0

    def __init__(
        self,
        room: str,
        store: SqlStore,
        *,
        ring_size: int = 1024,
        presence: PresenceConfig | None = None,
        metrics: Metrics | None = None,
        announce: str | None = None,
        access: AccessCheck | None = None,
    ) -> None:
        self.access = access
        """A cluster node's: every event it takes (another daemon's through
        the broker, its own writer's, or read from its log) is shown to
        ``access``; one that changes access pauses the room's deliveries
        until its check ended (see :data:`AccessCheck`)."""
        self.metrics = metrics
        self.announce = announce
        """A cluster node's board room tells its users to this actor (the
        broker's publisher) and takes the other daemons' (``RemotePresence``)."""
        self.room = room
        self.store = store
        self.ring_size = ring_size
        self.presence_config = presence or PresenceConfig()
        self.is_board = room.startswith("board:")

    async def init(self, ctx: ActorContext) -> RoomState:
        store, room = self.store, self.room
        self._blocking = ctx.world.blocking
        head = await ctx.world.blocking.run(lambda: store.room_head(room))
        epoch, seq = head if head is not None else ("", 0)
        if head is not None and store.cached_head(room) is not None:
            mark("room.reactivated")
        return RoomState(room=room, epoch=epoch, head=seq)

    def can_passivate(self, state: RoomState) -> bool:
        """No subscriber, no join waiting, no access check running, and (a
        board) no entry of this daemon's users on its facepile: that is the
        room's own memory, which a user's presence actor sends only when the
        entry changes, so a room started again would show the board empty
        of them until their next change (up to a minute, at ``idle``)."""
        return (
            not state.subscribers
            and not state.waiting
            and state.checking is None
            and not state.presence.local
        )

    def handle(self, state: RoomState, msg: Any, now: float) -> Effects:
        if isinstance(msg, Request):
            body = msg.body
            if isinstance(body, Subscribe):
                if self._ahead(state, body) and len(state.waiting) < WAITING_MAX:
                    # a client that saw more of the room through another
                    # daemon: its join waits for the log (overflow: answered
                    # from what the room has, as a single daemon does)
                    state.waiting.append(msg)
                    return self._resync(state)
                effects: list[Effect] = [Reply(msg.reply_to, self._subscribe(state, body))]
                if self.is_board and not body.sub.activity:
                    # the newcomer gets the whole facepile in the next flush
                    effects += self._ask(state, now) + self._schedule_flush(state, now)
                return effects + self._watch_head(state)
            if isinstance(body, ActivityQuery):
                return [Reply(msg.reply_to, self._activity(state, body))]
            if isinstance(body, Revoke):
                return [Reply(msg.reply_to, self._revoke(state, body))]
            raise TypeError(f"room: unexpected request {body!r}")
        if isinstance(msg, Unsubscribe):
            member = state.subscribers.pop(msg.key, None)
            if member is not None and not member.sub.activity:
                state.presence.watch.pop(member.sub.connection_id, None)
            return ()
        if isinstance(msg, UserEntry | CursorMoved | WatchPrefs | _PresenceFlush | RemotePresence):
            return self._presence(state, msg, now)
        if isinstance(msg, _PresenceBeat):
            return self._beat(state, now)
        if isinstance(msg, _Filled):
            effects = self._filled(state, msg, now)
            if state.waiting and not state.filling:
                read = not isinstance(msg.result, outcome.Error)
                effects += self._answer_waiting(state, now, read=read)
            return effects
        if isinstance(msg, _WindowEnd):
            return self._window_end(state, now)
        if isinstance(msg, _AccessChecked):
            return self._access_checked(state, msg, now)
        if isinstance(msg, _AccessRetry):
            check = state.checking
            return [] if check is None else [Await(check, _AccessChecked)]
        if isinstance(msg, _HeadCheck) and not state.subscribers:
            state.head_check = False
            state.head_seen = None
            return [CancelTimer("head")]  # and the room may passivate again
        if isinstance(msg, _HeadCheck) and self._log_known(state):
            state.head_seen = None
            return ()
        if isinstance(msg, _HeadCheck):
            return self._check_head(state, msg)
        if isinstance(msg, Resync):
            # what the broker brought meanwhile may be missing: presence too
            return self._ask(state, now, again=True) + self._resync(state)
        if isinstance(msg, Committed):
            if self.metrics is not None and msg.committed_s:
                self.metrics.room_seconds.observe(max(0.0, now - msg.committed_s))
            return self._committed(state, msg.events, now, msg.committed_s)
        raise TypeError(f"room: unexpected {msg!r}")

    def _committed(
        self,
        state: RoomState,
        events: tuple[StoredEvent, ...],
        now: float,
        committed_s: float = 0.0,
    ) -> list[Effect]:
        if state.filling:
            # a read of the log is under way: these wait, in order (bounded:
            # past the bound they are dropped and read back from the log)
            if len(state.held) + len(events) > self.max_held:
                state.held.clear()
                state.refill = True
            else:
                state.held.extend(events)
            return []
        if state.checking is not None:
            self._pause(state, events)
            return []
        fresh = [e for e in events if e.end_seq > state.head]
        if fresh and fresh[0].seq > state.head + 1:
            # a hole: events were committed that never reached us (a lost
            # commit answer, a writer crash); read the log from our head
            state.held.extend(fresh)
            return self._resync(state)
        check = None
        if self.access is not None:
            for i, event in enumerate(fresh):
                check = self.access(event)
                if check is not None:
                    # delivered up to this event; the rest waits for the check
                    events, later = tuple(fresh[: i + 1]), fresh[i + 1 :]
                    break
        effects = self._fan_out(state, events, now, committed_s)
        if self.is_board:
            self._highlight(state, events)
            effects += self._schedule_flush(state, now)
        if state.subscribers and not state.head_check:
            state.head_check = True
            effects.append(StartTimer("head", self.head_check_s, _HeadCheck(), repeat=True))
        if check is not None:
            state.checking = check
            state.access_checks += 1
            self._pause(state, later)
            effects.append(Await(check, _AccessChecked))
        return effects

    def _pause(self, state: RoomState, events: Iterable[StoredEvent]) -> None:
        """Keep ``events`` (past the head, in order, once each) for the end
        of the access check.  Overflow policy: past ``max_held``, or past a
        hole, they are dropped and the log is read once the check ended."""
        if state.paused_lost:
            return
        last = state.paused[-1].end_seq if state.paused else state.head
        for event in events:
            if event.end_seq <= last:
                continue  # known (read again from the log, or its own commit)
            if event.seq > last + 1 or len(state.paused) >= self.max_held:
                state.paused_lost = True
                return
            state.paused.append(event)
            last = event.end_seq

    def _access_checked(self, state: RoomState, msg: _AccessChecked, now: float) -> list[Effect]:
        """The check ended: deliver what waited for it (up to the next event
        that changes access).  A check that failed runs again later, and
        nothing past the event is delivered meanwhile (fails closed)."""
        if state.checking is None:
            return []
        if isinstance(msg.result, outcome.Error):
            effects: list[Effect] = [StartTimer("access", ACCESS_RETRY_S, _AccessRetry())]
            if state.waiting and not state.filling:
                # joins waiting for the check: refused unavailable (the store
                # is away), not kept for as long as it stays away
                effects += self._answer_waiting(state, now, read=False)
            return effects
        state.checking = None
        paused, state.paused = state.paused, []
        lost, state.paused_lost = state.paused_lost, False
        effects = self._committed(state, tuple(paused), now) if paused else []
        if lost:
            effects += self._resync(state)
        if state.waiting and not state.filling and state.checking is None:
            effects += self._answer_waiting(state, now, read=True)
        return effects

    def _watch_head(self, state: RoomState) -> list[Effect]:
        """A cluster node's room checks its log's head from its first
        subscriber on, not only once something was committed to it: the
        broadcast of the only commit since it started may have been lost."""
        if not self.store.shared or not state.subscribers or state.head_check:
            return []
        state.head_check = True
        return [StartTimer("head", self.head_check_s, _HeadCheck(), repeat=True)]

    def _log_known(self, state: RoomState) -> bool:
        """Whether the store's own record of what it committed (no read)
        says this room has everything its log has: then a head check need
        not read the log (it was ~5 % of a core with 100 busy rooms)."""
        if state.filling or state.held:
            return False
        return self.store.cached_head(self.room) == (state.epoch, state.head)

    def _check_head(self, state: RoomState, check: _HeadCheck) -> list[Effect]:
        """After :meth:`_log_known` said no.  The first time the store's
        record is past the room's head, the room looks again once its
        mailbox's present messages were handled (the ``Committed`` is most
        likely among them) rather than read its log; if by then, or by the
        next periodic check, it has not reached the head it saw, it reads
        its log (a hole).  A room that reached it, but finds the store
        further on again, waits for the next periodic check: a busy room
        never sends itself checks in a loop.  A shared store keeps no
        record: the log is read."""
        seen, state.head_seen = state.head_seen, None
        known = self.store.cached_head(self.room)
        if known is None or state.filling or state.held:
            return self._resync(state)
        if seen is not None and (seen[0] != state.epoch or state.head < seen[1]):
            return self._resync(state)
        state.head_seen = known
        if check.again:
            return []
        return [TrySend(f"room:{self.room}", _HeadCheck(again=True))]

    def _resync(self, state: RoomState) -> list[Effect]:
        if state.filling:
            state.refill = True
            return []
        state.filling = True
        mark("room.log_read")
        store, room, after, limit = self.store, self.room, state.head, self.fill_page
        blocking = self._blocking

        async def read() -> list[StoredEvent]:
            return await blocking.run(lambda: store.events_since(room, after, limit))

        return [Await(read, lambda result: _Filled(result))]

    def _filled(self, state: RoomState, msg: _Filled, now: float) -> list[Effect]:
        state.filling = False
        try:
            events = tuple(msg.result.unwrap())
        except Exception:
            # the store is unreachable: try again on the next head check
            state.refill = False
            return []
        effects: list[Effect] = []
        if events:
            state.filled += 1
            effects += self._committed(state, events, now)
        more = len(events) >= self.fill_page or state.refill
        state.refill = False
        held, state.held = state.held, []
        if more:
            state.held = held
            return effects + self._resync(state)
        if held:
            effects += self._committed(state, tuple(held), now)
        return effects

    # -------------------------------------------------------------- fan-out

    def _fan_out(
        self,
        state: RoomState,
        stored: tuple[StoredEvent, ...],
        now: float,
        committed_s: float = 0.0,
    ) -> list[Effect]:
        """Take the fresh events into memory; deliver them now, or at the
        end of the batch window if the room is under load."""
        fresh = [e for e in stored if e.end_seq > state.head]
        if not fresh:
            return []
        if not state.epoch or fresh[0].epoch != state.epoch:
            # the first event of the room, or a reset log: adopt its epoch
            state.epoch = fresh[0].epoch
        entries = []
        for stored_event in fresh:
            event = to_event(stored_event)
            # encoded at once for the JSON subscribers (most of them), and to
            # know its size: the ring is bounded in bytes as in events
            frame = encode(Codec.JSON, event)
            entry = _Ring(
                event, stored_event.end_seq, {(Codec.JSON, False): frame}, committed_s, len(frame)
            )
            entries.append(entry)
            state.ring.append(entry)
            state.ring_bytes += entry.size
        state.head = fresh[-1].end_seq
        while len(state.ring) > self.ring_size or (
            state.ring_bytes > self.ring_bytes_max and len(state.ring) > 1
        ):
            state.ring_bytes -= state.ring.popleft().size
            mark("room.ring_evicted")
        if state.window_timer:
            state.unsent.extend(entries)
            return []
        if now - state.window_start_s >= self.batch_window_s:
            state.window_start_s, state.window_sends = self._window_of(now), 0
        sends = len(state.subscribers)
        if state.window_sends and state.window_sends + sends > self.window_sends_max:
            state.unsent.extend(entries)
            state.window_timer = True
            end = state.window_start_s + self.batch_window_s
            return [StartTimer("window", max(0.0, end - now), _WindowEnd(), at_s=end)]
        state.window_sends += sends
        self._deliver(state, entries)
        return []

    def _window_of(self, now: float) -> float:
        """The start of the window ``now`` is in: windows are aligned to the
        clock, so every room's end at the same instant."""
        return math.floor(now / self.batch_window_s) * self.batch_window_s

    def _window_end(self, state: RoomState, now: float) -> list[Effect]:
        state.window_timer = False
        entries, state.unsent = state.unsent, []
        state.window_start_s = max(self._window_of(now), state.window_start_s + self.batch_window_s)
        state.window_sends = len(state.subscribers)
        if entries:
            state.windows += 1
            if self.metrics is not None:
                self.metrics.batch_windows.inc()
            self._deliver(state, entries, hold=True)
        return []

    def _deliver(self, state: RoomState, entries: list[_Ring], *, hold: bool = False) -> None:
        """Offer ``entries`` (consecutive, in seq order) to every subscriber.
        Those that were sent everything before them share one frame per
        codec (and projection); the others get what they miss of them.
        ``hold``: a window's end; each outbox's writer sends it together with
        the other rooms' whose window ended at the same instant."""
        delivered, lagged = state.delivered, state.lagged
        self._deliver_all(state, entries, hold)
        if self.metrics is not None:
            self.metrics.deliveries.inc(state.delivered - delivered)
            if state.lagged > lagged:
                self.metrics.lagged.inc(state.lagged - lagged)

    def _deliver_all(self, state: RoomState, entries: list[_Ring], hold: bool = False) -> None:
        base = entries[0].event.seq - 1
        shared: dict[tuple[Codec, bool, int], list[tuple[int, int, OutFrame]]] = {}
        upto = entries[-1].end_seq
        for member in list(state.subscribers.values()):
            if member.last_offered != base:
                self._offer(state, member, entries)
                continue
            sub = member.sub
            key = (sub.outbox.codec, sub.activity, sub.outbox.max_frame_messages)
            frames = shared.get(key)
            if frames is None:
                frames = shared[key] = self._batch_frames(state, sub, entries)
            for first_seq, count, frame in frames:
                if not sub.outbox.offer_batch(
                    sub.room, first_seq, count, frame, upto=upto, hold=hold
                ):
                    # it overflowed: the outbox dropped its backlog and queued ``lagged``
                    state.lagged += 1
                    state.subscribers.pop(sub.key, None)
                    break
                state.delivered += count
            else:
                member.last_offered = upto

    def _batch_frames(
        self, state: RoomState, sub: Subscription, entries: list[_Ring]
    ) -> list[tuple[int, int, OutFrame]]:
        """``entries`` encoded for ``sub``'s codec and projection, joined into
        frames of at most ``max_batch`` messages (and what its outbox puts in
        one frame): ``(first_seq, count, frame)``."""
        items = self._encoded(state, sub, entries)
        codec = sub.outbox.codec
        size = max(1, min(self.max_batch, sub.outbox.max_frame_messages))
        frames = []
        for i in range(0, len(items), size):
            chunk = items[i : i + size]
            frame = OutFrame(join_frame(codec, [item for _, item in chunk]), entries[i].committed_s)
            frames.append((chunk[0][0], len(chunk), frame))
        return frames

    def _encoded(
        self, state: RoomState, sub: Subscription, entries: list[_Ring]
    ) -> list[tuple[int, Frame]]:
        """The entries encoded for this subscriber: once per codec (and
        projection) per event, shared by every subscriber that needs it."""
        codec = sub.outbox.codec
        items: list[tuple[int, Frame]] = []
        for entry in entries:
            frame = entry.frames.get((codec, sub.activity))
            if frame is None:
                message = as_activity(entry.event, sub.room) if sub.activity else entry.event
                frame = entry.frames[(codec, sub.activity)] = encode(codec, message)
            items.append((entry.event.seq, frame))
        return items

    def _offer(self, state: RoomState, member: _Member, entries: list[_Ring]) -> bool:
        sub = member.sub
        items = self._encoded(state, sub, [e for e in entries if e.end_seq > member.last_offered])
        if not items:
            return True
        upto = entries[-1].end_seq
        if sub.outbox.offer_events(sub.room, items, upto=upto):
            member.last_offered = upto
            state.delivered += len(items)
            return True
        # it overflowed: the outbox dropped its backlog and queued ``lagged``
        state.lagged += 1
        state.subscribers.pop(sub.key, None)
        return False

    # -------------------------------------------------------------- joins

    def _subscribe(self, state: RoomState, body: Subscribe) -> str | CatchUp:
        sub, since = body.sub, body.since
        state.subscribers.pop(sub.key, None)
        reason = state.revoked_ahead.pop(sub.key, None)
        if reason is not None:
            # its user lost sight of the room while the join was on its way
            with contextlib.suppress(OutboxClosed, OutboxOverflow):
                sub.outbox.drop_room(sub.room)
                sub.outbox.offer_control(Left(room=sub.room, reason=reason))
            return "revoked"
        recovered = False
        start = state.head
        if since is not None and since.epoch not in ("", state.epoch):
            mark("room.other_epoch")
        if since is not None and since.seq <= state.head:
            same_epoch = since.epoch == state.epoch or (since.epoch == "" and state.epoch != "")
            if same_epoch:
                oldest = state.ring[0].event.seq if state.ring else state.head + 1
                in_memory = since.seq + 1 >= oldest or since.seq == state.head
                if in_memory and self._replay_fits(state, sub, since.seq):
                    recovered = True
                    start = since.seq
                else:
                    # older than memory, or more than the outbox takes at
                    # once: replayed from the log at the client's pace
                    mark("room.catch_up")
                    return CatchUp(state.epoch, state.head)
        if not body.quiet:
            sub.outbox.offer_control(
                Joined(room=sub.room, epoch=state.epoch, seq=state.head, recovered=recovered)
            )
        sub.outbox.open_room(sub.room, start)
        member = state.subscribers[sub.key] = _Member(sub, start)
        if self.is_board and not sub.activity:
            state.presence.watch.setdefault(sub.connection_id, _Watch()).full = True
        replay = [entry for entry in state.ring if entry.end_seq > start]
        if replay and not self._offer(state, member, replay):
            return "lagged"
        return "live"

    def _ahead(self, state: RoomState, body: Subscribe) -> bool:
        """Whether ``body`` joins a cluster node's room from past its head
        in its epoch (or an epoch it has not seen yet: it started before
        another daemon's first commit to the room)."""
        since = body.since
        return (
            self.store.shared
            and since is not None
            and since.seq > state.head
            and (since.epoch == state.epoch or state.epoch == "")
        )

    def _answer_waiting(self, state: RoomState, now: float, *, read: bool) -> list[Effect]:
        """The waiting joins, now that the log was read (whatever it held:
        a join still past the head is answered as a single daemon does).
        If the log could not be ``read`` (the store away), a join still past
        the head is refused ``StoreUnavailable`` (its connection is told
        ``left`` ``unavailable`` and may join again), not answered at a head
        older than what its client saw.  A join still past the head while
        the log's next events wait for an access check keeps waiting for the
        check (:meth:`_access_checked` answers it)."""
        waiting, state.waiting = state.waiting, []
        effects: list[Effect] = []
        for request in waiting:
            body = request.body
            if not read and self._ahead(state, body):
                away = StoreUnavailable("the room's log cannot be read: the store is away")
                effects.append(Reply(request.reply_to, error=away))
                continue
            if state.checking is not None and self._ahead(state, body):
                # what the log held past the head waits for an access
                # check (its client saw it through another daemon): so
                # does the join, answered when the check ended (simulator,
                # cluster seed 444)
                state.waiting.append(request)
                continue
            effects.append(Reply(request.reply_to, self._subscribe(state, body)))
            if self.is_board and not body.sub.activity:
                effects += self._schedule_flush(state, now)
        return effects + self._watch_head(state)

    def _revoke(self, state: RoomState, body: Revoke) -> bool:
        member = state.subscribers.pop(body.key, None)
        if member is None:
            if body.ahead:
                state.revoked_ahead[body.key] = body.reason
                while len(state.revoked_ahead) > REVOKED_AHEAD_MAX:
                    del state.revoked_ahead[next(iter(state.revoked_ahead))]
            else:
                state.revoked_ahead.pop(body.key, None)
            return False
        sub = member.sub
        if not sub.activity:
            state.presence.watch.pop(sub.connection_id, None)
        with contextlib.suppress(OutboxClosed, OutboxOverflow):
            sub.outbox.drop_room(sub.room)
            sub.outbox.offer_control(Left(room=sub.room, reason=body.reason))
        return True

    # -------------------------------------------------------------- activity

    def _activity(self, state: RoomState, query: ActivityQuery) -> dict[str, Any] | None:
        """Up to ``query.limit`` newest entries from the last
        ``activity_memory`` events kept in memory; None if memory holds
        fewer matches than asked and older events exist."""
        recent = list(state.ring)[-self.activity_memory :]
        matches = [
            e.event
            for e in reversed(recent)
            if (query.user_id is None or e.event.user_id == query.user_id)
            and (query.actions is None or e.event.event in query.actions)
        ]
        complete = bool(recent) and recent[0].event.seq <= 1
        if len(matches) < query.limit and not complete:
            return None
        page = matches[: query.limit]
        more = len(matches) > query.limit or not complete
        return {
            "data": [activity_entry(e) for e in page],
            "next_cursor": str(page[-1].seq) if page and more else None,
        }

    # -------------------------------------------------------------- presence

    def _presence(self, state: RoomState, msg: Any, now: float) -> list[Effect]:
        p = state.presence
        effects: list[Effect] = []
        if isinstance(msg, _PresenceFlush):
            p.flush_pending = False
            p.last_flush_s = now
            self._flush(state)
            return self._announce(state, full=False)
        if isinstance(msg, UserEntry):
            if msg.entry is None:
                p.local.pop(msg.user_id, None)
                p.own_viewports.pop(msg.user_id, None)
            else:
                p.local[msg.user_id] = msg.entry
            if self.announce is not None:
                p.out_users[msg.user_id] = msg.entry
                p.farewells = self._farewell_beats()
                effects += self._start_beat(state)
            self._merge(state, (msg.user_id,))
        elif isinstance(msg, CursorMoved):
            p.cursors[msg.user_id] = (msg.x, msg.y)
            p.cursors_dirty[msg.user_id] = None
            if self.announce is not None:
                p.out_cursors[msg.user_id] = (msg.x, msg.y)
        elif isinstance(msg, RemotePresence):
            node = p.nodes.get(msg.node)
            if node is None:
                node = p.nodes[msg.node] = NodePresence(now)
                effects += self._start_beat(state)
            self._merge(state, node.apply(msg, now))
            if msg.ask and p.local:  # a daemon whose room just started
                effects += self._announce(state, full=True)
            for uid, (x, y) in msg.cursors.items():
                if uid in p.users:
                    p.cursors[uid] = (x, y)
                    p.cursors_dirty[uid] = None
            for uid, viewport in node.new_viewports(msg, p.users).items():
                # for this daemon's followers of a user on another daemon; a
                # heartbeat's unchanged one is no news (the user may have
                # moved on a third daemon since)
                if uid in p.users and p.viewports.get(uid) != viewport:
                    p.viewports[uid] = viewport
                    p.viewports_dirty[uid] = None
        elif isinstance(msg, WatchPrefs):
            watch = p.watch.setdefault(msg.connection_id, _Watch())
            if msg.viewport is not None:
                watch.viewport = msg.viewport
                p.viewports[msg.user_id] = msg.viewport
                p.viewports_dirty[msg.user_id] = None
                if self.announce is not None:
                    p.out_viewports[msg.user_id] = msg.viewport
                    p.own_viewports[msg.user_id] = msg.viewport
            if msg.hide_cursors is not None:
                watch.hide_cursors = msg.hide_cursors
            if msg.follow is not None:
                watch.follow = msg.follow or None
                watch.full = True
        return effects + self._schedule_flush(state, now)

    def _merge(self, state: RoomState, user_ids: Iterable[str]) -> None:
        """The facepile entries of ``user_ids`` again, from this daemon's
        users and the other daemons'; a user no daemon shows loses the
        cursor and viewport too."""
        p = state.presence
        nodes = [p.nodes[n] for n in sorted(p.nodes)]
        for uid in user_ids:
            entry = merged_entry(uid, p.local, nodes)
            if entry is None:
                if p.users.pop(uid, None) is not None:
                    p.users_dirty = True
                p.cursors.pop(uid, None)
                p.viewports.pop(uid, None)
            elif p.users.get(uid) != entry:
                p.users[uid] = entry
                p.users_dirty = True

    def _announce(self, state: RoomState, *, full: bool) -> list[Effect]:
        """Tell the other daemons what changed of this daemon's users (or,
        ``full``, all of them: the heartbeat).  Lossy: a full publisher
        mailbox drops it, and the next heartbeat repairs."""
        p = state.presence
        if self.announce is None or not (full or p.out_users or p.out_cursors or p.out_viewports):
            return []
        users: dict[str, dict[str, Any] | None] = dict(p.local) if full else p.out_users
        viewports = p.out_viewports
        if full:
            # a daemon whose follower came later learns where they look
            # here (where they look on other daemons, those say)
            viewports = {u: v for u, v in p.own_viewports.items() if u in p.local}
        board = state.room.removeprefix("board:")
        out = PresenceOut(board, full, users, p.out_cursors, viewports)
        p.out_users, p.out_cursors, p.out_viewports = {}, {}, {}
        return [TrySend(self.announce, out)]

    def _ask(self, state: RoomState, now: float, *, again: bool = False) -> list[Effect]:
        """A cluster node's board room with subscribers asks the other
        daemons for their users (they answer with their heartbeats): its
        facepile need not wait up to a heartbeat for them.  Once when it
        starts; ``again`` (a resync) at most once per flush period.

        A room that starts also beats once even with none of its users
        here: the others may still show users of its previous life (a
        room, or the whole registry, started again), whom its full
        message of none replaces within a heartbeat rather than after
        their liveness timeout and the grace (cluster seed 9763: 27 s).
        Not at once: the users' entries come back to a restarted room
        from their presence actors just after its start."""
        p = state.presence
        if self.announce is None or not self.is_board or not state.subscribers:
            return []
        first = p.asked_s == -math.inf
        if not (first or again) or now - p.asked_s < 1.0 / self.presence_config.flush_hz:
            return []
        p.asked_s = now
        board = state.room.removeprefix("board:")
        effects: list[Effect] = [
            TrySend(self.announce, PresenceOut(board, False, {}, {}, ask=True))
        ]
        if first:
            p.farewells = max(p.farewells, 1)
            effects += self._start_beat(state)
        return effects

    def _start_beat(self, state: RoomState) -> list[Effect]:
        p = state.presence
        if p.beating:
            return []
        p.beating = True
        beat_s = self.presence_config.node_heartbeat_s
        return [StartTimer("presence-beat", beat_s, _PresenceBeat(), repeat=True)]

    def _beat(self, state: RoomState, now: float) -> list[Effect]:
        """Every ``node_heartbeat_s`` while there is something to do:
        announce this daemon's users in full, and let go the users of the
        daemons that vanished (no message for the liveness timeout, then
        the offline grace)."""
        p = state.presence
        cfg = self.presence_config
        gone = vanished(p.nodes, now, liveness_s=cfg.node_liveness_s, grace_s=cfg.offline_grace_s)
        effects: list[Effect] = []
        if gone:
            users: set[str] = set()
            for node in gone:
                users |= set(p.nodes.pop(node).users)
            self._merge(state, sorted(users))
            effects += self._schedule_flush(state, now)
        if p.local:
            effects += self._announce(state, full=True)
        elif p.farewells:  # (counted from the last entry's change)
            p.farewells -= 1
            effects += self._announce(state, full=True)  # none of ours here
        if not p.local and not p.nodes and not p.farewells:
            p.beating = False
            effects.append(CancelTimer("presence-beat"))
        return effects

    def _farewell_beats(self) -> int:
        """Heartbeats that say "none of ours" after the last own user left:
        as many as fit in the others' liveness timeout (after it they drop
        this daemon's users anyway)."""
        cfg = self.presence_config
        return max(1, math.ceil(cfg.node_liveness_s / cfg.node_heartbeat_s))

    def _schedule_flush(self, state: RoomState, now: float) -> list[Effect]:
        """Flush on a fixed cadence: at once if the last flush is a period
        old (no latency when quiet), else one period after it: at most
        ``flush_hz`` frames per second per client."""
        p = state.presence
        if p.flush_pending or not (
            state.subscribers or p.out_users or p.out_cursors or p.out_viewports
        ):
            return []
        p.flush_pending = True
        # the period rounded up to a whole microsecond, so that float error
        # never fits a 31st frame into a second
        period_s = math.ceil(1_000_000 / self.presence_config.flush_hz) / 1_000_000
        delay = max(0.0, p.last_flush_s + period_s - now)
        return [StartTimer("presence", delay, _PresenceFlush())]

    def _highlight(self, state: RoomState, events: tuple[StoredEvent, ...]) -> None:
        p = state.presence
        for event in events:
            if event.user_id is None:
                continue
            target_type, target_id = _target(event)
            p.highlights.append(
                {
                    "action_id": f"{event.room}:{event.seq}",
                    "user_id": event.user_id,
                    "color": color_for(event.user_id),
                    "target_type": target_type,
                    "target_id": target_id,
                    "action": event.event,
                }
            )
        del p.highlights[: -self.max_highlights]

    def _flush(self, state: RoomState) -> None:
        """One presence frame per subscriber with what changed: at most
        ``flush_hz`` per second, since a flush happens only when its timer
        fires."""
        p = state.presence
        board = state.room.removeprefix("board:")
        margin = self.presence_config.cursor_margin
        all_users = sorted(p.users.values(), key=lambda e: str(e["user_id"]))
        for member in state.subscribers.values():
            sub = member.sub
            if sub.activity:
                continue
            watch = p.watch.get(sub.connection_id)
            full = watch is None or watch.full
            users = all_users if (p.users_dirty or full) else None
            cursors: list[dict[str, Any]] | None = None
            if not (watch is not None and watch.hide_cursors):
                view = watch.viewport if watch else None
                moved = []
                for uid in p.cursors if full else p.cursors_dirty:
                    if uid == sub.user_id or uid not in p.cursors:
                        continue
                    x, y = p.cursors[uid]
                    if _visible(x, y, view, margin):
                        moved.append({"user_id": uid, "x": x, "y": y})
                cursors = moved or None
            viewport = None
            if watch is not None and watch.follow and (full or watch.follow in p.viewports_dirty):
                viewport = p.viewports.get(watch.follow)
            highlights = list(p.highlights) or None
            if users is None and cursors is None and viewport is None and highlights is None:
                continue
            frame = Presence(
                board=board, users=users, cursors=cursors, viewport=viewport, highlights=highlights
            )
            sub.outbox.offer_presence(board, frame)
            p.frames += 1
            if watch is not None:
                watch.full = False
        p.users_dirty = False
        p.cursors_dirty.clear()
        p.viewports_dirty.clear()
        p.highlights.clear()

    def _replay_fits(self, state: RoomState, sub: Subscription, after: int) -> bool:
        """Whether replaying the ring after ``after`` fits in half the
        subscriber's outbox (in messages and bytes); otherwise the replay
        goes through the paced catch-up, so it cannot lag forever."""
        if state.head - after > sub.outbox.max_messages // 2:
            return False
        size = 0
        for item in self._encoded(state, sub, [e for e in state.ring if e.end_seq > after]):
            size += len(item[1])
        return sub.outbox.fits_half(0, size) or size == 0

    def describe(self, state: RoomState) -> dict[str, Any]:
        return {
            "room": state.room,
            "epoch": state.epoch,
            "head": state.head,
            "subscribers": len(state.subscribers),
            "ring": len(state.ring),
            "ring_bytes": state.ring_bytes,
            "delivered": state.delivered,
            "lagged": state.lagged,
            "windows": state.windows,
            "access_checks": state.access_checks,
        }


def _visible(x: float, y: float, viewport: Viewport | None, margin: float) -> bool:
    """Whether a cursor is inside a viewport (board coordinates) plus a margin."""
    if viewport is None:
        return True
    zoom = viewport.zoom or 1.0
    width, height = viewport.w / zoom, viewport.h / zoom
    return (
        viewport.x - margin <= x <= viewport.x + width + margin
        and viewport.y - margin <= y <= viewport.y + height + margin
    )


def _target(event: StoredEvent) -> tuple[str, str | None]:
    data = event.data if isinstance(event.data, dict) else {}
    kind = event.event.split(":", 1)[0]
    for key in ("session_id", "task_id", "board_id"):
        if key in data:
            return key.removesuffix("_id"), str(data[key])
    return kind, None
