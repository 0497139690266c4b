"""What the connection machines report to the code that drives them.

``ServerConnection.receive_data`` returns a list of :data:`ServerEvent`;
``ClientConnection.receive_data`` returns a list of :data:`ClientEvent`.  All
are frozen records.  An event that comes with bytes to send (``reply``,
``data``) carries the encoded frame: the driver sends it as is.
"""

from __future__ import annotations

from typing import TypeAlias

import attrs

from ._codec import Frame
from ._errors import CloseCode, ProtocolError
from ._messages import (
    Auth,
    Call,
    Error,
    Event,
    Hello,
    Join,
    Ping,
    Presence,
    PresenceUpdate,
    Result,
    Welcome,
)

__all__ = [
    "AuthReceived",
    "CallReceived",
    "CallResult",
    "ClientEvent",
    "EventApplied",
    "HelloReceived",
    "JoinRequested",
    "LeaveRequested",
    "PingReceived",
    "PongReceived",
    "PresenceChanged",
    "PresenceReceived",
    "ProtocolViolation",
    "ReloadRequired",
    "ResumeRequested",
    "RoomJoined",
    "RoomLeft",
    "ServerError",
    "ServerEvent",
    "SubscriptionDropped",
    "Welcomed",
]


@attrs.frozen
class ProtocolViolation:
    """The peer broke the protocol (both sides).

    ``reply``, when set, is a frame to send back: an ``error`` frame, or for a
    call an error ``result``, or for a join a ``left``.  ``close_code``, when
    set, means the connection is over: send ``reply`` (if any), then close the
    WebSocket with ``close_code`` and ``error.close_reason``; the machine is
    already in its closing state and ignores further input.
    """

    error: ProtocolError
    close_code: CloseCode | None
    reply: Frame | None = None


# -------------------------------------------------------------------- server side


@attrs.frozen
class HelloReceived:
    """Authenticate ``hello.token``, then answer with ``welcome()`` or
    ``close(ErrorCode.UNAUTHORIZED, ...)``."""

    hello: Hello


@attrs.frozen
class CallReceived:
    """Run the call; answer with ``result(call.ref, ...)`` exactly once."""

    call: Call


@attrs.frozen
class AuthReceived:
    """Check ``auth.token``: answer with ``result(auth.ref, ...)`` exactly
    once (ok: the connection's principal is now the token's)."""

    auth: Auth


@attrs.frozen
class JoinRequested:
    """Authorize and subscribe; answer with ``joined(...)`` (then the replay)
    or ``left(room, reason)``.  ``rejoin``: the connection is already in the
    room and asks to resume from ``join.since`` (after a gap or ``lagged``)."""

    join: Join
    rejoin: bool


@attrs.frozen
class LeaveRequested:
    """Unsubscribe; answer with ``left(room)`` (also when not subscribed)."""

    room: str


@attrs.frozen
class PresenceReceived:
    update: PresenceUpdate


@attrs.frozen
class SubscriptionDropped:
    """The machine itself refused a rejoin of a room the connection was in
    (rate limited or malformed) and answered ``left``: stop delivering the
    room's events to this connection.  Reported next to the
    :class:`ProtocolViolation` that carries the ``left`` frame."""

    room: str
    reason: str


@attrs.frozen
class PingReceived:
    """Answer with ``pong(ping.t)``."""

    ping: Ping


ServerEvent: TypeAlias = (
    HelloReceived
    | CallReceived
    | AuthReceived
    | JoinRequested
    | LeaveRequested
    | PresenceReceived
    | SubscriptionDropped
    | PingReceived
    | ProtocolViolation
)


# -------------------------------------------------------------------- client side


@attrs.frozen
class Welcomed:
    welcome: Welcome


@attrs.frozen
class CallResult:
    """The outcome of a call.  On a lost connection every pending call gets
    one with the error code ``connection_lost`` (the call may or may not have
    run)."""

    result: Result


@attrs.frozen
class RoomJoined:
    """The client is in ``room`` at ``epoch``; ``seq`` is the last applied seq
    from now on.  ``recovered`` is the client's verdict (a ``joined`` that
    claims recovery but does not fit what the client has is not recovered)."""

    room: str
    epoch: str
    seq: int
    recovered: bool


@attrs.frozen
class ReloadRequired:
    """The client's state of ``room`` cannot be brought up to date by events:
    reload it as of ``seq`` (or later); the next event applied is ``seq + 1``."""

    room: str
    epoch: str
    seq: int


@attrs.frozen
class EventApplied:
    """Apply this event: delivered once, in seq order per room."""

    event: Event


@attrs.frozen
class ResumeRequested:
    """The client found a gap (or was told ``lagged``) and asks to resume:
    send ``data`` (the encoded ``join``).  Events of the room are ignored until
    the ``joined`` answer."""

    join: Join
    data: Frame
    reason: str


@attrs.frozen
class RoomLeft:
    """The client is out of ``room``: ``reason`` is ``"left"``, an error code
    (the join was refused, access was revoked...) or ``connection_lost`` for
    a leave that was in flight when the connection was lost."""

    room: str
    reason: str
    message: str | None = None
    """Why, in words, when the server said (a refused join)."""


@attrs.frozen
class PresenceChanged:
    presence: Presence


@attrs.frozen
class PongReceived:
    """``rtt_s``: now minus the ``t`` sent in the ping (milliseconds on the
    wire)."""

    t: int
    rtt_s: float


@attrs.frozen
class ServerError:
    """The server sent an ``error`` frame."""

    error: Error


ClientEvent: TypeAlias = (
    Welcomed
    | CallResult
    | RoomJoined
    | ReloadRequired
    | EventApplied
    | ResumeRequested
    | RoomLeft
    | PresenceChanged
    | PongReceived
    | ServerError
    | ProtocolViolation
)
