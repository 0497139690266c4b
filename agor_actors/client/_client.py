"""The Python client: one WebSocket to the daemon, kept open across drops.

``async with connect(url, token=...) as client`` opens the connection and
returns once the server has welcomed it.  From then on the client
reconnects by itself after any loss (exponential backoff with full jitter,
drawn from the world's entropy seam), rejoins every room with ``since``
and applies every event exactly once, in order (the protocol's
:class:`~protocols.ClientConnection` machine does the bookkeeping and
outlives each connection).

Per connection there is one reader task (frames into the machine, its
events dispatched through one method) and one write path, :meth:`Client._send`,
which turns every transport failure into :class:`ConnectionLost`.  A
heartbeat task pings as the server's ``welcome`` asks and drops a connection
that stays silent (``Heartbeat.timeout_s``), which the reconnect loop
replaces.

Calls made while disconnected wait for the connection (up to
``call_timeout_s``); a call in flight when the connection drops raises
:class:`ConnectionLost` (it may or may not have run).  ``find`` and ``get``
are retried after a reconnect, writes are not.

Presence (see ``_presence``): :meth:`Client.board_presence` keeps a board's
facepile, cursors, followed viewport and highlights from the server's
``presence`` frames; :meth:`Client.set_presence` and
:meth:`Client.cursor_sender` feed one throttled sender (at most
``presence_rate_per_s`` updates a second, the newest values always sent
last), whose state of the current board is sent again after a reconnect.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final, Literal

import attrs
import trio

from protocols import (
    CLIENT_LIMITS,
    Call,
    CallResult,
    ClientConnection,
    ClientEvent,
    ClientState,
    Codec,
    ErrorCode,
    ErrorInfo,
    Event,
    EventApplied,
    Heartbeat,
    HeartbeatAction,
    Limits,
    LocalProtocolError,
    PongReceived,
    PresenceChanged,
    PresenceUpdate,
    ProtocolViolation,
    ReloadRequired,
    Result,
    ResumeRequested,
    RoomJoined,
    RoomLeft,
    RoomStatus,
    ServerError,
    Since,
    TokenBucket,
    Viewport,
    Welcome,
    Welcomed,
    backoff_s,
)
from protocols import Frame as WireFrame

from ..world import (
    Clock,
    Dialer,
    DialFailed,
    Entropy,
    MessageTransport,
    SecureEntropy,
    SeededEntropy,
    SystemWallClock,
    TransportClosed,
    TrioClock,
    WallClock,
)
from ._errors import CallError, ClientClosed, ConnectionLost
from ._mirror import Mirror, Resources
from ._observer import ClientObserver
from ._presence import (
    DEFAULT_RATE_PER_S,
    Activity,
    BoardPresence,
    CursorSender,
    PresenceSender,
)
from ._stream import MessageWriter
from ._transport import WebSocketDialer

__all__ = [
    "CallError",
    "Client",
    "ClientClosed",
    "ClientStatistics",
    "ConnectionLost",
    "EventStream",
    "Loader",
    "RoomEvent",
    "Service",
    "connect",
    "load_room",
]

log = logging.getLogger("agor_actors.client")

FATAL_CLOSE_CODES: Final = frozenset({4001})
"""Close codes after which reconnecting cannot help (the token is refused)."""
TOKEN_EXPIRED_CLOSE: Final = 4002
"""The server's close once the token expired: refresh, then reconnect."""

Refresh = Callable[[], Awaitable[str]]
"""Gets a new access token (a refresh token's rotation: see
:class:`agor_actors.client.Credentials`)."""

_READ_METHODS: Final = frozenset({"find", "get"})
_KEYED_SERVICES: Final = frozenset({"sessions", "tasks", "messages", "boards"})
"""The services whose writes take an idempotency key."""


def _keyed_by_default(service: str, method: str) -> bool:
    """Whether a write gets a key of its own (``idempotent_writes``)."""
    if service not in _KEYED_SERVICES or method in _READ_METHODS:
        return False
    return not (service == "messages" and method == "stream")


_OPTIMISTIC_ROOMS: Final[Mapping[str, tuple[str, str]]] = {
    # service -> (room kind, field of the created data naming the room)
    "tasks": ("session", "session_id"),
    "messages": ("session", "session_id"),
    "sessions": ("board", "board_id"),
}


# ------------------------------------------------------------------- events


@attrs.frozen
class RoomEvent:
    """What :meth:`Client.events` yields.

    ``kind`` is ``"event"`` for a room event (``name``, ``data``... as sent)
    and ``"reload"`` when the client had to reload the room's state (after a
    ``recovered: false`` join: the mirror was replaced, events before ``seq``
    were not delivered one by one).  ``own``: the event was caused by this
    client (its ``origin`` is one of this client's connection ids).
    ``missed``: events dropped from this stream's queue just before this one
    because the consumer fell behind (see :class:`EventStream`).
    """

    room: str
    seq: int
    name: str
    data: Any = None
    last_seq: int | None = None
    ts: int | None = None
    user_id: str | None = None
    origin: str | None = None
    temp_id: str | None = None
    own: bool = False
    missed: int = 0
    kind: Literal["event", "reload"] = "event"

    @property
    def end_seq(self) -> int:
        return self.seq if self.last_seq is None else self.last_seq


class EventStream:
    """A bounded queue of one room's events for one consumer.

    Overflow policy: **drop the oldest and count it**.  The client never
    waits for a consumer (that would stall the reader, heartbeats and call
    results of the whole connection); a consumer that falls more than
    ``max_queue`` events behind loses the oldest ones, and the next event it
    gets says how many it missed (``RoomEvent.missed``).  The room's
    :class:`Mirror` is unaffected: it is always complete.

    ``async for event in stream`` ends when the room is left or the client
    closes.  Use it as a context manager (or call :meth:`close`) to stop
    queueing when done early.
    """

    def __init__(self, client: Client, room: str, max_queue: int) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self.room = room
        self.max_queue = max_queue
        self._client = client
        self._queue: deque[RoomEvent] = deque()
        self._missed = 0
        self.missed_total = 0
        self._ended = False
        self._lot = trio.lowlevel.ParkingLot()

    def _push(self, event: RoomEvent) -> None:
        if self._ended:
            return
        if len(self._queue) >= self.max_queue:
            self._queue.popleft()
            self._missed += 1
            self.missed_total += 1
        self._queue.append(event)
        self._lot.unpark_all()

    def _end(self) -> None:
        self._ended = True
        self._lot.unpark_all()

    def close(self) -> None:
        """Stop queueing; the iteration ends after what is queued."""
        self._end()
        self._client._streams.get(self.room, set()).discard(self)

    def __len__(self) -> int:
        return len(self._queue)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> RoomEvent:
        while not self._queue:
            if self._ended:
                raise StopAsyncIteration
            await self._lot.park()
        event = self._queue.popleft()
        if self._missed:
            event = attrs.evolve(event, missed=event.missed + self._missed)
            self._missed = 0
        return event

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


# ----------------------------------------------------------------- services


