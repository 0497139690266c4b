"""Board presence in the client: who is on a board, their cursors, the
viewport of the user one follows, action highlights; the client's own
presence, sent coalesced and throttled; the activity log of a board.

Receiving: :class:`BoardPresence` is the state of one board built from the
server's ``presence`` frames (``users`` replaces the facepile, ``cursors``
are the latest per user, ``viewport`` is the followed user's, ``highlights``
are appended).  Presence is lossy: a frame carries what changed, and a lost
one is replaced by the next.

Sending: :class:`PresenceSender` owns the client's pending presence.
:meth:`~PresenceSender.update` and :meth:`~PresenceSender.move` never block:
they merge into the board's pending update (the newest value of each field
wins), and one background task (:meth:`~PresenceSender.run`) sends at most
one update per ``1 / rate_per_s`` seconds of trio's clock, always with the
newest values, so the last position of a burst is always sent.
:class:`Throttle` is the pacing rule alone, pure in ``now``.

A connection is present on one board at a time on the server (the board of
its latest update); the sender remembers the view, viewport, hidden cursors
and followed user of that board so the client can send them again after a
reconnect (the server forgets a connection's presence when it drops).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from protocols import Cursor, Presence, PresenceUpdate, Viewport

from ..world import Clock, TrioClock

if TYPE_CHECKING:
    from ._client import Client, EventStream

__all__ = [
    "Activity",
    "ActivityEntry",
    "ActivityFeed",
    "ActivityPage",
    "BoardPresence",
    "CursorSender",
    "Highlight",
    "PresenceSender",
    "PresenceUser",
    "Throttle",
]

DEFAULT_RATE_PER_S: Final = 60.0
"""Presence updates per second the client sends at most (the server's
default ``presence_rate_per_s``)."""

_FIELDS: Final = ("cursor", "viewport", "view", "typing", "hide_cursors", "follow")
_REMEMBERED: Final = ("view", "viewport", "hide_cursors", "follow")
"""What is sent again after a reconnect.  Not ``typing`` (it expires in
seconds anyway) nor ``cursor`` (the server keeps the user's latest cursor
while the user is on the board; a stale one could hide a newer position from
the user's other window)."""


# ----------------------------------------------------------------- receiving


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@attrs.frozen
class PresenceUser:
    """One entry of a board's facepile."""

    user_id: str
    name: str = ""
    color: str = ""
    status: str = "active"
    """``active``, ``idle`` or ``away`` (offline users leave the facepile)."""
    view: str | None = None
    """What the user looks at (``session:<id>``...), from their latest window."""
    typing: bool = False

    @classmethod
    def from_wire(cls, entry: Mapping[str, Any]) -> PresenceUser | None:
        user_id = _text(entry.get("user_id"))
        if not user_id:
            return None
        return cls(
            user_id=user_id,
            name=_text(entry.get("name")) or "",
            color=_text(entry.get("color")) or "",
            status=_text(entry.get("status")) or "active",
            view=_text(entry.get("view")),
            typing=entry.get("typing") is True,
        )


@attrs.frozen
class Highlight:
    """An ``action:highlight``: someone just changed something on the board
    (for the flash on the changed card)."""

    action_id: str
    user_id: str
    color: str
    target_type: str
    target_id: str | None
    action: str

    @classmethod
    def from_wire(cls, entry: Mapping[str, Any]) -> Highlight | None:
        action_id, user_id = _text(entry.get("action_id")), _text(entry.get("user_id"))
        if action_id is None or user_id is None:
            return None
        return cls(
            action_id=action_id,
            user_id=user_id,
            color=_text(entry.get("color")) or "",
            target_type=_text(entry.get("target_type")) or "",
            target_id=_text(entry.get("target_id")),
            action=_text(entry.get("action")) or "",
        )


class BoardPresence:
    """Presence on one board as this client sees it, from the server's
    ``presence`` frames (see :meth:`Client.board_presence`).

    * ``users``: the facepile by user id (this client's user included);
      replaced whole by each frame that carries it;
    * ``cursors``: the latest ``(x, y)`` of each other user whose cursor the
      server sent (the server never sends a user's own cursor, culls cursors
      outside this client's viewport and sends none while this client hides
      cursors); a user who leaves the facepile loses their cursor;
    * ``followed_viewport``: the viewport of the user this client follows;
    * ``highlights``: the latest ``max_highlights`` action highlights, oldest
      first (``highlights_seen`` counts them all).

    Wait for a state with :meth:`wait_until` (woken by every frame, no
    polling).
    """

    def __init__(self, board_id: str, *, max_highlights: int = 100) -> None:
        self.board_id = board_id
        self.room = f"board:{board_id}"
        self.users: dict[str, PresenceUser] = {}
        self.cursors: dict[str, tuple[float, float]] = {}
        self.followed_viewport: Viewport | None = None
        self.following: str | None = None
        """The user this client follows (as it last asked)."""
        self.hiding_cursors = False
        """Whether this client asked not to get cursors."""
        self.highlights: deque[Highlight] = deque(maxlen=max_highlights)
        self.highlights_seen = 0
        self.frames = 0
        """Presence frames received for this board."""
        self.cursors_ignored = 0
        """Cursors received while this client hid cursors (in flight when it
        asked; the server sends none after)."""
        self.viewports_ignored = 0
        """Followed viewports received while this client followed nobody."""
        self.version = 0
        """Bumped on every change."""
        self.left_reason: str | None = None
        """Set when the client left the board room (or was refused it)."""
        self._lot = trio.lowlevel.ParkingLot()

    def others(self, user_id: str | None) -> dict[str, PresenceUser]:
        """The facepile without ``user_id`` (usually ``client.user_id``)."""
        return {uid: user for uid, user in self.users.items() if uid != user_id}

    async def wait_until(self, predicate: Callable[[BoardPresence], bool]) -> None:
        """Wait until ``predicate(self)`` holds (checked after every change).
        A checkpoint; cancel it with a timeout."""
        while not predicate(self):
            await self._lot.park()

    # ------------------------------------------------------------- changes

    def _changed(self) -> None:
        self.version += 1
        self._lot.unpark_all()

    def _apply(self, frame: Presence) -> None:
        if frame.users is not None:
            users: dict[str, PresenceUser] = {}
            for entry in frame.users:
                user = PresenceUser.from_wire(entry)
                if user is not None:
                    users[user.user_id] = user
            self.users = users
            for gone in [uid for uid in self.cursors if uid not in users]:
                del self.cursors[gone]
        if frame.cursors is not None and self.hiding_cursors:
            self.cursors_ignored += len(frame.cursors)
        elif frame.cursors is not None:
            for entry in frame.cursors:
                user_id = _text(entry.get("user_id"))
                x, y = _number(entry.get("x")), _number(entry.get("y"))
                if user_id is not None and x is not None and y is not None:
                    self.cursors[user_id] = (x, y)
        if frame.viewport is not None and self.following is None:
            self.viewports_ignored += 1
        elif frame.viewport is not None:
            self.followed_viewport = frame.viewport
        for entry in frame.highlights or ():
            highlight = Highlight.from_wire(entry)
            if highlight is not None:
                self.highlights.append(highlight)
                self.highlights_seen += 1
        self.frames += 1
        self._changed()

    def _asked(self, *, hide_cursors: bool | None, follow: str | None) -> None:
        """This client changed what it wants to see."""
        if hide_cursors is not None:
            self.hiding_cursors = hide_cursors
            if hide_cursors:
                self.cursors.clear()  # no more updates would come for them
        if follow is not None and (follow or None) != self.following:
            self.following = follow or None
            self.followed_viewport = None
        self._changed()

    def _rejoined(self) -> None:
        self.left_reason = None
        self._changed()

    def _left(self, reason: str) -> None:
        self.left_reason = reason
        self.users.clear()
        self.cursors.clear()
        self.followed_viewport = None
        self._changed()


# ------------------------------------------------------------------- sending


@attrs.define
class Throttle:
    """At most one send per ``interval_s``: leading edge (a send after a
    quiet interval goes at once), then at ``last + interval_s``.  Pure:
    ``now`` is an argument."""

    interval_s: float
    last_sent_s: float = -math.inf

    def ready_at(self) -> float:
        """The earliest time of the next send."""
        return self.last_sent_s + self.interval_s

    def delay_s(self, now: float) -> float:
        """How long to wait before the next send."""
        return max(0.0, self.ready_at() - now)

    def sent(self, now: float) -> None:
        self.last_sent_s = now


@attrs.define
class _Pending:
    fields: dict[str, Any]
    version: int


SendUpdate = Callable[[PresenceUpdate], Awaitable[bool]]
"""Sends one update (waiting for a connection if need be); returns whether it
is done with (sent, or refused for good) or must be tried again (the
connection was lost)."""


def _value(name: str, value: Any) -> Any:
    """A field's value as the wire wants it; TypeError at once for a wrong
    one (the background task must not find out later)."""
    if name == "cursor":
        if isinstance(value, Cursor):
            value = (value.x, value.y)
        if not isinstance(value, tuple) or len(value) != 2:
            raise TypeError(f"cursor must be (x, y), not {value!r}")
        x, y = (_number(v) for v in value)
        if x is None or y is None:
            raise TypeError(f"cursor must be two finite numbers, not {value!r}")
        return Cursor(x=x, y=y)
    if name == "viewport":
        if not isinstance(value, Viewport) or any(_number(v) is None for v in attrs.astuple(value)):
            raise TypeError(f"viewport must be a Viewport of finite numbers, not {value!r}")
        return value
    kind = bool if name in ("typing", "hide_cursors") else str
    if not isinstance(value, kind):
        raise TypeError(f"{name} must be a {kind.__name__}, not {value!r}")
    return value


class PresenceSender:
    """The client's own presence, coalesced per board and throttled to at
    most ``rate_per_s`` updates per second (all boards together), on
    ``clock`` (the world's seam).  Updates of the board with the oldest
    pending change go first.

    The server shows a connection on one board at a time, the board of its
    latest update, so an update for another board *supersedes* what is
    still pending for the others: sent later, it would put this connection
    back on a board it has left, for one throttle interval (a flicker on
    that board's facepile).  A superseded change counts as settled for
    :meth:`wait_sent`."""

    def __init__(
        self,
        send: SendUpdate,
        *,
        rate_per_s: float = DEFAULT_RATE_PER_S,
        clock: Clock | None = None,
    ) -> None:
        self._send = send
        self._clock = clock or TrioClock()
        self.throttle = Throttle(math.inf)
        self.rate_per_s = rate_per_s
        self._pending: dict[str, _Pending] = {}
        self._remembered: dict[str, dict[str, Any]] = {}
        self.current_board: str | None = None
        """The board of the latest update: the one the server shows this
        connection on."""
        self._version = 0
        self._sent: dict[str, int] = {}
        self._interrupts = 0
        self._wake = trio.lowlevel.ParkingLot()
        self._done = trio.lowlevel.ParkingLot()
        self.frames_sent = 0
        self.frames_by_board: dict[str, int] = {}
        self.changes = 0
        """Calls of :meth:`update` and :meth:`move`."""
        self.retries = 0
        """Updates put back because the connection was lost."""
        self.superseded = 0
        """Pending updates dropped for an update of another board."""

    @property
    def rate_per_s(self) -> float:
        return 1.0 / self.throttle.interval_s

    @rate_per_s.setter
    def rate_per_s(self, rate: float) -> None:
        if not rate > 0:
            raise ValueError("rate_per_s must be positive")
        self.throttle.interval_s = 1.0 / rate

    # ------------------------------------------------------------- changes

    def update(self, board: str, **fields: Any) -> int:
        """Merge ``fields`` (``cursor`` as ``(x, y)``, ``viewport``,
        ``view``, ``typing``, ``hide_cursors``, ``follow``; None values are
        ignored) into the board's pending update.  Never blocks.  Returns the
        change's version (see :meth:`wait_sent`)."""
        unknown = set(fields) - set(_FIELDS)
        if unknown:
            raise TypeError(f"unknown presence field(s): {', '.join(sorted(unknown))}")
        values = {name: _value(name, v) for name, v in fields.items() if v is not None}
        self.changes += 1
        self._version += 1
        if board != self.current_board:
            self._supersede(board)
        self.current_board = board
        remembered = self._remembered.setdefault(board, {})
        remembered.update({name: v for name, v in values.items() if name in _REMEMBERED})
        self._merge(board, values, self._version)
        return self._version

    def move(self, board: str, x: float, y: float) -> int:
        """The cursor moved; never blocks."""
        return self.update(board, cursor=(x, y))

    def restore(self, board: str) -> int:
        """Queue the remembered state of ``board`` again (after a reconnect).
        ``hide_cursors`` is always included: it makes the server send this
        connection the board's whole presence."""
        return self.update(board, **{"hide_cursors": False, **self._remembered.get(board, {})})

    def remembered(self, board: str) -> dict[str, Any]:
        return dict(self._remembered.get(board, {}))

    def pending(self, board: str) -> dict[str, Any] | None:
        """The fields waiting to be sent for ``board``."""
        entry = self._pending.get(board)
        return None if entry is None else dict(entry.fields)

    def _supersede(self, board: str) -> None:
        """Drop what is pending for boards other than ``board``."""
        for other in [b for b in self._pending if b != board]:
            self._settle(other, self._pending.pop(other).version)
            self.superseded += 1

    def _settle(self, board: str, version: int) -> None:
        self._sent[board] = max(self._sent.get(board, 0), version)
        self._done.unpark_all()

    def _merge(
        self, board: str, fields: dict[str, Any], version: int, *, first: bool = False
    ) -> None:
        entry = self._pending.get(board)
        if entry is None:
            entry = _Pending({}, version)
            if first:
                self._pending = {board: entry, **self._pending}
            else:
                self._pending[board] = entry
        if first:  # older fields under the newer ones
            entry.fields = {**fields, **entry.fields}
        else:
            entry.fields.update(fields)
        entry.version = max(entry.version, version)
        self._wake.unpark_all()

    # ------------------------------------------------------------- waiting

    def is_sent(self, board: str, version: int) -> bool:
        """Whether the change ``version`` of ``board`` was sent, or
        superseded by a change of another board."""
        return self._sent.get(board, 0) >= version

    async def wait_sent(self, board: str, version: int) -> bool:
        """Wait until the change ``version`` of ``board`` is sent or
        superseded (True), or until :meth:`interrupt` (False: it goes out
        later)."""
        interrupts = self._interrupts
        while not self.is_sent(board, version):
            if self._interrupts != interrupts:
                return False
            await self._done.park()
        return True

    def interrupt(self) -> None:
        """Wake :meth:`wait_sent` callers (the connection was lost or the
        client is closing)."""
        self._interrupts += 1
        self._done.unpark_all()

    # ---------------------------------------------------------------- task

    async def run(self) -> None:
        """Send pending updates, at most one per ``throttle.interval_s``, for
        ever (cancel it to stop)."""
        while True:
            while not self._pending:
                await self._wake.park()
            delay = self.throttle.delay_s(self._clock.now_s())
            if delay > 0:
                await trio.sleep(delay)
            board = next(iter(self._pending))
            entry = self._pending.pop(board)
            update = PresenceUpdate(board=board, **entry.fields)
            done = await self._send(update)
            self.throttle.sent(self._clock.now_s())
            if done:
                self.frames_sent += 1
                self.frames_by_board[board] = self.frames_by_board.get(board, 0) + 1
                self._settle(board, entry.version)
            elif board != self.current_board:  # moved on meanwhile
                self.superseded += 1
                self._settle(board, entry.version)
            else:
                self.retries += 1
                self._merge(board, entry.fields, entry.version, first=True)


class CursorSender:
    """``client.cursor_sender(board_id)``: this client's cursor on a board.
    :meth:`move` never blocks; the client's :class:`PresenceSender` sends at
    most ``rate_per_s`` updates per second with the newest position."""

    def __init__(self, sender: PresenceSender, board_id: str) -> None:
        self.board_id = board_id
        self._sender = sender
        self.position: tuple[float, float] | None = None
        """The latest position given to :meth:`move`."""
        self.moves = 0
        self._version = 0

    def move(self, x: float, y: float) -> None:
        self.position = (x, y)
        self.moves += 1
        self._version = self._sender.move(self.board_id, x, y)

    @property
    def frames_sent(self) -> int:
        """Updates sent for this board (cursor or not)."""
        return self._sender.frames_by_board.get(self.board_id, 0)

    @property
    def flushed(self) -> bool:
        """Whether the latest position has been sent."""
        return self._sender.is_sent(self.board_id, self._version)

    async def flush(self) -> bool:
        """Wait until the latest position is sent; False if the connection
        dropped meanwhile (it is sent after the reconnect)."""
        return await self._sender.wait_sent(self.board_id, self._version)


# ------------------------------------------------------------------ activity


@attrs.frozen
class ActivityEntry:
    """One entry of a board's activity log: ``id`` is the seq of the board
    event it derives from."""

    id: int
    action: str
    user_id: str | None = None
    ts: int | None = None
    data: Any = None

    @classmethod
    def from_wire(cls, row: Any) -> ActivityEntry | None:
        if not isinstance(row, dict):
            return None
        ident, action = row.get("id"), row.get("action")
        if isinstance(ident, bool) or not isinstance(ident, int) or not isinstance(action, str):
            return None
        ts = row.get("ts")
        return cls(
            id=ident,
            action=action,
            user_id=_text(row.get("user_id")),
            ts=ts if isinstance(ts, int) and not isinstance(ts, bool) else None,
            data=row.get("data"),
        )


@attrs.frozen
class ActivityPage:
    entries: list[ActivityEntry]
    """Newest first."""
    next_cursor: str | None
    """Pass it as ``cursor`` for the older entries; None at the oldest."""


class ActivityFeed:
    """The live ``activity:new`` stream of a board (see
    :meth:`Activity.live`): ``async for entry in feed``.  ``missed`` counts
    entries dropped because the consumer fell behind, ``reloads`` the times
    the stream could not be resumed (entries between were not delivered:
    read them with :meth:`Activity.find`)."""

    def __init__(self, stream: EventStream) -> None:
        self._stream = stream
        self.reloads = 0

    @property
    def missed(self) -> int:
        return self._stream.missed_total

    def close(self) -> None:
        self._stream.close()

    def __aiter__(self) -> ActivityFeed:
        return self

    async def __anext__(self) -> ActivityEntry:
        while True:
            event = await self._stream.__anext__()
            if event.kind == "reload":
                self.reloads += 1
                continue
            entry = ActivityEntry.from_wire(event.data) if event.name == "activity:new" else None
            if entry is not None:
                return entry

    async def __aenter__(self) -> ActivityFeed:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


class Activity:
    """``client.activity(board_id)``: the board's activity log."""

    def __init__(self, client: Client, board_id: str) -> None:
        self.client = client
        self.board_id = board_id
        self.room = f"activity:{board_id}"

    async def find(
        self,
        *,
        user_id: str | None = None,
        action: str | Sequence[str] | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> ActivityPage:
        """One page, newest first, filtered by user and action(s)."""
        query: dict[str, Any] = {"board_id": self.board_id, "$limit": limit}
        if user_id is not None:
            query["user_id"] = user_id
        if action is not None:
            query["action"] = action if isinstance(action, str) else list(action)
        if cursor is not None:
            query["$cursor"] = cursor
        page = await self.client.call("activity", "find", query=query)
        rows = page.get("data") if isinstance(page, dict) else None
        entries = [e for e in map(ActivityEntry.from_wire, rows or []) if e is not None]
        next_cursor = page.get("next_cursor") if isinstance(page, dict) else None
        return ActivityPage(entries, next_cursor if isinstance(next_cursor, str) else None)

    async def pages(
        self,
        *,
        user_id: str | None = None,
        action: str | Sequence[str] | None = None,
        limit: int = 50,
    ) -> AsyncIterator[ActivityPage]:
        """Every page, newest first; older ones fetched as the iteration asks."""
        cursor: str | None = None
        while True:
            page = await self.find(user_id=user_id, action=action, limit=limit, cursor=cursor)
            yield page
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def live(self, *, max_queue: int | None = None) -> ActivityFeed:
        """Join ``activity:<board>`` and return its live entries from now on
        (resumed across reconnects like any room).  Close the feed when done;
        ``client.leave(feed_room)`` leaves the room."""
        stream = self.client.events(self.room, max_queue=max_queue)
        try:
            await self.client.join(self.room)
        except BaseException:
            stream.close()
            raise
        return ActivityFeed(stream)
