"""The server end of one connection, as a sans-IO state machine.

Style: like h11, with whole WebSocket messages instead of a byte stream.

* In: ``receive_data(frame, now)`` takes one WebSocket message and returns the
  list of :data:`ServerEvent` it produced, in order.  It never raises for
  anything the peer sent: bad input becomes a :class:`ProtocolViolation`.
* Out: ``welcome()``, ``result()``, ``joined()``, ``left()``, ``lagged()``,
  ``error()``, ``pong()`` and the general ``send()`` return the frame to send
  and update what the machine tracks (pending calls, subscriptions).  Misuse
  (a result for a call that is not pending, a send in the wrong state) raises
  :class:`LocalProtocolError`.
* ``close()`` starts closing (returns an error frame to send first, if a code
  is given); ``connection_closed()`` says the transport is gone.

Event frames and presence frames built by a room with ``prepare_batch`` go to
the socket directly, not through this machine: after ``left(room)`` the driver
stops forwarding that room's frames.
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
    _readable_ref,
    encode,
    structure_client_message,
)
from ._errors import (
    CLOSE_CODES,
    PRE_HANDSHAKE_CLOSE,
    CloseCode,
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
)
from ._events import (
    AuthReceived,
    CallReceived,
    HelloReceived,
    JoinRequested,
    LeaveRequested,
    PingReceived,
    PresenceReceived,
    ProtocolViolation,
    ServerEvent,
    SubscriptionDropped,
)
from ._limits import DEFAULT_LIMITS, Limits, TokenBucket
from ._messages import (
    MAX_ROOM_CHARS,
    PROTOCOL_VERSION,
    Auth,
    Call,
    ClientMessage,
    Error,
    ErrorInfo,
    Hello,
    Join,
    Joined,
    Lagged,
    Leave,
    Left,
    Ping,
    Pong,
    PresenceUpdate,
    Result,
    ServerMessage,
    Welcome,
)

__all__ = [
    "SERVER_TRANSITIONS",
    "ServerConnection",
    "ServerState",
    "ServerStatistics",
    "ServerTrigger",
]


class ServerState(enum.Enum):
    AWAITING_HELLO = "awaiting_hello"
    """Only ``hello`` is accepted."""
    AUTHENTICATING = "authenticating"
    """``hello`` received; the driver checks the token, then ``welcome()`` or
    ``close()``.  Anything received now closes the connection."""
    OPEN = "open"
    CLOSING = "closing"
    """Closing: input is ignored, nothing more may be sent."""
    CLOSED = "closed"


class ServerTrigger(enum.Enum):
    RECV_HELLO = "recv_hello"
    RECV_MESSAGE = "recv_message"
    """Any message but ``hello``."""
    SEND_WELCOME = "send_welcome"
    SEND_MESSAGE = "send_message"
    """Any message but ``welcome``."""
    CLOSE = "close"
    """``close()`` was called or a fatal violation was received."""
    CONNECTION_CLOSED = "connection_closed"


_S = ServerState
_T = ServerTrigger

SERVER_TRANSITIONS: Final[Mapping[tuple[ServerState, ServerTrigger], ServerState | ErrorCode]] = (
    MappingProxyType(
        {
            (_S.AWAITING_HELLO, _T.RECV_HELLO): _S.AUTHENTICATING,
            (_S.AWAITING_HELLO, _T.RECV_MESSAGE): ErrorCode.NOT_AUTHENTICATED,
            (_S.AWAITING_HELLO, _T.CLOSE): _S.CLOSING,
            (_S.AWAITING_HELLO, _T.CONNECTION_CLOSED): _S.CLOSED,
            (_S.AUTHENTICATING, _T.RECV_HELLO): ErrorCode.INVALID_STATE,
            (_S.AUTHENTICATING, _T.RECV_MESSAGE): ErrorCode.NOT_AUTHENTICATED,
            (_S.AUTHENTICATING, _T.SEND_WELCOME): _S.OPEN,
            (_S.AUTHENTICATING, _T.CLOSE): _S.CLOSING,
            (_S.AUTHENTICATING, _T.CONNECTION_CLOSED): _S.CLOSED,
            (_S.OPEN, _T.RECV_HELLO): ErrorCode.INVALID_STATE,
            (_S.OPEN, _T.RECV_MESSAGE): _S.OPEN,
            (_S.OPEN, _T.SEND_MESSAGE): _S.OPEN,
            (_S.OPEN, _T.CLOSE): _S.CLOSING,
            (_S.OPEN, _T.CONNECTION_CLOSED): _S.CLOSED,
            (_S.CLOSING, _T.CLOSE): _S.CLOSING,
            (_S.CLOSING, _T.CONNECTION_CLOSED): _S.CLOSED,
            (_S.CLOSED, _T.CONNECTION_CLOSED): _S.CLOSED,
        }
    )
)
"""The server's transitions: (state, trigger) -> next state, or the error code
a received message is refused with (that closes the connection).  A pair not in
the table is refused: a send raises :class:`LocalProtocolError`.  In CLOSING and
CLOSED, received frames are ignored."""


@attrs.frozen
class ServerStatistics:
    frames_received: int
    messages_received: int
    violations: int
    rate_limited: int
    presence_dropped: int
    pending_calls: int
    subscriptions: int


class ServerConnection:
    """The server end of one WebSocket (see the module docstring)."""

    def __init__(self, *, codec: Codec, limits: Limits = DEFAULT_LIMITS) -> None:
        self.codec: Final = codec
        self.limits: Final = limits
        self._state = ServerState.AWAITING_HELLO
        self._pending: set[int] = set()
        # room -> joined (True) or join requested and not answered yet (False)
        self._rooms: dict[str, bool] = {}
        self._bucket: TokenBucket | None = None
        self._presence_bucket: TokenBucket | None = None
        self._refused_in_a_row = 0
        self._last_received_s: float | None = None
        self._close_code: CloseCode | None = None
        self._close_reason = ""
        self._frames_received = 0
        self._messages_received = 0
        self._violations = 0
        self._rate_limited = 0
        self._presence_dropped = 0

    # ------------------------------------------------------------ inspection

    @property
    def state(self) -> ServerState:
        return self._state

    @property
    def pending_calls(self) -> frozenset[int]:
        """Refs of the calls received and not answered yet."""
        return frozenset(self._pending)

    @property
    def subscriptions(self) -> frozenset[str]:
        """Rooms joined (``joined()`` sent)."""
        return frozenset(room for room, joined in self._rooms.items() if joined)

    @property
    def pending_joins(self) -> frozenset[str]:
        """Rooms whose join was requested and not answered yet."""
        return frozenset(room for room, joined in self._rooms.items() if not joined)

    def is_subscribed(self, room: str) -> bool:
        return self._rooms.get(room, False)

    @property
    def last_received_s(self) -> float | None:
        """``now`` of the last ``receive_data`` (for the heartbeat timeout)."""
        return self._last_received_s

    @property
    def close_code(self) -> CloseCode | None:
        """Once closing: the WebSocket close code to close with."""
        return self._close_code

    @property
    def close_reason(self) -> str:
        return self._close_reason

    def statistics(self) -> ServerStatistics:
        return ServerStatistics(
            frames_received=self._frames_received,
            messages_received=self._messages_received,
            violations=self._violations,
            rate_limited=self._rate_limited,
            presence_dropped=self._presence_dropped,
            pending_calls=len(self._pending),
            subscriptions=sum(self._rooms.values()),
        )

    def retry_after_ms(self) -> int:
        """Milliseconds until the rate's bucket holds a whole token again (at
        least 1): what a ``rate_limited`` answer tells the client to wait."""
        bucket = self._bucket
        if bucket is None or bucket.tokens >= 1:
            return 1
        wait_ms = (1 - bucket.tokens) / self.limits.rate_per_s * 1000
        return max(1, math.ceil(round(wait_ms, 6)))  # up, past the float's noise

    def _closing(self) -> bool:
        return self._state is ServerState.CLOSING

    # ----------------------------------------------------------------- input

    def receive_data(self, data: RawFrame, now: float) -> list[ServerEvent]:
        """Feed one WebSocket message received at ``now`` (seconds, monotonic).
        Returns the events it produced, in order; never raises for bad input."""
        if self._state in (ServerState.CLOSING, ServerState.CLOSED):
            return []
        self._last_received_s = now
        self._frames_received += 1
        try:
            items = _frame_items(self.codec, data, self.limits)
        except ProtocolError as exc:
            return self._violation(exc)
        events: list[ServerEvent] = []
        for item in items:
            self._messages_received += 1
            events.extend(self._receive_item(item, now))
            if self._closing():
                break
        return events

    def _take_token(self, item: dict[str, Any], now: float) -> bool | None:
        """True: go on; False: refused for the rate; None: dropped silently."""
        limits = self.limits
        # Only cursor-only presence is lossy: an update that also changes the
        # board, view, typing, viewport or preferences counts against the
        # general rate instead, so a client's last change (leaving a board)
        # is never dropped.
        cursor_only = "cursor" in item and set(item) <= {"type", "board", "cursor"}
        if item.get("type") == "presence" and cursor_only:
            bucket = self._presence_bucket or TokenBucket.full(limits.presence_burst, now)
            granted, self._presence_bucket = bucket.take(
                now, rate_per_s=limits.presence_rate_per_s, burst=limits.presence_burst
            )
            if not granted:
                self._presence_dropped += 1
                return None
            return True
        bucket = self._bucket or TokenBucket.full(limits.rate_burst, now)
        granted, self._bucket = bucket.take(
            now, rate_per_s=limits.rate_per_s, burst=limits.rate_burst
        )
        # A message let through between refusals does not forgive them: a
        # client sending a little over the rate gets one through every few
        # milliseconds as the bucket refills.  The count starts again once
        # the client slowed down enough for the bucket to be half full.
        if granted and self._bucket.tokens >= limits.rate_burst / 2:
            self._refused_in_a_row = 0
        return granted

    def _receive_item(self, item: dict[str, Any], now: float) -> list[ServerEvent]:
        granted = self._take_token(item, now)
        if granted is None:
            return []
        if not granted:
            self._rate_limited += 1
            self._refused_in_a_row += 1
            if self._refused_in_a_row > self.limits.max_refused:
                return self._violation(
                    ProtocolError(ErrorCode.FLOOD, "kept sending while rate limited")
                )
            is_call = item.get("type") in ("call", "auth")  # answered with a result
            return self._violation(
                ProtocolError(
                    ErrorCode.RATE_LIMITED,
                    f"more than {self.limits.rate_per_s:g} messages per second",
                    ref=_readable_ref(item) if is_call else None,
                    data={"retry_after_ms": self.retry_after_ms()},
                ),
                item,
            )
        # The state decides before the fields do: before the handshake, a
        # malformed call is refused for coming too early, not for its fields.
        kind = item.get("type")
        trigger = _T.RECV_HELLO if kind == "hello" else _T.RECV_MESSAGE
        target = SERVER_TRANSITIONS.get((self._state, trigger), ErrorCode.INVALID_STATE)
        if isinstance(target, ErrorCode):
            shown = repr(kind)[:40] if isinstance(kind, str) else "a message"
            return self._violation(
                ProtocolError(target, f"{shown} is not allowed in state {self._state.value}")
            )
        try:
            message = structure_client_message(item)
        except ProtocolError as exc:
            return self._violation(exc, item)
        self._state = target
        return self._dispatch(message, item)

    def _dispatch(self, message: ClientMessage, item: dict[str, Any]) -> list[ServerEvent]:
        if isinstance(message, Hello):
            if message.protocol != PROTOCOL_VERSION:
                return self._violation(
                    ProtocolError(
                        ErrorCode.UNSUPPORTED_PROTOCOL,
                        f"protocol {message.protocol} is not supported; this server speaks "
                        f"{PROTOCOL_VERSION}",
                    )
                )
            return [HelloReceived(message)]
        if isinstance(message, Call | Auth):
            if message.ref in self._pending:
                return self._violation(
                    ProtocolError(ErrorCode.DUPLICATE_REF, f"ref {message.ref} is already pending")
                )
            if len(self._pending) >= self.limits.max_pending_calls:
                return self._violation(
                    ProtocolError(
                        ErrorCode.TOO_MANY_PENDING,
                        f"more than {self.limits.max_pending_calls} calls pending",
                        ref=message.ref,
                    ),
                    item,
                )
            self._pending.add(message.ref)
            if isinstance(message, Auth):
                return [AuthReceived(message)]
            return [CallReceived(message)]
        if isinstance(message, Join):
            room = message.room
            rejoin = self._rooms.get(room, False)
            if room not in self._rooms:
                if len(self._rooms) >= self.limits.max_subscriptions:
                    return self._violation(
                        ProtocolError(
                            ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                            f"more than {self.limits.max_subscriptions} rooms",
                        ),
                        item,
                    )
                self._rooms[room] = False
            return [JoinRequested(message, rejoin)]
        if isinstance(message, Leave):
            return [LeaveRequested(message.room)]
        if isinstance(message, PresenceUpdate):
            return [PresenceReceived(message)]
        assert isinstance(message, Ping)
        return [PingReceived(message)]

    def _violation(
        self, exc: ProtocolError, item: dict[str, Any] | None = None
    ) -> list[ServerEvent]:
        """Report ``exc``; answer it as well as the offending ``item`` allows."""
        self._violations += 1
        if exc.ref is not None and exc.ref in self._pending:
            exc = ProtocolError(ErrorCode.DUPLICATE_REF, f"ref {exc.ref} is already pending")
        close_code = exc.close_code
        if close_code is None and self._state is not ServerState.OPEN:
            close_code = PRE_HANDSHAKE_CLOSE
        if close_code is not None:
            reply = encode(self.codec, Error(exc.code.value, exc.message))
            self._begin_close(close_code, exc.close_reason)
            return [ProtocolViolation(exc, close_code, reply)]
        events: list[ServerEvent] = []
        answer: ServerMessage
        room = item.get("room") if item is not None and item.get("type") == "join" else None
        if exc.ref is not None:
            answer = Result(exc.ref, False, error=ErrorInfo(exc.code.value, exc.message, exc.data))
        elif type(room) is str and _valid_room(room):
            answer = Left(room, exc.code.value, exc.message)
            if self._rooms.pop(room, False):
                events.append(SubscriptionDropped(room, exc.code.value))
        else:
            answer = Error(exc.code.value, exc.message)
        events.insert(0, ProtocolViolation(exc, None, encode(self.codec, answer)))
        return events

    def _move(self, trigger: ServerTrigger) -> None:
        target = SERVER_TRANSITIONS.get((self._state, trigger))
        if not isinstance(target, ServerState):
            raise LocalProtocolError(f"{trigger.value} is not allowed in state {self._state.value}")
        self._state = target

    def _begin_close(self, code: CloseCode, reason: str) -> None:
        self._move(_T.CLOSE)
        self._close_code = code
        self._close_reason = reason

    # ---------------------------------------------------------------- output

    def send(self, messages: ServerMessage | Sequence[ServerMessage]) -> Frame:
        """Encode ``messages`` (one, or a list as one batch frame) and track
        what they do: ``welcome`` opens the connection, ``result`` answers a
        pending call, ``joined`` subscribes, ``left`` unsubscribes.  Raises
        :class:`LocalProtocolError` on misuse, leaving the machine unchanged."""
        batch = [messages] if not isinstance(messages, Sequence) else list(messages)
        saved = (self._state, set(self._pending), dict(self._rooms))
        try:
            for message in batch:
                self._track_send(message)
            return encode(self.codec, messages)
        except BaseException:
            self._state, self._pending, self._rooms = saved
            raise

    def _track_send(self, message: ServerMessage) -> None:
        trigger = _T.SEND_WELCOME if isinstance(message, Welcome) else _T.SEND_MESSAGE
        target = SERVER_TRANSITIONS.get((self._state, trigger))
        if not isinstance(target, ServerState):
            raise LocalProtocolError(
                f"cannot send {type(message).__name__} in state {self._state.value}"
            )
        if isinstance(message, Result):
            if message.ref not in self._pending:
                raise LocalProtocolError(f"result for ref {message.ref}, which is not pending")
            self._pending.discard(message.ref)
        elif isinstance(message, Joined):
            if (
                message.room not in self._rooms
                and len(self._rooms) >= self.limits.max_subscriptions
            ):
                raise LocalProtocolError(
                    f"joined {message.room!r} beyond {self.limits.max_subscriptions} rooms",
                    code=ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                )
            self._rooms[message.room] = True
        elif isinstance(message, Left):
            self._rooms.pop(message.room, None)
        elif isinstance(message, Error) and _is_fatal(message.code):
            raise LocalProtocolError(f"{message.code} closes the connection: use close()")
        self._state = target

    def welcome(
        self,
        *,
        connection_id: str,
        user_id: str,
        heartbeat_ms: int,
        limits: Mapping[str, Any] | None = None,
        expires_at: int | None = None,
    ) -> Frame:
        """Accept the handshake (state AUTHENTICATING -> OPEN).  ``limits``
        defaults to this connection's limits; ``expires_at``: when the
        token expires (ms since the epoch), if it does."""
        announced = dict(self.limits.to_wire() if limits is None else limits)
        return self.send(Welcome(connection_id, user_id, heartbeat_ms, announced, expires_at))

    def result(self, ref: int, *, data: Any = None, error: ErrorInfo | None = None) -> Frame:
        """Answer the pending call ``ref``: ``data`` on success, ``error`` on failure."""
        return self.send(Result(ref, error is None, data=data, error=error))

    def result_error(self, ref: int, code: str, message: str, data: Any = None) -> Frame:
        return self.result(ref, error=ErrorInfo(str(code), message, data))

    def joined(self, room: str, *, epoch: str, seq: int, recovered: bool) -> Frame:
        """The connection is in ``room`` (send the replay after this frame)."""
        return self.send(Joined(room, epoch, seq, recovered))

    def left(self, room: str, reason: str = "left", message: str | None = None) -> Frame:
        """The connection is out of ``room``: after a leave, a refused join or
        revoked access (``reason``: ``left`` or an error code; ``message``:
        why, in words)."""
        return self.send(Left(room, str(reason), message))

    def lagged(self, room: str, resume_from: int) -> Frame:
        """This connection's backlog of ``room`` was dropped from
        ``resume_from`` on; the client will rejoin with ``since``."""
        return self.send(Lagged(room, resume_from))

    def error(self, code: str, message: str) -> Frame:
        """An error frame that leaves the connection open (for codes that
        close it, use :meth:`close`)."""
        return self.send(Error(str(code), message))

    def pong(self, t: int) -> Frame:
        return self.send(Pong(t))

    def close(self, code: ErrorCode | None = None, message: str = "") -> Frame | None:
        """Start closing.  With ``code`` (one that closes, like
        ``unauthorized``, ``going_away``, ``heartbeat_timeout``,
        ``server_error``), returns an error frame to send before closing;
        then close the WebSocket with :attr:`close_code` and
        :attr:`close_reason`.  Closing twice is a no-op (returns ``None``)."""
        if self._state is ServerState.CLOSING:
            return None
        if (self._state, _T.CLOSE) not in SERVER_TRANSITIONS:
            raise LocalProtocolError(f"cannot close in state {self._state.value}")
        if code is None:
            self._begin_close(CloseCode.NORMAL, message)
            return None
        close_code = CLOSE_CODES[ErrorCode(code)]
        if close_code is None:
            raise LocalProtocolError(f"{code} does not close the connection: use error()")
        frame = encode(self.codec, Error(ErrorCode(code).value, message))
        self._begin_close(close_code, ProtocolError(ErrorCode(code), message).close_reason)
        return frame

    def connection_closed(self) -> None:
        """The transport is closed (either side closed it, or it broke)."""
        self._move(_T.CONNECTION_CLOSED)
        self._pending.clear()
        self._rooms.clear()


def _valid_room(room: str) -> bool:
    return 0 < len(room) <= MAX_ROOM_CHARS


def _is_fatal(code: str) -> bool:
    try:
        return CLOSE_CODES[ErrorCode(code)] is not None
    except ValueError:
        return False