class Service:
    """``client.service("tasks")``: the service's methods as calls."""

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name

    async def find(self, query: dict[str, Any] | None = None) -> Any:
        """``{"data": [...], "next_cursor": ...}``.  Retried after a reconnect."""
        return await self.client.call(self.name, "find", query=query or {})

    async def find_all(self, query: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Every page of ``find``, concatenated."""
        items: list[dict[str, Any]] = []
        base = dict(query or {})
        base.setdefault("$limit", 500)
        cursor: str | None = None
        while True:
            page = await self.find({**base, "$cursor": cursor} if cursor else base)
            items.extend(page.get("data", []))
            cursor = page.get("next_cursor")
            if not cursor:
                return items

    async def get(self, id: str) -> Any:
        return await self.client.call(self.name, "get", id=id)

    async def create(
        self,
        data: dict[str, Any],
        *,
        temp_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> Any:
        """Create; optimistic: the mirror of the room the new resource belongs
        to (if joined) shows it at once under ``temp_id`` (one is made when
        not given), replaced by the real one when the result or the event
        arrives, removed if the create fails.  ``idempotency_key``: see
        :meth:`Client.call`."""
        client = self.client
        temp_id = temp_id or client._new_temp_id()
        mirrors = client._optimistic_mirrors(self.name, data)
        for mirror in mirrors:
            mirror._put_optimistic(self.name, temp_id, data)
        try:
            row = await client.call(
                self.name, "create", data=data, temp_id=temp_id, idempotency_key=idempotency_key
            )
        except BaseException:
            for mirror in mirrors:
                mirror._settle(self.name, temp_id, None)
            raise
        for mirror in mirrors:
            mirror._settle(self.name, temp_id, row)
        return row

    async def update(
        self,
        id: str,
        data: dict[str, Any],
        *,
        base_rev: int | None = None,
        idempotency_key: str | None = None,
    ) -> Any:
        return await self.call(
            "update", id, data, base_rev=base_rev, idempotency_key=idempotency_key
        )

    async def patch(
        self,
        id: str,
        data: dict[str, Any],
        *,
        base_rev: int | None = None,
        idempotency_key: str | None = None,
    ) -> Any:
        return await self.call(
            "patch", id, data, base_rev=base_rev, idempotency_key=idempotency_key
        )

    async def remove(self, id: str, *, idempotency_key: str | None = None) -> Any:
        return await self.client.call(self.name, "remove", id=id, idempotency_key=idempotency_key)

    async def call(
        self,
        method: str,
        id: str | None = None,
        data: Any = None,
        *,
        query: dict[str, Any] | None = None,
        base_rev: int | None = None,
        idempotency_key: str | None = None,
    ) -> Any:
        """A custom method (``tasks.start``, ``messages.stream``...)."""
        return await self.client.call(
            self.name,
            method,
            id=id,
            data=data,
            query=query,
            base_rev=base_rev,
            idempotency_key=idempotency_key,
        )


Loader = Callable[["Client", str], Awaitable[Resources]]
"""Loads a room's resources (after a ``recovered: false`` join)."""


async def load_room(client: Client, room: str) -> Resources:
    """The default :data:`Loader`: ``session:<id>``: the session, its tasks and
    messages; ``board:<id>``: the board and its sessions.  (Tool calls have no
    service to load them from: after a reload they come from events only.)"""
    kind, _, ident = room.partition(":")

    async def get_or_none(service: str) -> dict[str, dict[str, Any]]:
        try:
            row = await client.service(service).get(ident)
        except CallError as exc:
            if exc.code == ErrorCode.NOT_FOUND.value:
                return {}
            raise
        return {ident: row}

    async def all_of(service: str, key: str) -> dict[str, dict[str, Any]]:
        rows = await client.service(service).find_all({key: ident})
        return {row["id"]: row for row in rows}

    if kind == "session":
        return {
            "sessions": await get_or_none("sessions"),
            "tasks": await all_of("tasks", "session_id"),
            "messages": await all_of("messages", "session_id"),
        }
    if kind == "board":
        return {
            "boards": await get_or_none("boards"),
            "sessions": await all_of("sessions", "board_id"),
        }
    return {}


# ------------------------------------------------------------------- pacing


RATE_LIMITED_RETRIES: Final = 3
"""A call refused with ``rate_limited`` was not run: it is sent again (after
the ``retry_after_ms`` the answer carries, or once the pacer's bucket
refilled from empty) up to this many times."""

RELOAD_RETRY_CODES: Final = frozenset(
    {
        ErrorCode.INTERNAL.value,
        ErrorCode.SERVER_ERROR.value,
        ErrorCode.GOING_AWAY.value,
        ErrorCode.TOO_MANY_PENDING.value,
        ErrorCode.RATE_LIMITED.value,
        "unavailable",
    }
)
"""Errors of a room's reload that say the server could not answer now: the
reload is tried again (after a backoff) instead of giving the room up."""

REJOIN_CODES: Final = frozenset(
    {
        ErrorCode.INTERNAL.value,
        ErrorCode.SERVER_ERROR.value,
        ErrorCode.RATE_LIMITED.value,
        "unavailable",
    }
)
"""A room's ``left`` with one of these says the server could not take the
client in now (its room could not start: the store away; a crash; too many
joins): the room stays wanted, its mirror kept, and it is joined again
after a backoff (from where the mirror stands), as a Phoenix channel
rejoins after an error, until :meth:`Client.leave`."""

RETRY_AFTER_MAX_S: Final = 10.0
"""The longest ``retry_after_ms`` honoured (a larger one waits this long)."""


def retry_after_s(data: Any) -> float:
    """The wait a ``rate_limited`` answer's ``error.data`` asks for, in
    seconds (0 when it names none), at most :data:`RETRY_AFTER_MAX_S`."""
    value = data.get("retry_after_ms") if isinstance(data, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        return 0.0
    return min(float(value) / 1000, RETRY_AFTER_MAX_S)


class Pacer:
    """Keeps this client's messages within the rate the server announced in
    ``welcome.limits`` (``rate_per_s``, ``rate_burst``), so that a program
    calling as fast as it likes is slowed down here instead of refused with
    ``rate_limited``.

    A token bucket (:class:`protocols.TokenBucket`) refilled at
    ``rate_per_s`` on the client's :class:`~agor_actors.world.Clock`, holding
    half the server's burst: the other half absorbs what the network does to
    the spacing (messages sent apart may arrive together).  It is full again
    at each welcome, as the server's bucket of a new connection is.

    Calls, joins and leaves wait for a token (:meth:`turn` keeps them in
    order, first come first served); what must go out at once (pings,
    resumes, the rejoin after a reconnect, presence that is not a cursor
    move) takes its tokens anyway (:meth:`spend`), leaving a debt the next
    waiters pay.  Bounded: one bucket, waiters wait on one FIFO lock.
    """

    def __init__(self, clock: Clock, limits: Limits | None = None) -> None:
        self._clock = clock
        self._lock = trio.Lock()  # FIFO: waiters are served in arrival order
        self._bucket: TokenBucket | None = None
        self.rate_per_s = 1.0
        self.burst = 1
        self.waited_s = 0.0
        """Total time calls spent waiting for a token."""
        self.adopt(limits or Limits())

    def adopt(self, limits: Limits) -> None:
        """A new connection with these limits: a full bucket."""
        self.rate_per_s = limits.rate_per_s
        self.burst = max(1, limits.rate_burst // 2)
        self._bucket = None  # full at the next look (the clock may not run yet)

    def _current(self) -> TokenBucket:
        """The bucket refilled up to now."""
        now = self._clock.now_s()
        bucket = self._bucket or TokenBucket.full(self.burst, now)
        _, refilled = bucket.take(now, rate_per_s=self.rate_per_s, burst=self.burst, n=0)
        return refilled

    def delay_s(self, n: int = 1) -> float:
        """Seconds until ``n`` tokens are there (0: now)."""
        bucket = self._current()
        return max(0.0, (min(n, self.burst) - bucket.tokens) / self.rate_per_s)

    def spend(self, n: int = 1) -> None:
        """Take ``n`` tokens now, into debt if need be.  Never blocks."""
        bucket = self._current()
        self._bucket = TokenBucket(bucket.tokens - n, bucket.updated_s)

    def penalize(self, retry_after_s: float = 0.0) -> None:
        """The server refused a message for the rate (its view of the rate
        was stricter than ours): empty the bucket, and further if the server
        said to retry after ``retry_after_s``, so that the next token comes
        no sooner."""
        bucket = self._current()
        tokens = min(bucket.tokens, 0.0, 1.0 - retry_after_s * self.rate_per_s)
        self._bucket = TokenBucket(tokens, bucket.updated_s)

    def turn(self) -> trio.Lock:
        """``async with pacer.turn():`` one paced sender at a time, in
        arrival order; inside, wait for :meth:`delay_s` to be 0, then
        :meth:`spend` and build the frame with no checkpoint in between."""
        return self._lock

    async def wait_for_token(self, n: int = 1) -> bool:
        """Sleep until ``n`` tokens are there; False if there was no need.
        A checkpoint only when it sleeps (cancelling it takes nothing)."""
        delay = self.delay_s(n)
        if delay <= 0:
            return False
        self.waited_s += delay
        await trio.sleep(delay)
        return True


# ------------------------------------------------------------------- client


@attrs.frozen
class ClientStatistics:
    connects: int
    reconnects: int
    dead_connections: int
    """Connections dropped by the heartbeat (nothing received in time)."""
    events_applied: int
    duplicates_dropped: int
    gaps: int
    resumes: int
    reloads: int
    pending_calls: int
    rooms: int
    rtt_s: float | None
    rate_limited: int = 0
    """Messages the server refused for the rate (calls among them are sent
    again, see :data:`RATE_LIMITED_RETRIES`)."""
    paced_s: float = 0.0
    """Total time calls, joins and leaves waited for the :class:`Pacer`."""


@attrs.define(eq=False)
class _Waiter:
    event: trio.Event = attrs.field(factory=trio.Event)
    result: Result | None = None
    ref: int = 0
    again: Call | None = None
    """A write under an idempotency key: what to send again, first, on the
    next connection if this one drops before its result comes."""
    resent: int = 0


class _Fatal(Exception):
    """The connection ended in a way that reconnecting cannot mend."""

    def __init__(self, error: CallError) -> None:
        super().__init__(error)
        self.error = error


class Client:
    """Made by :func:`connect`."""

    def __init__(
        self,
        url: str,
        *,
        token: str,
        codec: Codec,
        client_id: str | None,
        entropy: Entropy,
        clock: Clock,
        connect_timeout_s: float,
        call_timeout_s: float,
        backoff_base_s: float,
        backoff_cap_s: float,
        heartbeat: Heartbeat | None,
        events_queue_max: int,
        loader: Loader,
        read_retries: int,
        presence_rate_per_s: float = DEFAULT_RATE_PER_S,
        idempotent_writes: bool = True,
        write_retries: int = 3,
        refresh: Refresh | None = None,
        refresh_before_s: float = 60.0,
        wall: WallClock | None = None,
        dialer: Dialer | None = None,
        observer: ClientObserver | None = None,
    ) -> None:
        self.url = url
        self.observer = observer
        """Sees every frame and protocol event (see :class:`ClientObserver`)."""
        self.dialer: Dialer = dialer or WebSocketDialer(
            max_message_size=CLIENT_LIMITS.max_frame_bytes
        )
        """How connections are opened (the world's transport seam)."""
        self.refresh = refresh
        """Where a new access token comes from before this one expires."""
        self.refresh_before_s = refresh_before_s
        self.wall = wall or SystemWallClock()
        self.expires_at: int | None = None
        """When the current token expires (ms since the epoch), as welcome
        or the last ``auth`` said; None: it does not."""
        self.renewals = 0
        """Tokens renewed in band (``auth``) on an open connection."""
        self.codec = codec
        self.entropy = entropy
        self.clock = clock
        self.machine = ClientConnection(codec=codec, client_id=client_id)
        self.connect_timeout_s = connect_timeout_s
        self.call_timeout_s = call_timeout_s
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.events_queue_max = events_queue_max
        self.read_retries = read_retries
        self.idempotent_writes = idempotent_writes
        self.write_retries = write_retries
        """Whether writes get an idempotency key of their own (see :meth:`call`)."""
        self._token = token
        self._heartbeat_override = heartbeat
        self._loader = loader
        self.connection_id: str | None = None
        """The current connection's id (``None`` while disconnected)."""
        self.user_id: str | None = None
        self.welcome: Welcome | None = None
        self.own_connection_ids: set[str] = set()
        """Every connection id this client has had: events whose ``origin``
        is one of them are its own echoes."""
        self.rtt_s: float | None = None
        self.close_reason: TransportClosed | None = None
        """How the last connection that was closed ended (its ``code`` and
        ``reason``: those of the close frame, 1006 without one)."""
        self._connection_close: TransportClosed | None = None
        self._ws: MessageTransport | None = None
        self._open = trio.Event()
        self._welcomed = trio.Event()
        self._closed = False
        self._fatal: CallError | None = None
        self._online = True
        self._wake = trio.Event()
        self._gone = trio.Event()
        self._was_welcomed = False
        self._first_started = False
        """``connect``'s start was told the first connection was welcomed."""
        self._connection_scope: trio.CancelScope | None = None
        self._serve_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._waiters: dict[int, _Waiter] = {}
        self._resends: list[_Waiter] = []
        """Writes under an idempotency key whose connection dropped before
        their result came, in the order they were sent: sent again on the
        next connection before anything else (bounded by the pending calls
        of the connection they were sent on)."""
        self._slots = trio.lowlevel.ParkingLot()
        self._mirrors: dict[str, Mirror] = {}
        self._handing: set[str] = set()
        """Rooms whose join waits for an open connection to be sent (at most
        one task each; bounded by the rooms joined)."""
        self._rejoining: dict[str, int] = {}
        """Rooms the server let go for now (see :data:`REJOIN_CODES`), with
        the attempts so far (their join waits in ``_handing``)."""
        self._reloads: dict[str, trio.CancelScope] = {}
        self._streams: dict[str, set[EventStream]] = {}
        self._services: dict[str, Service] = {}
        self._temp_counter = 0
        self.pacer = Pacer(clock)
        """Paces calls, joins and leaves to the server's announced rate."""
        self._rate_limited = 0
        self._connects = 0
        self._dead = 0
        if not presence_rate_per_s > 0:
            raise ValueError("presence_rate_per_s must be positive")
        self.presence_rate_per_s = presence_rate_per_s
        """The most presence updates per second this client sends (lowered
        to the server's ``presence_rate_per_s`` if that is less)."""
        self._boards: dict[str, BoardPresence] = {}
        self._cursor_senders: dict[str, CursorSender] = {}
        self._presence_out: PresenceSender | None = None
        self._restore_due: str | None = None

    # -------------------------------------------------------------- public

    @property
    def connected(self) -> bool:
        return self._open.is_set() and self._ws is not None

    @property
    def closed(self) -> bool:
        return self._closed

    def service(self, name: str) -> Service:
        service = self._services.get(name)
        if service is None:
            service = self._services[name] = Service(self, name)
        return service

    def mirror(self, room: str) -> Mirror | None:
        """The mirror of a joined (or joining) room."""
        return self._mirrors.get(room)

    async def wait_connected(self) -> None:
        """Wait until a connection is open (welcomed).  Raises
        :class:`ClientClosed` if the client closes meanwhile."""
        while True:
            self._check_usable()
            if self._open.is_set():
                return
            await self._open.wait()

    async def call(
        self,
        service: str,
        method: str,
        *,
        id: str | None = None,
        data: Any = None,
        query: dict[str, Any] | None = None,
        temp_id: str | None = None,
        base_rev: int | None = None,
        idempotency_key: str | None = None,
    ) -> Any:
        """One call; returns the result's data or raises :class:`CallError`
        (:class:`ConnectionLost` if the connection dropped meanwhile and the
        call may have run).  Waits for a connection and for a free slot (the
        server bounds pending calls) up to ``call_timeout_s``.  Cancelling
        it forgets the result (the call may still run).

        A call whose connection dropped before its result came is sent
        again on the next connection if it can run only once: a read (up to
        ``read_retries`` times), or a write under an ``idempotency_key`` (up
        to ``write_retries`` times, also after an ``unavailable`` answer:
        the store may have failed after the commit; after a backoff)
        (the server answers a write sent again under its key with the first
        one's result, marked ``_replayed``, and runs it once).  With
        ``idempotent_writes`` (the default) every write of ``sessions``,
        ``tasks``, ``messages`` and ``boards`` gets a key of its own, but
        ``messages.stream`` (a chunk that names its offset is written once
        already: see :meth:`message_writer`)."""
        key = idempotency_key
        if key is None and self.idempotent_writes and _keyed_by_default(service, method):
            key = self._new_key()
        if method in _READ_METHODS:
            retries = self.read_retries
        else:
            retries = 0 if key is None else self.write_retries
        rate_retries = RATE_LIMITED_RETRIES
        with trio.fail_after(self.call_timeout_s):
            while True:
                try:
                    return await self._call_once(
                        service, method, id, data, query, temp_id, base_rev, key
                    )
                except ConnectionLost:
                    if retries <= 0 or method not in _READ_METHODS:
                        raise  # a keyed write was sent again by the connection
                    retries -= 1
                except CallError as exc:
                    if exc.code == "unavailable" and key is not None:
                        # the store failed, maybe after the commit: a keyed
                        # write is sent again after a pause, and runs once
                        if retries <= 0:
                            raise
                        attempt = self.write_retries - retries
                        retries -= 1
                        await trio.sleep(
                            backoff_s(
                                attempt,
                                self.entropy.random(),
                                self.backoff_base_s,
                                self.backoff_cap_s,
                            )
                        )
                        continue
                    # refused before it ran: slow down and send it again
                    if exc.code != ErrorCode.RATE_LIMITED.value:
                        raise
                    self._rate_limited += 1
                    if rate_retries <= 0:
                        raise
                    rate_retries -= 1
                    self.pacer.penalize(retry_after_s(exc.data))

    async def _call_once(
        self,
        service: str,
        method: str,
        id: str | None,
        data: Any,
        query: dict[str, Any] | None,
        temp_id: str | None,
        base_rev: int | None,
        idempotency_key: str | None,
    ) -> Any:
        async with self.pacer.turn():
            while True:
                await self.wait_connected()
                if self.machine.state is not ClientState.OPEN or self._token_expired():
                    # this connection is closing (or will be, for its token)
                    await self._gone.wait()
                    continue
                if not self.machine.can_call:
                    await self._slots.park()
                    continue
                if await self.pacer.wait_for_token():
                    continue  # the connection may have changed meanwhile
                break
            try:
                ref, frame = self.machine.call(
                    service,
                    method,
                    id=id,
                    data=data,
                    query=query,
                    temp_id=temp_id,
                    base_rev=base_rev,
                    idempotency_key=idempotency_key,
                )
            except LocalProtocolError as exc:
                raise CallError(
                    (exc.code or ErrorCode.INVALID_FIELD).value, f"cannot send the call: {exc}"
                ) from None
            self.pacer.spend()
        again = None
        if idempotency_key is not None and method not in _READ_METHODS:
            pending = self.machine.pending_calls.get(ref)
            again = pending if isinstance(pending, Call) else None
        result = await self._result_of(ref, frame, again)
        if result.ok:
            return result.data
        error = result.error
        assert error is not None
        if error.code == ErrorCode.CONNECTION_LOST.value:
            raise ConnectionLost()
        if error.code == "closed":
            raise ClientClosed(error.message)
        raise CallError(error.code, error.message, error.data)

    async def join(self, room: str) -> Mirror:
        """Join ``room`` and return its mirror once loaded.  Raises
        :class:`CallError` if the server refuses (the code of its ``left``:
        ``forbidden``, ``not_found``...), ``trio.TooSlowError`` if it is not
        loaded within ``call_timeout_s``: the room stays wanted all the same
        (joined once a connection opens, and again after every drop) until
        :meth:`leave`.  A refusal that says the server cannot take the room
        now (:data:`REJOIN_CODES`: ``unavailable``...) is not raised: the
        join is sent again after a backoff, here as for a room joined long
        ago, until it is taken, the timeout, or :meth:`leave`."""
        mirror = self._mirrors.get(room)
        if mirror is None or mirror.left_reason is not None:
            mirror = self._mirrors[room] = Mirror(room)
        track = self.machine.rooms.get(room)
        needs = (track is None or track.status is RoomStatus.LEAVING) and room not in self._handing
        handed = not needs

        def make() -> WireFrame:
            nonlocal handed
            frame = self.machine.join(room)
            handed = True  # the machine has the room now: it rejoins it after drops
            return frame

        try:
            with trio.fail_after(self.call_timeout_s):
                if needs:
                    self._handing.add(room)
                    try:
                        await self._send_when_open(make)
                    finally:
                        self._handing.discard(room)
                await mirror.ready.wait()
        except trio.TooSlowError:
            if not handed and room not in self._handing:
                # no connection opened in time: the join is sent once one
                # does, by a task of the client's own (the room stays wanted
                # until left), as a Phoenix channel keeps rejoining
                assert self._nursery is not None
                self._handing.add(room)
                self._nursery.start_soon(self._hand_join, room)
            raise
        if mirror.left_reason is not None:
            why = f": {mirror.left_message}" if mirror.left_message else ""
            raise CallError(mirror.left_reason, f"could not join {room}{why}")
        return mirror

    async def _hand_join(self, room: str, delay_s: float = 0.0) -> None:
        """Send ``room``'s join once a connection is open (after ``delay_s``),
        unless the room is no longer wanted by then (left, or joined again
        meanwhile); from where its mirror stands if that is loaded (a room
        the server let go for now: see :data:`REJOIN_CODES`)."""

        def wanted() -> bool:
            mirror = self._mirrors.get(room)
            return (
                mirror is not None and mirror.left_reason is None and room not in self.machine.rooms
            )

        def make() -> WireFrame:
            mirror = self._mirrors[room]
            since = None
            if mirror.ready.is_set() and not mirror.reloading and mirror.epoch is not None:
                since = Since(mirror.epoch, mirror.seq)
            return self.machine.join(room, since)

        try:
            if delay_s:
                await trio.sleep(delay_s)
            await self._send_when_open(make, wanted=wanted)
        except ClientClosed:
            pass
        except CallError as exc:  # refused before sending: an invalid room, too many
            mirror = self._mirrors.get(room)
            if mirror is not None:
                mirror._left(exc.code, exc.message)
        finally:
            self._handing.discard(room)
            if room not in self.machine.rooms:
                self._rejoining.pop(room, None)

    async def leave(self, room: str) -> None:
        """Leave ``room``: its mirror is dropped and its streams end."""
        mirror = self._mirrors.pop(room, None)
        if mirror is not None and mirror.left_reason is None:
            mirror._left("left")
        board = self._boards.get(room.removeprefix("board:")) if room.startswith("board:") else None
        if board is not None:
            board._left("left")
        self._end_streams(room)
        self._cancel_reload(room)
        track = self.machine.rooms.get(room)
        if track is not None and track.status is not RoomStatus.LEAVING:
            with trio.fail_after(self.call_timeout_s):
                await self._send_when_open(lambda: self.machine.leave(room))

    def events(self, room: str, *, max_queue: int | None = None) -> EventStream:
        """The room's events from now on (join the room to get any); see
        :class:`EventStream` for the overflow policy."""
        stream = EventStream(self, room, max_queue or self.events_queue_max)
        self._streams.setdefault(room, set()).add(stream)
        return stream

    # ------------------------------------------------------------ presence

    def message_writer(self, session_id: str, message_id: str, length: int = 0) -> MessageWriter:
        """A writer of ``message_id``'s chunks that lands each once, in
        order, across lost connections and daemons (each chunk names its
        offset: ``length``, the message's length now, for the first)."""
        return MessageWriter(self, session_id, message_id, length)

    async def board_presence(self, board_id: str, *, announce: bool = True) -> BoardPresence:
        """Join ``board:<board_id>`` (unless joined) and return the board's
        presence as this client sees it (the same object every time; kept up
        to date across reconnects).

        ``announce``: show this client on the board (its user enters the
        facepile) and ask for the board's whole presence at once; without it
        the client only watches, and gets the board's presence with the next
        change there."""
        self._check_usable()
        board = self._board(board_id)
        await self.join(board.room)
        if announce:
            await self.set_presence(board_id, hide_cursors=board.hiding_cursors)
        return board

    async def set_presence(
        self,
        board_id: str,
        *,
        view: str | None = None,
        typing: bool | None = None,
        viewport: Viewport | None = None,
        hide_cursors: bool | None = None,
        follow: str | None = None,
        cursor: tuple[float, float] | None = None,
    ) -> bool:
        """Send this client's presence on a board: ``None`` leaves a field
        unchanged; ``follow=""`` stops following.  The server shows a
        connection on one board at a time (the board of its latest update).

        Updates are merged with pending ones and throttled with the cursor
        (at most ``presence_rate_per_s`` per second in all).  Returns True
        once the update is written to the connection, or superseded by an
        update for another board (what was still pending for this one is
        not sent: the server would show the connection back here), False
        when the client is not connected (it goes out after the reconnect).  The view,
        viewport, hidden cursors and followed user are sent again after every
        reconnect."""
        self._check_usable()
        sender = self._presence_sender()
        version = sender.update(  # raises TypeError for a wrong value
            board_id,
            view=view,
            typing=typing,
            viewport=viewport,
            hide_cursors=hide_cursors,
            follow=follow,
            cursor=cursor,
        )
        board = self._boards.get(board_id)
        if board is not None:
            board._asked(hide_cursors=hide_cursors, follow=follow)
        if not self.connected:
            return False
        return await sender.wait_sent(board_id, version)

    def cursor_sender(self, board_id: str) -> CursorSender:
        """This client's cursor on a board: ``move(x, y)`` never blocks; at
        most ``presence_rate_per_s`` updates a second go out, each with the
        newest position, the last one always."""
        self._check_usable()
        sender = self._cursor_senders.get(board_id)
        if sender is None:
            sender = self._cursor_senders[board_id] = CursorSender(
                self._presence_sender(), board_id
            )
        return sender

    def activity(self, board_id: str) -> Activity:
        """The activity log of a board: pages (``find``) and the live feed."""
        return Activity(self, board_id)

    @property
    def presence_sender(self) -> PresenceSender | None:
        """The sender of this client's presence (None before any)."""
        return self._presence_out

    async def disconnect(self) -> None:
        """Drop the connection and stay offline until :meth:`reconnect`
        (the rooms are rejoined with ``since`` then)."""
        self._online = False
        gone = self._gone
        if self._connection_scope is not None:
            self._connection_scope.cancel()
            await gone.wait()

    def reconnect(self) -> None:
        """Go back online after :meth:`disconnect`, or skip the backoff wait
        of a reconnect in progress."""
        self._online = True
        self._wake.set()

    async def aclose(self) -> None:
        """Close the connection (1000) and stop; pending calls raise
        :class:`ClientClosed`, streams end.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._fail_waiters("closed", "the client is closed")
        if self._presence_out is not None:
            self._presence_out.interrupt()
        self._open.set()  # wake whoever waits for a connection: they raise
        self._wake.set()
        serving = self._serve_scope
        if serving is not None:
            # End the connection's tasks; the transport then closes with 1000
            # (its reader still runs, so the close handshake completes).
            if self.machine.state is ClientState.OPEN:
                self.machine.close()
            gone = self._gone
            serving.cancel()
            with trio.move_on_after(3.0):
                await gone.wait()
        for room in list(self._streams):
            self._end_streams(room)
        for mirror in self._mirrors.values():
            mirror.ready.set()
        for board in self._boards.values():
            board._left("closed")
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def statistics(self) -> ClientStatistics:
        stats = self.machine.statistics()
        return ClientStatistics(
            connects=self._connects,
            reconnects=max(0, self._connects - 1),
            dead_connections=self._dead,
            events_applied=stats.events_applied,
            duplicates_dropped=stats.duplicates_dropped,
            gaps=stats.gaps,
            resumes=stats.resumes,
            reloads=stats.reloads,
            pending_calls=stats.pending_calls,
            rooms=stats.rooms,
            rtt_s=self.rtt_s,
            rate_limited=self._rate_limited,
            paced_s=self.pacer.waited_s,
        )

    # ---------------------------------------------------------- internals

    def _check_usable(self) -> None:
        fatal = self._fatal
        if fatal is not None:
            raise CallError(fatal.code, fatal.message, fatal.data)
        if self._closed:
            raise ClientClosed()

    def _new_temp_id(self) -> str:
        self._temp_counter += 1
        return f"temp-{self.entropy.randrange(1 << 48):012x}-{self._temp_counter}"

    def _new_key(self) -> str:
        """An idempotency key of this client's: unique among its user's
        writes (64 random bits, and a count)."""
        self._temp_counter += 1
        return f"key-{self.entropy.randrange(1 << 64):016x}-{self._temp_counter}"

    def _optimistic_mirrors(self, service: str, data: Any) -> list[Mirror]:
        spec = _OPTIMISTIC_ROOMS.get(service)
        if spec is None or not isinstance(data, dict):
            return []
        kind, field = spec
        ident = data.get(field)
        if not isinstance(ident, str):
            return []
        mirror = self._mirrors.get(f"{kind}:{ident}")
        return [] if mirror is None or mirror.left_reason is not None else [mirror]

    async def _send(self, frame: WireFrame) -> None:
        """The one write path.  Raises :class:`ConnectionLost` for any
        transport failure (the reader notices the loss and the reconnect
        loop takes over)."""
        ws = self._ws
        if ws is None:
            raise ConnectionLost("not connected")
        try:
            await ws.send(frame)
        except TransportClosed as exc:
            raise ConnectionLost(f"send failed: {exc.code} {exc.reason}".rstrip()) from None

    async def _send_when_open(
        self, make_frame: Callable[[], WireFrame], *, wanted: Callable[[], bool] | None = None
    ) -> None:
        """Build a frame with the machine once a connection is open, and send
        it; rebuilt after a drop (the machine refuses sends while
        disconnected).  ``wanted``: asked just before building; False: send
        nothing."""
        async with self.pacer.turn():
            while True:
                await self.wait_connected()
                if self.machine.state is ClientState.OPEN and await self.pacer.wait_for_token():
                    continue  # the connection may have changed meanwhile
                if wanted is not None and not wanted():
                    return
                try:
                    frame = make_frame()
                except LocalProtocolError as exc:
                    if self.machine.state is not ClientState.OPEN:
                        await self._gone.wait()  # this connection is closing
                        continue
                    raise CallError((exc.code or ErrorCode.INVALID_FIELD).value, str(exc)) from None
                self.pacer.spend()
                break
        # On a loss the machine rejoins the room after the reconnect.
        with contextlib.suppress(ConnectionLost):
            await self._send(frame)

    def _board(self, board_id: str) -> BoardPresence:
        board = self._boards.get(board_id)
        if board is None:
            board = self._boards[board_id] = BoardPresence(board_id)
            if self._presence_out is not None:  # what this client asked before
                remembered = self._presence_out.remembered(board_id)
                follow = remembered.get("follow")
                board._asked(
                    hide_cursors=remembered.get("hide_cursors"),
                    follow=follow if isinstance(follow, str) else None,
                )
        return board

    def _presence_sender(self) -> PresenceSender:
        sender = self._presence_out
        if sender is None:
            sender = self._presence_out = PresenceSender(
                self._send_presence, rate_per_s=self._presence_rate(), clock=self.clock
            )
            assert self._nursery is not None
            self._nursery.start_soon(self._run_presence, sender)
        return sender

    def _presence_rate(self) -> float:
        return min(self.presence_rate_per_s, self.machine.server_limits.presence_rate_per_s)

    async def _run_presence(self, sender: PresenceSender) -> None:
        with contextlib.suppress(CallError):  # the client closed, or was refused
            await sender.run()

    async def _send_presence(self, update: PresenceUpdate) -> bool:
        """The :class:`PresenceSender`'s way out: waits for a connection;
        False when the connection is lost (the sender tries again)."""
        while True:
            await self.wait_connected()
            if self.machine.state is not ClientState.OPEN:
                await self._gone.wait()  # this connection is closing
                continue
            try:
                frame = self.machine.presence(update)
            except LocalProtocolError as exc:
                log.warning("presence update not sent: %s", exc)
                return True  # it never could be
            if not _cursor_only(update):
                self.pacer.spend()  # the server counts it against the general rate
            try:
                await self._send(frame)
            except ConnectionLost:
                return False
            return True

    def _presence_welcomed(self) -> None:
        """A new connection: the server knows nothing of this client's
        presence.  The current board's is sent again once its room is
        rejoined (so that the server's answer, the whole presence of the
        board, reaches this connection), or at once when it is not joined."""
        sender = self._presence_out
        self._restore_due = None
        if sender is None:
            return
        sender.rate_per_s = self._presence_rate()
        board = sender.current_board
        if board is None:
            return
        track = self.machine.rooms.get(f"board:{board}")
        if track is not None and track.status is not RoomStatus.LEAVING:
            self._restore_due = board
        else:
            sender.restore(board)

    def _presence_rejoined(self, room: str) -> None:
        board = self._boards.get(room.removeprefix("board:")) if room.startswith("board:") else None
        if board is not None and board.left_reason is not None and room in self.machine.rooms:
            board._rejoined()
        due = self._restore_due
        sender = self._presence_out
        if due is not None and room == f"board:{due}" and sender is not None:
            self._restore_due = None
            if sender.current_board == due:
                # (not if the client moved to another board, or to none,
                # while the room was being rejoined: restoring would put it
                # back on this one)
                sender.restore(due)

    def _rejoin_later(self, room: str) -> bool:
        """The server let ``room`` go for now: if it is still wanted (its
        mirror not left), keep the mirror and join again after a backoff.
        Returns False if it is not wanted (the caller ends it)."""
        mirror = self._mirrors.get(room)
        if mirror is None or mirror.left_reason is not None or self._nursery is None:
            return False
        self._cancel_reload(room)  # (a reload's resources would be stale)
        attempt = self._rejoining.get(room)
        attempt = self._rejoining[room] = 0 if attempt is None else attempt + 1
        if room not in self._handing:  # (else a join is on its way already)
            self._handing.add(room)
            delay_s = backoff_s(
                attempt, self.entropy.random(), self.backoff_base_s, self.backoff_cap_s
            )
            self._nursery.start_soon(self._hand_join, room, delay_s)
        if room.startswith("board:"):
            self._presence_rejoined(room)  # not joined: send it anyway
        return True

    def _fail_waiters(self, code: str, message: str) -> None:
        resends, self._resends = self._resends, []
        for waiter in [*self._waiters.values(), *resends]:
            if waiter.result is None:
                waiter.result = Result(0, False, error=ErrorInfo(code, message))
                waiter.event.set()
        self._slots.unpark_all()

    def _end_streams(self, room: str) -> None:
        for stream in self._streams.pop(room, set()):
            stream._end()

    def _cancel_reload(self, room: str) -> None:
        scope = self._reloads.pop(room, None)
        if scope is not None:
            scope.cancel()

    # --------------------------------------------------------- connection

    async def _run(self, retry_first: bool, task_status: trio.TaskStatus[CallError | None]) -> None:
        """Connect, serve the connection, reconnect after a loss; until
        closed.  ``task_status.started`` once the first connection is
        welcomed (``None``) or failed (the error, then this returns); at
        once with ``retry_first`` (a failed first connection is then tried
        again like any other)."""
        attempt = 0
        first = not retry_first
        if retry_first:
            task_status.started(None)
        while not self._closed:
            if not self._wants_connection():
                self._wake = trio.Event()
                await self._wake.wait()
                attempt = 0
                continue
            try:
                welcomed = await self._connection(task_status if first else None)
                error = None if welcomed else self._early_close_error()
            except _Fatal as exc:
                self._fatal = exc.error
                self._fail_waiters(exc.error.code, exc.error.message)
                self._open.set()  # waiters raise the error
                if first and not self._first_started:
                    task_status.started(exc.error)
                else:
                    log.error("connection refused for good: %s", exc.error)
                return
            except (DialFailed, TransportClosed) as exc:
                welcomed = False
                error = _connect_error(self.url, exc)
            if welcomed:
                first = False
                attempt = 0
                closed = self._connection_close
                if closed is not None and closed.code == TOKEN_EXPIRED_CLOSE:
                    await self._refresh_token()  # else the old token is refused: fatal
            elif first:
                assert error is not None
                task_status.started(error)
                return
            else:
                log.info("connecting to %s failed: %s", self.url, error)
            if not self._wants_connection():
                continue
            delay = backoff_s(
                attempt, self.entropy.random(), self.backoff_base_s, self.backoff_cap_s
            )
            attempt += 1
            self._wake = trio.Event()
            with trio.move_on_after(delay):
                await self._wake.wait()

    def _token_expired(self) -> bool:
        expires_at = self.expires_at
        return expires_at is not None and self.wall.now_ms() >= expires_at

    async def _refresh_token(self) -> bool:
        """A new token from :attr:`refresh` (kept for the next hello); False
        (logged) if there is no way to get one or it failed."""
        if self.refresh is None:
            return False
        try:
            token = await self.refresh()
        except Exception as exc:
            log.warning("refreshing the token failed: %s", exc)
            return False
        self._token = token
        return True

    async def _renewer(self) -> None:
        """Renew the token in band a little before it expires: refresh, then
        ``auth`` on this connection.  If that fails, the server closes the
        connection at expiry (4002) and the reconnect refreshes."""
        while self.expires_at is not None and self.refresh is not None:
            left_s = (self.expires_at - self.wall.now_ms()) / 1000
            margin_s = min(self.refresh_before_s, max(0.0, left_s) / 2)
            await trio.sleep(max(0.0, left_s - margin_s))
            if not await self._refresh_token():
                return
            try:
                result = await self._auth(self._token)
            except CallError as exc:
                log.warning("the server refused the renewed token: %s", exc)
                return
            expires_at = result.get("expires_at") if isinstance(result, dict) else None
            self.expires_at = expires_at if isinstance(expires_at, int) else None
            self.renewals += 1

    async def _result_of(self, ref: int, frame: WireFrame, again: Call | None = None) -> Result:
        """Send ``frame`` (the call or auth ``ref``) and wait for its result
        (a ``connection_lost`` one if the connection drops meanwhile, but
        for a write under an idempotency key, ``again``: it is sent again on
        the next connections, up to ``write_retries`` times)."""
        waiter = self._waiters[ref] = _Waiter(ref=ref, again=again)
        sent = False
        try:
            await self._send(frame)
            sent = True
            await waiter.event.wait()
        finally:
            self._waiters.pop(waiter.ref, None)
            if waiter in self._resends:
                self._resends.remove(waiter)  # cancelled while it waited to go again
            if not sent:
                # cancelled (or failed) before the frame went out: nothing
                # will answer it, so it must not hold a pending slot
                self.machine.unsent(ref)
        assert waiter.result is not None
        return waiter.result

    async def _auth(self, token: str) -> Any:
        """Send ``auth`` on the open connection; its result's data."""
        ref, frame = self.machine.auth(token)
        result = await self._result_of(ref, frame)
        if not result.ok:
            assert result.error is not None
            raise CallError(result.error.code, result.error.message)
        return result.data

    def _wants_connection(self) -> bool:
        return self._online and not self._closed

    def _early_close_error(self) -> CallError:
        reason = self._connection_close
        if reason is None:
            return CallError("unavailable", "no welcome from the server in time")
        return CallError("unavailable", f"closed before welcome: {reason.code} {reason.reason}")

    async def _connection(self, task_status: trio.TaskStatus[CallError | None] | None) -> bool:
        """One connection, from the handshake until it is lost.  Returns
        whether it was welcomed; raises :class:`_Fatal` when reconnecting
        cannot help."""
        self._was_welcomed = False
        self._connection_close = None
        self._gone = trio.Event()
        try:
            with trio.CancelScope() as scope:
                self._connection_scope = scope
                async with self.dialer.dial(
                    self.url,
                    subprotocols=[self.codec.subprotocol],
                    connect_timeout_s=self.connect_timeout_s,
                ) as ws:
                    if ws.subprotocol != self.codec.subprotocol:
                        raise _Fatal(
                            CallError(
                                ErrorCode.UNSUPPORTED_PROTOCOL.value,
                                f"the server chose subprotocol {ws.subprotocol!r}",
                            )
                        )
                    await self._serve(ws, scope, task_status)
                fatal = self._fatal_close()
                if fatal is not None:
                    raise _Fatal(fatal)
        finally:
            self._connection_scope = None
            self._gone.set()
        return self._was_welcomed

    async def _serve(
        self,
        ws: MessageTransport,
        connection_scope: trio.CancelScope,
        task_status: trio.TaskStatus[CallError | None] | None,
    ) -> None:
        """Handshake, rejoin, then read and heartbeat until the connection
        ends; sets ``_was_welcomed``."""
        self._ws = ws
        self._welcomed = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                self._serve_scope = nursery.cancel_scope
                nursery.start_soon(self._reader, ws, nursery.cancel_scope)
                with contextlib.suppress(ConnectionLost):
                    await self._send(self.machine.hello(self._token))
                with trio.move_on_after(self.connect_timeout_s):
                    await self._welcomed.wait()
                if not self._welcomed.is_set():
                    nursery.cancel_scope.cancel()
                else:
                    self._was_welcomed = True
                    self._connects += 1
                    with contextlib.suppress(ConnectionLost):
                        await self._rejoin()
                        await self._resend()
                    self._open.set()
                    self._slots.unpark_all()
                    if task_status is not None:
                        task_status.started(None)
                        self._first_started = True
                    nursery.start_soon(self._heartbeat, connection_scope)
                    nursery.start_soon(self._renewer)
        finally:
            self._serve_scope = None
            self._lost()

    def _fatal_close(self) -> CallError | None:
        reason = self._connection_close
        if reason is not None and reason.code in FATAL_CLOSE_CODES:
            code = ErrorCode.UNAUTHORIZED.value
            # the close reason is "<code>: <message>": the message alone
            message = (reason.reason or "").removeprefix(f"{code}: ") or "token refused"
            return CallError(code, f"{message} (the server at {self.url} refused the token)")
        return None

    def _lost(self) -> None:
        """The connection is gone: calls in flight fail, rooms wait to be
        rejoined."""
        self._ws = None
        self.connection_id = None
        if self._open.is_set() and not self._closed and self._fatal is None:
            self._open = trio.Event()
        if self.machine.state is not ClientState.DISCONNECTED:
            for event in self.machine.connection_lost():
                if self.observer is not None:
                    self.observer.protocol_event(event)
                self._dispatch_sync(event)
        if self._presence_out is not None:
            self._presence_out.interrupt()
        self._slots.unpark_all()

    async def _rejoin(self) -> None:
        joins = self.machine.rejoin_all()
        batch = max(1, self.machine.server_limits.max_batch)
        for start in range(0, len(joins), batch):
            part = joins[start : start + batch]
            self.pacer.spend(len(part))  # at once: the rooms wait for it
            await self._send(self.machine.send(part))

    async def _resend(self) -> None:
        """Send again the keyed writes the last connection lost, in the
        order they were first sent, before any other call goes out (a write
        pipelined after another lands after it); each is answered as the
        first was if that one ran (see :meth:`call`)."""
        while self._resends:
            waiter = self._resends.pop(0)
            again = waiter.again
            if waiter.result is not None or again is None:
                continue
            try:
                ref, frame = self.machine.send_call(again)
            except LocalProtocolError as exc:  # more than the pending calls the server allows
                waiter.result = Result(0, False, error=ErrorInfo("connection_lost", str(exc)))
                waiter.event.set()
                continue
            waiter.ref, waiter.resent = ref, waiter.resent + 1
            self._waiters[ref] = waiter
            self.pacer.spend()  # at once, as the rejoin
            await self._send(frame)

    async def _reader(self, ws: MessageTransport, scope: trio.CancelScope) -> None:
        """The one reader: frames into the machine, its events dispatched."""
        self._connection_close = None
        try:
            observer = self.observer
            while True:
                data = await ws.receive()
                if observer is not None:
                    observer.frame_received(data)
                for event in self.machine.receive_data(data, self.clock.now_s()):
                    if observer is not None:
                        observer.protocol_event(event)
                    await self._dispatch(ws, event)
        except TransportClosed as exc:
            self.close_reason = self._connection_close = exc
        finally:
            scope.cancel()

    async def _heartbeat(self, scope: trio.CancelScope) -> None:
        """Ping as asked; drop the connection (abruptly: ``scope`` is the
        connection's) when nothing arrives in time."""
        welcome = self.welcome
        heartbeat = self._heartbeat_override or Heartbeat.from_heartbeat_ms(
            welcome.heartbeat_ms if welcome is not None else 15_000
        )
        opened_s = self.clock.now_s()
        while True:
            now = self.clock.now_s()
            last_received = max(self.machine.last_received_s or opened_s, opened_s)
            last_ping = max(self.machine.last_ping_s or opened_s, opened_s)
            action = heartbeat.decide(now, last_received_s=last_received, last_ping_s=last_ping)
            if action is HeartbeatAction.DEAD:
                self._dead += 1
                log.warning(
                    "nothing received for %.1f s: dropping the connection", now - last_received
                )
                scope.cancel()
                return
            if action is HeartbeatAction.PING:
                if self.machine.state is not ClientState.OPEN:
                    return  # closing: the reader ends the connection
                self.pacer.spend()  # at once: the connection's life depends on it
                # a peer that stopped reading leaves the send waiting (a
                # full socket, the send lock behind a blocked send): bounded
                # by when the connection counts as dead, which the next turn
                # then finds
                with (
                    contextlib.suppress(ConnectionLost),
                    trio.move_on_at(last_received + heartbeat.timeout_s),
                ):
                    await self._send(self.machine.ping(now))
                continue
            deadline = heartbeat.next_check_s(last_received_s=last_received, last_ping_s=last_ping)
            # at least a microsecond: ``decide`` compares ``now - last`` with
            # the interval and ``next_check_s`` adds them, and float rounding
            # can still say WAIT at that instant (a busy loop on a mock clock)
            await trio.sleep(max(1e-6, deadline - now))

    # ------------------------------------------------------------ dispatch

    async def _dispatch(self, ws: MessageTransport, event: ClientEvent) -> None:
        if isinstance(event, ResumeRequested):
            self.pacer.spend()  # at once: the reader must not wait
            with contextlib.suppress(ConnectionLost):
                await self._send(event.data)
        elif isinstance(event, ProtocolViolation):
            log.warning("protocol violation by the server: %s", event.error)
            if event.close_code is not None:
                with trio.move_on_after(2.0):
                    await ws.close(int(event.close_code), event.error.close_reason)
        else:
            self._dispatch_sync(event)

    def _dispatch_sync(self, event: ClientEvent) -> None:
        if isinstance(event, EventApplied):
            self._on_event(event.event)
        elif isinstance(event, CallResult):
            result = event.result
            waiter = self._waiters.get(result.ref)
            if waiter is not None and waiter.result is None:
                error = result.error
                lost = error is not None and error.code == ErrorCode.CONNECTION_LOST.value
                if lost and waiter.again is not None and waiter.resent < self.write_retries:
                    # sent again first thing on the next connection, in order
                    del self._waiters[result.ref]
                    self._resends.append(waiter)
                else:
                    waiter.result = result
                    waiter.event.set()
            self._slots.unpark_all()
        elif isinstance(event, Welcomed):
            welcome = event.welcome
            self.welcome = welcome
            self.connection_id = welcome.connection_id
            self.user_id = welcome.user_id
            self.expires_at = welcome.expires_at
            self.own_connection_ids.add(welcome.connection_id)
            self.pacer.adopt(self.machine.server_limits)
            self._presence_welcomed()
            self._welcomed.set()
        elif isinstance(event, RoomJoined):
            self._rejoining.pop(event.room, None)
            mirror = self._mirrors.get(event.room)
            if mirror is None:
                mirror = self._mirrors[event.room] = Mirror(event.room)
            mirror._joined(event.epoch, event.seq)
            if event.recovered and not mirror.reloading:
                mirror.ready.set()
            self._presence_rejoined(event.room)
        elif isinstance(event, ReloadRequired):
            self._start_reload(event)
        elif isinstance(event, RoomLeft):
            if event.reason == ErrorCode.RATE_LIMITED.value:
                self._rate_limited += 1
            if event.reason in REJOIN_CODES and self._rejoin_later(event.room):
                return
            mirror = self._mirrors.pop(event.room, None)
            if mirror is not None:
                mirror._left(event.reason, event.message)
            self._cancel_reload(event.room)
            self._end_streams(event.room)
            if event.room.startswith("board:"):
                board = self._boards.get(event.room.removeprefix("board:"))
                if board is not None:
                    board._left(event.reason)
                self._presence_rejoined(event.room)  # not joined: send it anyway
        elif isinstance(event, PongReceived):
            self.rtt_s = event.rtt_s
        elif isinstance(event, ServerError):
            # going away is routine; a refused token is raised to the caller
            if event.error.code == ErrorCode.RATE_LIMITED.value:
                self._rate_limited += 1
            quiet = (ErrorCode.GOING_AWAY, ErrorCode.UNAUTHORIZED)
            level = logging.INFO if event.error.code in quiet else logging.WARNING
            log.log(level, "server error: %s: %s", event.error.code, event.error.message)
        elif isinstance(event, PresenceChanged):
            track = self.machine.rooms.get(f"board:{event.presence.board}")
            if track is not None and track.status is not RoomStatus.LEAVING:
                self._board(event.presence.board)._apply(event.presence)
        elif isinstance(event, ResumeRequested | ProtocolViolation):
            pass  # handled by _dispatch (they need to send)

    def _on_event(self, event: Event) -> None:
        mirror = self._mirrors.get(event.room)
        if mirror is not None:
            mirror._apply(event)
        streams = self._streams.get(event.room)
        if streams:
            room_event = RoomEvent(
                room=event.room,
                seq=event.seq,
                name=event.event,
                data=event.data,
                last_seq=event.last_seq,
                ts=event.ts,
                user_id=event.user_id,
                origin=event.origin,
                temp_id=event.temp_id,
                own=event.origin is not None and event.origin in self.own_connection_ids,
            )
            for stream in streams:
                stream._push(room_event)

    def _start_reload(self, event: ReloadRequired) -> None:
        room = event.room
        mirror = self._mirrors.get(room)
        if mirror is None:
            mirror = self._mirrors[room] = Mirror(room)
        self._cancel_reload(room)
        mirror._begin_reload(event.epoch, event.seq)
        scope = trio.CancelScope()
        self._reloads[room] = scope
        assert self._nursery is not None
        self._nursery.start_soon(self._reload, mirror, scope, event.seq)

    async def _reload(self, mirror: Mirror, scope: trio.CancelScope, seq: int) -> None:
        with scope:
            attempt = 0
            while True:
                try:
                    resources = await self._loader(self, mirror.room)
                    break
                except (ConnectionLost, trio.TooSlowError):
                    continue  # retried after the reconnect
                except CallError as exc:
                    if exc.code not in RELOAD_RETRY_CODES:
                        log.error("reload of %s failed: %s", mirror.room, exc)
                        mirror._left(exc.code, exc.message)
                        return
                    # the server could not answer now (a crashed actor, a
                    # store that failed): try again after a backoff
                    log.info("reload of %s failed, retrying: %s", mirror.room, exc)
                    delay = backoff_s(
                        attempt, self.entropy.random(), self.backoff_base_s, self.backoff_cap_s
                    )
                    attempt += 1
                    await trio.sleep(delay)
            if self._reloads.get(mirror.room) is scope:
                del self._reloads[mirror.room]
            mirror._finish_reload(resources)
            for stream in self._streams.get(mirror.room, ()):
                stream._push(
                    RoomEvent(room=mirror.room, seq=seq, name="room:reloaded", kind="reload")
                )


def _cursor_only(update: PresenceUpdate) -> bool:
    """Whether the server counts ``update`` against the presence rate only
    (a cursor move) rather than the general rate."""
    return update.cursor is not None and all(
        value is None
        for name, value in attrs.asdict(update, recurse=False).items()
        if name not in ("board", "cursor")
    )


def _connect_error(url: str, exc: BaseException) -> CallError:
    """One readable error for a connection that could not be made."""
    if isinstance(exc, DialFailed):
        if exc.kind == "refused":
            return CallError("rejected", f"{url} {exc.reason}")
        return CallError("unavailable", f"cannot connect to {url}: {exc.reason}")
    if isinstance(exc, CallError):
        return exc
    if isinstance(exc, TransportClosed):
        return CallError("unavailable", f"cannot connect to {url}: closed ({exc.code})")
    return CallError("unavailable", f"cannot connect to {url}: {type(exc).__name__}")


@asynccontextmanager
async def connect(
    url: str,
    *,
    token: str,
    codec: Literal["json", "cbor"] | Codec = "json",
    client_id: str | None = None,
    entropy: Entropy | None = None,
    seed: int | str | None = None,
    clock: Clock | None = None,
    connect_timeout_s: float = 10.0,
    call_timeout_s: float = 30.0,
    backoff_base_s: float = 0.25,
    backoff_cap_s: float = 10.0,
    heartbeat: Heartbeat | None = None,
    events_queue_max: int = 1000,
    loader: Loader = load_room,
    read_retries: int = 3,
    idempotent_writes: bool = True,
    write_retries: int = 3,
    presence_rate_per_s: float = DEFAULT_RATE_PER_S,
    refresh: Refresh | None = None,
    refresh_before_s: float = 60.0,
    wall: WallClock | None = None,
    dialer: Dialer | None = None,
    observer: ClientObserver | None = None,
    retry_first: bool = False,
) -> AsyncIterator[Client]:
    """Connect to the daemon at ``url`` (``ws://127.0.0.1:3030/ws``).

    Returns once the first connection is welcomed; raises
    :class:`CallError` if it cannot be made (refused token: ``unauthorized``;
    refused WebSocket: ``rejected``; nothing listening: ``unavailable``).
    ``entropy`` (the world's seam; one seeded with ``seed``, else the
    system's) draws the reconnect jitter and the temp ids; ``clock`` (the
    world's seam) times heartbeats, backoff and presence pacing; ``heartbeat`` overrides the server's (tests);
    ``presence_rate_per_s`` caps the presence updates (cursor moves
    included) sent per second.  ``read_retries`` and ``write_retries``: how
    often a read, and a write under an idempotency key (which
    ``idempotent_writes`` gives every write of sessions, tasks, boards and
    messages), whose connection dropped are sent again (see
    :meth:`Client.call`).

    An access token (a JWT from sign-in) expires: with ``refresh`` (an
    async callable returning a new one, e.g. :meth:`Credentials.refresh`)
    the client renews it in band ``refresh_before_s`` before it expires (on
    ``wall``, the world's wall clock seam), and if the server closed the
    connection for an expired token (4002), refreshes and reconnects,
    resuming every room with ``since``: nothing is lost.  Calls wait while
    the token is expired.

    ``dialer`` (the world's transport seam) opens each connection: by
    default a WebSocket (:class:`WebSocketDialer`); the simulator passes its
    network's.  ``observer`` sees every frame received and every protocol
    event (:class:`ClientObserver`).  ``retry_first``: return at once and
    keep trying the first connection too (with the backoff of a reconnect),
    for a program that starts before its server; calls wait meanwhile.
    """
    chosen = codec if isinstance(codec, Codec) else {"json": Codec.JSON, "cbor": Codec.CBOR}[codec]
    client = Client(
        url,
        token=token,
        codec=chosen,
        client_id=client_id,
        entropy=entropy or (SecureEntropy() if seed is None else SeededEntropy(seed)),
        clock=clock or TrioClock(),
        connect_timeout_s=connect_timeout_s,
        call_timeout_s=call_timeout_s,
        backoff_base_s=backoff_base_s,
        backoff_cap_s=backoff_cap_s,
        heartbeat=heartbeat,
        events_queue_max=events_queue_max,
        loader=loader,
        read_retries=read_retries,
        idempotent_writes=idempotent_writes,
        write_retries=write_retries,
        presence_rate_per_s=presence_rate_per_s,
        refresh=refresh,
        refresh_before_s=refresh_before_s,
        wall=wall,
        dialer=dialer,
        observer=observer,
    )
    try:
        async with trio.open_nursery() as nursery:
            client._nursery = nursery
            error = await nursery.start(client._run, retry_first)
            if error is not None:
                raise error
            try:
                yield client
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The background tasks end quietly: an error here is the caller's (or
        # the connect error); raise it as is, not wrapped in a group.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
