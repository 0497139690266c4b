"""The client end, as a sans-IO state machine that outlives its connections.

One :class:`ClientConnection` serves a client across reconnects: it keeps the
rooms it is in (epoch and last applied seq) so that after a new ``hello`` and
``welcome`` it can rejoin each room where it left off.

* In: ``receive_data(frame, now)`` returns the list of :data:`ClientEvent`.
  Room events come out as :class:`EventApplied`, each once, in seq order per
  room; duplicates are dropped, a gap (or an overlap, or ``lagged``) turns
  into a :class:`ResumeRequested` that carries the ``join`` frame to send.
* Out: ``hello()``, ``call()``, ``join()``, ``leave()``, ``presence()``,
  ``ping()`` and the general ``send()`` return frames to send.
  ``rejoin_all()`` gives the joins to send after a reconnect.
* ``connection_lost()`` after the transport is gone: pending calls fail with
  ``connection_lost``, rooms wait for ``rejoin_all()``.

Delivery rules (also in PROTOCOL.md):

* an event covering ``seq..end`` (``end`` is ``last_seq`` for merged events)
  is a duplicate and dropped when ``end <= last``; applied when
  ``seq == last + 1`` (then ``last = end``); otherwise (``seq > last + 1``, a
  gap, or ``seq <= last < end``, a partial overlap that cannot be applied in
  part) the client asks to resume with ``since = last``;
* ``lagged(resume_from)`` asks to resume with
  ``since = min(last, resume_from - 1)``;
* after ``max_resumes`` resumes of a room in a row without applying an event,
  the next resume is a plain join: the server answers ``recovered: false`` and
  the app reloads the room;
* until the ``joined`` answer, the room's events are ignored.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final

import attrs

from ._codec import (
    Codec,
    Frame,
    RawFrame,
    _frame_items,
    encode,
    structure_server_message,
)
from ._errors import (
    PRE_HANDSHAKE_CLOSE,
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
)
from ._events import (
    CallResult,
    ClientEvent,
    EventApplied,
    PongReceived,
    PresenceChanged,
    ProtocolViolation,
    ReloadRequired,
    ResumeRequested,
    RoomJoined,
    RoomLeft,
    ServerError,
    Welcomed,
)
from ._limits import CLIENT_LIMITS, DEFAULT_LIMITS, Limits
from ._messages import (
    MAX_REF,
    PROTOCOL_VERSION,
    Auth,
    Call,
    ClientMessage,
    Error,
    ErrorInfo,
    Event,
    Hello,
    Join,
    Joined,
    Lagged,
    Leave,
    Left,
    Ping,
    Pong,
    Presence,
    PresenceUpdate,
    Result,
    ServerMessage,
    Since,
    Welcome,
)

__all__ = [
    "CLIENT_TRANSITIONS",
    "ROOM_TRANSITIONS",
    "ClientConnection",
    "ClientState",
    "ClientStatistics",
    "ClientTrigger",
    "RoomStatus",
    "RoomTrack",
    "RoomTrigger",
]


class ClientState(enum.Enum):
    DISCONNECTED = "disconnected"
    """No connection (initially, and after ``connection_lost()``)."""
    AWAITING_WELCOME = "awaiting_welcome"
    OPEN = "open"
    CLOSING = "closing"
    """Closing: input is ignored, nothing more may be sent."""


class ClientTrigger(enum.Enum):
    SEND_HELLO = "send_hello"
    RECV_WELCOME = "recv_welcome"
    RECV_ERROR = "recv_error"
    RECV_MESSAGE = "recv_message"
    """Any message but ``welcome`` and ``error``."""
    SEND_MESSAGE = "send_message"
    """Any message but ``hello``."""
    CLOSE = "close"
    CONNECTION_LOST = "connection_lost"


_C = ClientState
_CT = ClientTrigger

CLIENT_TRANSITIONS: Final[Mapping[tuple[ClientState, ClientTrigger], ClientState | ErrorCode]] = (
    MappingProxyType(
        {
            (_C.DISCONNECTED, _CT.SEND_HELLO): _C.AWAITING_WELCOME,
            (_C.DISCONNECTED, _CT.CONNECTION_LOST): _C.DISCONNECTED,
            (_C.AWAITING_WELCOME, _CT.RECV_WELCOME): _C.OPEN,
            (_C.AWAITING_WELCOME, _CT.RECV_ERROR): _C.AWAITING_WELCOME,
            (_C.AWAITING_WELCOME, _CT.RECV_MESSAGE): ErrorCode.INVALID_STATE,
            (_C.AWAITING_WELCOME, _CT.CLOSE): _C.CLOSING,
            (_C.AWAITING_WELCOME, _CT.CONNECTION_LOST): _C.DISCONNECTED,
            (_C.OPEN, _CT.RECV_WELCOME): ErrorCode.INVALID_STATE,
            (_C.OPEN, _CT.RECV_ERROR): _C.OPEN,
            (_C.OPEN, _CT.RECV_MESSAGE): _C.OPEN,
            (_C.OPEN, _CT.SEND_MESSAGE): _C.OPEN,
            (_C.OPEN, _CT.CLOSE): _C.CLOSING,
            (_C.OPEN, _CT.CONNECTION_LOST): _C.DISCONNECTED,
            (_C.CLOSING, _CT.CLOSE): _C.CLOSING,
            (_C.CLOSING, _CT.CONNECTION_LOST): _C.DISCONNECTED,
        }
    )
)
"""The client's transitions: (state, trigger) -> next state, or the error code
a received message is refused with.  A send not in the table raises
:class:`LocalProtocolError`.  In DISCONNECTED and CLOSING, received frames are
ignored."""


class RoomStatus(enum.Enum):
    JOINING = "joining"
    """A join (or a resume) was sent; events are ignored until ``joined``."""
    LIVE = "live"
    """Events are applied in seq order."""
    LEAVING = "leaving"
    """A leave was sent; events and ``joined`` are ignored until ``left``."""
    DETACHED = "detached"
    """The connection was lost; ``rejoin_all()`` rejoins it."""


class RoomTrigger(enum.Enum):
    SEND_JOIN = "send_join"
    RESUME = "resume"
    """A gap, an overlap or ``lagged``: the machine sends a join with ``since``."""
    RECV_JOINED = "recv_joined"
    SEND_LEAVE = "send_leave"
    RECV_LEFT = "recv_left"
    CONNECTION_LOST = "connection_lost"


_R = RoomStatus
_RT = RoomTrigger

ROOM_TRANSITIONS: Final[Mapping[tuple[RoomStatus | None, RoomTrigger], RoomStatus | None]] = (
    MappingProxyType(
        {
            (None, _RT.SEND_JOIN): _R.JOINING,
            (_R.DETACHED, _RT.SEND_JOIN): _R.JOINING,
            (_R.LEAVING, _RT.SEND_JOIN): _R.JOINING,
            (_R.LIVE, _RT.RESUME): _R.JOINING,
            (None, _RT.RECV_JOINED): _R.LIVE,
            (_R.JOINING, _RT.RECV_JOINED): _R.LIVE,
            (_R.LIVE, _RT.RECV_JOINED): _R.LIVE,
            (_R.DETACHED, _RT.RECV_JOINED): _R.LIVE,
            (_R.LEAVING, _RT.RECV_JOINED): _R.LEAVING,
            (_R.JOINING, _RT.SEND_LEAVE): _R.LEAVING,
            (_R.LIVE, _RT.SEND_LEAVE): _R.LEAVING,
            (_R.DETACHED, _RT.SEND_LEAVE): _R.LEAVING,
            (_R.LEAVING, _RT.SEND_LEAVE): _R.LEAVING,
            (_R.JOINING, _RT.RECV_LEFT): None,
            (_R.LIVE, _RT.RECV_LEFT): None,
            (_R.DETACHED, _RT.RECV_LEFT): None,
            (_R.LEAVING, _RT.RECV_LEFT): None,
            (_R.JOINING, _RT.CONNECTION_LOST): _R.DETACHED,
            (_R.LIVE, _RT.CONNECTION_LOST): _R.DETACHED,
            (_R.DETACHED, _RT.CONNECTION_LOST): _R.DETACHED,
            (_R.LEAVING, _RT.CONNECTION_LOST): None,
        }
    )
)
"""Per-room transitions (``None``: not tracked).  One refinement is not in the
table: a ``left`` that answers a leave sent before a later join (counted in
``leaves_in_flight``) leaves the room as it is."""


_MISSING: Final = object()


@attrs.frozen
class RoomTrack:
    """What the client knows of one room."""

    room: str
    status: RoomStatus
    epoch: str | None = None
    seq: int | None = None
    """Last applied seq (``None``: not joined yet)."""
    requested_since: Since | None = None
    """The ``since`` of the join in flight."""
    leaves_in_flight: int = 0
    resumes_without_progress: int = 0

    @property
    def since(self) -> Since | None:
        """Where to resume from: the epoch and the last applied seq."""
        if self.epoch is None or self.seq is None:
            return None
        return Since(self.epoch, self.seq)


@attrs.frozen
class ClientStatistics:
    events_applied: int
    duplicates_dropped: int
    events_ignored: int
    gaps: int
    overlaps: int
    lagged: int
    resumes: int
    reloads: int
    violations: int
    pending_calls: int
    rooms: int


def _limits_from_wire(announced: Mapping[str, Any]) -> Limits:
    """The server's limits from ``welcome.limits``; unknown or malformed
    entries keep the defaults."""
    changes: dict[str, Any] = {}
    for field in attrs.fields(Limits):
        value = announced.get(field.name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            continue
        if field.type in (int, "int") and isinstance(value, int):
            changes[field.name] = value
        elif field.type in (float, "float") and math.isfinite(value):
            changes[field.name] = float(value)
    try:
        return attrs.evolve(DEFAULT_LIMITS, **changes)
    except (TypeError, ValueError):
        return DEFAULT_LIMITS


class ClientConnection:
    """The client end (see the module docstring).

    ``limits`` bound what is accepted from the server; the server's own limits
    (announced in ``welcome``) bound what is sent.  ``max_resumes``: resumes of
    a room in a row without progress before falling back to a plain join.
    """

    def __init__(
        self,
        *,
        codec: Codec,
        client_id: str | None = None,
        limits: Limits = CLIENT_LIMITS,
        max_resumes: int = 3,
    ) -> None:
        self.codec: Final = codec
        self.client_id: Final = client_id
        self.limits: Final = limits
        self.max_resumes: Final = max_resumes
        self._state = ClientState.DISCONNECTED
        self._server_limits = DEFAULT_LIMITS
        self._next_ref = 1
        self._pending: dict[int, Call | Auth] = {}
        self._rooms: dict[str, RoomTrack] = {}
        self._last_received_s: float | None = None
        self._last_ping_s: float | None = None
        self._stats: dict[str, int] = dict.fromkeys(
            (
                "events_applied",
                "duplicates_dropped",
                "events_ignored",
                "gaps",
                "overlaps",
                "lagged",
                "resumes",
                "reloads",
                "violations",
            ),
            0,
        )

    # ------------------------------------------------------------ inspection

    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def rooms(self) -> Mapping[str, RoomTrack]:
        return MappingProxyType(self._rooms)

    @property
    def pending_calls(self) -> Mapping[int, Call | Auth]:
        """The calls sent and not answered yet, by ref."""
        return MappingProxyType(self._pending)

    @property
    def max_pending_calls(self) -> int:
        return min(self.limits.max_pending_calls, self._server_limits.max_pending_calls)

    @property
    def can_call(self) -> bool:
        return self._state is ClientState.OPEN and len(self._pending) < self.max_pending_calls

    @property
    def server_limits(self) -> Limits:
        """The limits the server announced (defaults before ``welcome``)."""
        return self._server_limits

    @property
    def last_received_s(self) -> float | None:
        return self._last_received_s

    @property
    def last_ping_s(self) -> float | None:
        return self._last_ping_s

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(
            **self._stats, pending_calls=len(self._pending), rooms=len(self._rooms)
        )

    # ---------------------------------------------------------------- output

    def send(self, messages: ClientMessage | Sequence[ClientMessage]) -> Frame:
        """Encode ``messages`` (one, or a list as one batch frame) and track
        them.  Raises :class:`LocalProtocolError` on misuse (wrong state, too
        many pending calls or rooms, a frame beyond the server's limits),
        leaving the machine unchanged."""
        batch = [messages] if not isinstance(messages, Sequence) else list(messages)
        saved = (self._state, dict(self._pending), dict(self._rooms), self._next_ref)
        try:
            if len(batch) > self._server_limits.max_batch:
                raise LocalProtocolError(
                    f"batch of {len(batch)} beyond the server's {self._server_limits.max_batch}",
                    code=ErrorCode.BATCH_TOO_LARGE,
                )
            for message in batch:
                self._track_send(message)
            frame = encode(self.codec, messages, max_depth=self._server_limits.max_depth)
            size = len(frame) if isinstance(frame, bytes) else len(frame.encode("utf-8"))
            if size > self._server_limits.max_frame_bytes:
                raise LocalProtocolError(
                    f"frame of {size} bytes beyond the server's {self._server_limits.max_frame_bytes}",
                    code=ErrorCode.FRAME_TOO_LARGE,
                )
            return frame
        except BaseException:
            self._state, self._pending, self._rooms, self._next_ref = saved
            raise

    def _move(self, trigger: ClientTrigger) -> None:
        target = CLIENT_TRANSITIONS.get((self._state, trigger))
        if not isinstance(target, ClientState):
            raise LocalProtocolError(f"{trigger.value} is not allowed in state {self._state.value}")
        self._state = target

    def _room_move(self, room: str, trigger: RoomTrigger) -> RoomStatus:
        """The status a send moves ``room`` to (sends never untrack a room)."""
        track = self._rooms.get(room)
        target = ROOM_TRANSITIONS.get((None if track is None else track.status, trigger), _MISSING)
        if not isinstance(target, RoomStatus):
            raise LocalProtocolError(
                f"{trigger.value} is not allowed for room {room!r} in status "
                f"{'untracked' if track is None else track.status.value}"
            )
        return target

    def _track_send(self, message: ClientMessage) -> None:
        if isinstance(message, Hello):
            self._move(_CT.SEND_HELLO)
            self._server_limits = DEFAULT_LIMITS
            return
        self._move(_CT.SEND_MESSAGE)
        if isinstance(message, Call | Auth):
            if message.ref in self._pending:
                raise LocalProtocolError(f"ref {message.ref} is already pending")
            if len(self._pending) >= self.max_pending_calls:
                raise LocalProtocolError(
                    f"{len(self._pending)} calls pending, the most allowed",
                    code=ErrorCode.TOO_MANY_PENDING,
                )
            self._pending[message.ref] = message
            self._next_ref = max(self._next_ref, message.ref + 1)
        elif isinstance(message, Join):
            room = message.room
            status = self._room_move(room, _RT.SEND_JOIN)
            track = self._rooms.get(room)
            if track is None:
                if len(self._rooms) >= self._server_limits.max_subscriptions:
                    raise LocalProtocolError(
                        f"{len(self._rooms)} rooms, the most the server allows",
                        code=ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                    )
                track = RoomTrack(room, _R.JOINING)
                if message.since is not None:
                    # the caller's copy stands there (see :meth:`join`)
                    track = attrs.evolve(track, epoch=message.since.epoch, seq=message.since.seq)
            self._rooms[room] = attrs.evolve(track, status=status, requested_since=message.since)
        elif isinstance(message, Leave):
            status = self._room_move(message.room, _RT.SEND_LEAVE)
            track = self._rooms[message.room]
            self._rooms[message.room] = attrs.evolve(
                track, status=status, leaves_in_flight=track.leaves_in_flight + 1
            )

    def hello(self, token: str | None) -> Frame:
        """Start the handshake on a new connection (state DISCONNECTED ->
        AWAITING_WELCOME)."""
        return self.send(Hello(PROTOCOL_VERSION, token, self.client_id))

    def call(
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
    ) -> tuple[int, Frame]:
        """A call; returns its ``ref`` (the key of the :class:`CallResult`) and
        the frame.  Raises :class:`LocalProtocolError` with code
        ``too_many_pending`` when :attr:`can_call` is false, and with
        ``invalid_field`` for an ``idempotency_key`` out of bounds."""
        try:
            call = Call(0, service, method, id, data, query, temp_id, base_rev, idempotency_key)
        except ValueError as exc:
            raise LocalProtocolError(str(exc), code=ErrorCode.INVALID_FIELD) from None
        return self.send_call(call)

    def send_call(self, call: Call) -> tuple[int, Frame]:
        """``call`` under the next ``ref`` (its own is ignored), as
        :meth:`call` sends it: a write sent again on a new connection."""
        ref = self._next_ref
        if ref > MAX_REF:
            raise LocalProtocolError("call refs exhausted")
        return ref, self.send(attrs.evolve(call, ref=ref))

    def unsent(self, ref: int) -> None:
        """The frame of call (or auth) ``ref`` was never sent: its send was
        cancelled or failed before the transport took it.  The server will
        not answer it, so it no longer counts as pending (it would hold one
        of :attr:`max_pending_calls` for the life of the connection).
        Nothing if ``ref`` is not pending (answered, or the connection was
        lost meanwhile)."""
        self._pending.pop(ref, None)

    def auth(self, token: str) -> tuple[int, Frame]:
        """Re-authenticate in band with ``token``; returns the ``ref`` of
        the :class:`CallResult` that answers it, and the frame.  Counts as a
        pending call."""
        ref = self._next_ref
        if ref > MAX_REF:
            raise LocalProtocolError("call refs exhausted")
        return ref, self.send(Auth(ref, token))

    def join(self, room: str, since: Since | None = None) -> Frame:
        """Join ``room``; when the client was in it before (a detached room),
        the join resumes from where it stood.  ``since``, for a room this
        machine no longer tracks (the server let it go, with ``left``): where
        the caller's copy of it stands, every event up to ``since.seq``
        applied; the join resumes from there as from a detached room's."""
        track = self._rooms.get(room)
        if track is not None:
            since = track.since
        return self.send(Join(room, since))

    def leave(self, room: str) -> Frame:
        return self.send(Leave(room))

    def presence(self, update: PresenceUpdate) -> Frame:
        """Send a presence update (at most 30 per second: the server drops
        updates beyond its presence rate)."""
        return self.send(update)

    def ping(self, now: float) -> Frame:
        """A ping carrying ``now`` in milliseconds; see :class:`Heartbeat`."""
        frame = self.send(Ping(round(now * 1000)))
        self._last_ping_s = now
        return frame

    def rejoin_all(self) -> list[Join]:
        """After a reconnect (once welcomed): a join for every detached room,
        with ``since`` when the room's epoch and last applied seq are known.
        Send them (``send(joins)`` makes one batch frame; split it beyond the
        server's ``max_batch``)."""
        return [
            Join(track.room, track.since)
            for track in self._rooms.values()
            if track.status is RoomStatus.DETACHED
        ]

    def close(self) -> None:
        """This side starts closing; input is ignored from now on."""
        self._move(_CT.CLOSE)

    def connection_lost(self) -> list[ClientEvent]:
        """The transport is gone.  Every pending call fails with
        ``connection_lost``; leaves in flight complete; other rooms wait for
        ``rejoin_all()``."""
        self._move(_CT.CONNECTION_LOST)
        self._server_limits = DEFAULT_LIMITS
        events: list[ClientEvent] = []
        for ref in sorted(self._pending):
            error = ErrorInfo(ErrorCode.CONNECTION_LOST.value, "the connection was lost")
            events.append(CallResult(Result(ref, False, error=error)))
        self._pending.clear()
        for room, track in list(self._rooms.items()):
            status = ROOM_TRANSITIONS[(track.status, _RT.CONNECTION_LOST)]
            if status is None:
                del self._rooms[room]
                events.append(RoomLeft(room, "left"))
            else:
                self._rooms[room] = attrs.evolve(
                    track, status=status, requested_since=None, leaves_in_flight=0
                )
        return events

    def _closing(self) -> bool:
        return self._state is ClientState.CLOSING

    # ----------------------------------------------------------------- input

    def receive_data(self, data: RawFrame, now: float) -> list[ClientEvent]:
        """Feed one WebSocket message received at ``now`` (seconds, monotonic).
        Never raises for bad input: it becomes a :class:`ProtocolViolation`
        (with a ``close_code`` when the connection must be closed)."""
        if self._state in (ClientState.DISCONNECTED, ClientState.CLOSING):
            return []
        self._last_received_s = now
        try:
            items = _frame_items(self.codec, data, self.limits)
        except ProtocolError as exc:
            return [self._violation(exc)]
        events: list[ClientEvent] = []
        for item in items:
            try:
                message = structure_server_message(item)
            except ProtocolError as exc:
                events.append(self._violation(exc))
            else:
                events.extend(self._receive_message(message, now))
            if self._closing():
                break
        return events

    def _violation(self, exc: ProtocolError) -> ProtocolViolation:
        self._stats["violations"] += 1
        close_code = exc.close_code
        if close_code is None and self._state is not ClientState.OPEN:
            close_code = PRE_HANDSHAKE_CLOSE
        if close_code is not None:
            self._move(_CT.CLOSE)
        return ProtocolViolation(exc, close_code)

    def _receive_message(self, message: ServerMessage, now: float) -> list[ClientEvent]:
        if isinstance(message, Welcome):
            trigger = _CT.RECV_WELCOME
        elif isinstance(message, Error):
            trigger = _CT.RECV_ERROR
        else:
            trigger = _CT.RECV_MESSAGE
        target = CLIENT_TRANSITIONS.get((self._state, trigger), ErrorCode.INVALID_STATE)
        if isinstance(target, ErrorCode):
            return [
                self._violation(
                    ProtocolError(
                        target, f"{message.TYPE} is not allowed in state {self._state.value}"
                    )
                )
            ]
        self._state = target
        if isinstance(message, Event):
            return self._on_event(message)
        if isinstance(message, Result):
            call = self._pending.pop(message.ref, None)
            if call is None:
                return [
                    self._violation(
                        ProtocolError(
                            ErrorCode.UNKNOWN_REF, f"result for ref {message.ref}, not pending"
                        )
                    )
                ]
            return [CallResult(message)]
        if isinstance(message, Presence):
            return [PresenceChanged(message)]
        if isinstance(message, Joined):
            return self._on_joined(message)
        if isinstance(message, Lagged):
            return self._on_lagged(message)
        if isinstance(message, Left):
            return self._on_left(message)
        if isinstance(message, Pong):
            return [PongReceived(message.t, max(0.0, now - message.t / 1000))]
        if isinstance(message, Welcome):
            self._server_limits = _limits_from_wire(message.limits)
            return [Welcomed(message)]
        assert isinstance(message, Error)
        return [ServerError(message)]

    def seq_after_joined(self, joined: Joined) -> int | None:
        """The last applied seq of ``joined.room`` once this machine has
        taken ``joined``: its own seq if it believes the resume recovered,
        else the joined seq; None if it would ignore the answer (a leave is
        under way).  Changes nothing."""
        track = self._rooms.get(joined.room)
        if track is None:
            return joined.seq
        if track.status is RoomStatus.LEAVING:
            return None
        return track.seq if _recovers(track, joined) else joined.seq

    def _on_event(self, event: Event) -> list[ClientEvent]:
        track = self._rooms.get(event.room)
        if track is None or track.status is not RoomStatus.LIVE or track.seq is None:
            self._stats["events_ignored"] += 1
            return []
        last = track.seq
        end = event.end_seq
        if end <= last:
            self._stats["duplicates_dropped"] += 1
            return []
        if event.seq == last + 1:
            self._rooms[event.room] = attrs.evolve(track, seq=end, resumes_without_progress=0)
            self._stats["events_applied"] += 1
            return [EventApplied(event)]
        if event.seq > last + 1:
            self._stats["gaps"] += 1
            return [self._resume(track, last, "gap", counts=True)]
        self._stats["overlaps"] += 1
        return [self._resume(track, last, "overlap", counts=True)]

    def _on_lagged(self, lagged: Lagged) -> list[ClientEvent]:
        track = self._rooms.get(lagged.room)
        if track is None or track.status is not RoomStatus.LIVE or track.seq is None:
            self._stats["events_ignored"] += 1
            return []
        self._stats["lagged"] += 1
        since_seq = max(0, min(track.seq, lagged.resume_from - 1))
        return [self._resume(track, since_seq, "lagged", counts=False)]

    def _resume(
        self, track: RoomTrack, since_seq: int, reason: str, *, counts: bool
    ) -> ClientEvent:
        status = self._room_move(track.room, _RT.RESUME)
        attempts = track.resumes_without_progress + (1 if counts else 0)
        since = None
        if attempts <= self.max_resumes and track.epoch is not None:
            since = Since(track.epoch, since_seq)
        join = Join(track.room, since)
        self._rooms[track.room] = attrs.evolve(
            track, status=status, requested_since=since, resumes_without_progress=attempts
        )
        self._stats["resumes"] += 1
        return ResumeRequested(join, encode(self.codec, join), reason)

    def _on_joined(self, joined: Joined) -> list[ClientEvent]:
        room = joined.room
        track = self._rooms.get(room)
        status = ROOM_TRANSITIONS[(None if track is None else track.status, _RT.RECV_JOINED)]
        if track is not None and track.status is RoomStatus.LEAVING:
            return []  # the answer to a join sent before the leave
        if track is None:
            track = RoomTrack(room, _R.JOINING)
        recovered = _recovers(track, joined)
        assert status is not None
        if recovered:
            assert track.seq is not None
            self._rooms[room] = attrs.evolve(track, status=status, requested_since=None)
            return [RoomJoined(room, joined.epoch, track.seq, True)]
        self._rooms[room] = attrs.evolve(
            track,
            status=status,
            epoch=joined.epoch,
            seq=joined.seq,
            requested_since=None,
            resumes_without_progress=0,
        )
        self._stats["reloads"] += 1
        return [
            RoomJoined(room, joined.epoch, joined.seq, False),
            ReloadRequired(room, joined.epoch, joined.seq),
        ]

    def _on_left(self, left: Left) -> list[ClientEvent]:
        track = self._rooms.get(left.room)
        if track is None:
            return []
        if track.leaves_in_flight > 0:
            remaining = track.leaves_in_flight - 1
            if track.status is not RoomStatus.LEAVING or remaining > 0:
                self._rooms[left.room] = attrs.evolve(track, leaves_in_flight=remaining)
                return []
        status = ROOM_TRANSITIONS[(track.status, _RT.RECV_LEFT)]
        assert status is None
        del self._rooms[left.room]
        return [RoomLeft(left.room, left.reason, left.message)]


def _recovers(track: RoomTrack, joined: Joined) -> bool:
    """Whether ``joined`` continues ``track`` with nothing missed: the server
    says so, for the epoch and a seq at or past what the client has, and
    the client asked for it (a resume, or a join with ``since``)."""
    asked = track.requested_since
    return (
        joined.recovered
        and track.epoch == joined.epoch
        and track.seq is not None
        and joined.seq >= track.seq
        and (track.status is not RoomStatus.JOINING or asked is not None)
        and (asked is None or (asked.epoch == joined.epoch and asked.seq <= track.seq))
    )
