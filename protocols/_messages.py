"""The messages of protocol version 1, as frozen attrs classes.

Every message is a map with a ``type`` on the wire; ``TYPE`` holds it.  Field
rules that keep the encoding simple and the frames small:

* a field without a default is required on the wire;
* every optional field defaults to ``None`` and is omitted from the encoded map
  when it is ``None`` (absent and ``null`` decode the same);
* unknown fields are ignored on decode, so fields can be added without breaking
  older peers.  Fields are never renamed.

``presence`` is a type in both directions (:class:`PresenceUpdate` from the
client, :class:`Presence` from the server), so decoding needs to know which way
a frame goes: see ``decode_client_frame`` and ``decode_server_frame``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Final, TypeAlias

import attrs

__all__ = [
    "CLIENT_MESSAGE_TYPES",
    "MAX_IDEMPOTENCY_KEY_CHARS",
    "MAX_REF",
    "MAX_ROOM_CHARS",
    "PROTOCOL_VERSION",
    "SERVER_MESSAGE_TYPES",
    "Auth",
    "Call",
    "ClientMessage",
    "Cursor",
    "Error",
    "ErrorInfo",
    "Event",
    "Hello",
    "Join",
    "Joined",
    "Lagged",
    "Leave",
    "Left",
    "Message",
    "Ping",
    "Pong",
    "Presence",
    "PresenceUpdate",
    "Result",
    "ServerMessage",
    "Since",
    "Viewport",
    "Welcome",
]

PROTOCOL_VERSION: Final = 1
MAX_REF: Final = 2**53 - 1
"""Largest call ``ref`` (the largest integer a JavaScript number holds exactly)."""
MAX_ROOM_CHARS: Final = 256
MAX_IDEMPOTENCY_KEY_CHARS: Final = 128


def _ref(_inst: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 0 <= value <= MAX_REF:
        raise ValueError(f"{attribute.name} must be in [0, 2**53-1], got {value}")


def _non_negative(_inst: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


def _room(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not 0 < len(value) <= MAX_ROOM_CHARS:
        raise ValueError(f"{attribute.name} must have 1 to {MAX_ROOM_CHARS} characters")


def _short_text(_inst: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    """A presence field that names a board, a room or a user: at most a
    room name long (every subscriber of the board gets it, at each change)."""
    if value is not None and len(value) > MAX_ROOM_CHARS:
        raise ValueError(f"{attribute.name} must have at most {MAX_ROOM_CHARS} characters")


def _idempotency_key(_inst: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and not 0 < len(value) <= MAX_IDEMPOTENCY_KEY_CHARS:
        raise ValueError(f"{attribute.name} must have 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters")


# ----------------------------------------------------------------- parts of messages


@attrs.frozen
class Since:
    """Where a client stands in a room: the room's ``epoch`` and the last
    ``seq`` it applied (0: none yet)."""

    epoch: str
    seq: int = attrs.field(validator=_non_negative)


@attrs.frozen
class Cursor:
    x: float
    y: float


@attrs.frozen
class Viewport:
    x: float
    y: float
    w: float
    h: float
    zoom: float


@attrs.frozen
class ErrorInfo:
    """Why a call failed: a stable ``code`` (see ``ErrorCode``), a ``message``
    for humans and optional ``data`` (for ``conflict``: the current value)."""

    code: str
    message: str
    data: Any = None


# ------------------------------------------------------------------ client -> server


@attrs.frozen
class Hello:
    """First message of a connection: the protocol version, the token and the
    client's stable id (one per browser tab or process, kept across
    reconnects)."""

    TYPE: ClassVar[str] = "hello"
    protocol: int
    token: str | None = None
    client_id: str | None = None


@attrs.frozen
class Call:
    """A service call; ``ref`` (chosen by the client, unique among its pending
    calls) correlates the :class:`Result`."""

    TYPE: ClassVar[str] = "call"
    ref: int = attrs.field(validator=_ref)
    service: str
    method: str
    id: str | None = None
    data: Any = None
    query: dict[str, Any] | None = None
    temp_id: str | None = None
    base_rev: int | None = None
    idempotency_key: str | None = attrs.field(default=None, validator=_idempotency_key)
    """The caller's name for this write, unique among its user's writes: a
    write sent again under the same key (after the connection dropped before
    its result came) is not run again; its first result is answered."""


@attrs.frozen
class Auth:
    """Re-authenticate an open connection in band with a new ``token`` of
    the same user (an access token about to expire: the refreshed one).
    Answered by the :class:`Result` with the same ``ref`` (``data``:
    ``{user_id, expires_at}``), which shares the refs of calls."""

    TYPE: ClassVar[str] = "auth"
    ref: int = attrs.field(validator=_ref)
    token: str


@attrs.frozen
class Join:
    """Subscribe to a room (``session:<id>``, ``board:<id>``, ``activity:<board id>``);
    with ``since``, resume after the last applied ``seq``."""

    TYPE: ClassVar[str] = "join"
    room: str = attrs.field(validator=_room)
    since: Since | None = None


@attrs.frozen
class Leave:
    TYPE: ClassVar[str] = "leave"
    room: str = attrs.field(validator=_room)


@attrs.frozen
class PresenceUpdate:
    """The client's own presence; any subset of the fields, omitted fields are
    unchanged.  Lossy: a lost update is replaced by the next.  ``follow`` names
    the user whose viewport to follow (``""`` stops following);
    ``hide_cursors`` asks the server not to send other users' cursors."""

    TYPE: ClassVar[str] = "presence"
    board: str | None = attrs.field(default=None, validator=_short_text)
    cursor: Cursor | None = None
    viewport: Viewport | None = None
    view: str | None = attrs.field(default=None, validator=_short_text)
    typing: bool | None = None
    hide_cursors: bool | None = None
    follow: str | None = attrs.field(default=None, validator=_short_text)


@attrs.frozen
class Ping:
    """``t`` is opaque to the server (the client's clock in milliseconds) and
    comes back in :class:`Pong`."""

    TYPE: ClassVar[str] = "ping"
    t: int


# ------------------------------------------------------------------ server -> client


@attrs.frozen
class Welcome:
    """The handshake succeeded.  ``heartbeat_ms``: the client pings at least
    this often; ``limits``: the server's limits (see ``Limits.to_wire``);
    ``expires_at``: when the token expires (ms since the Unix epoch; absent:
    it does not), after which the connection is closed with
    ``token_expired`` (4002) unless an :class:`Auth` renewed it."""

    TYPE: ClassVar[str] = "welcome"
    connection_id: str
    user_id: str
    heartbeat_ms: int
    limits: dict[str, Any]
    expires_at: int | None = None


@attrs.frozen
class Result:
    """The answer to the :class:`Call` with the same ``ref``: ``ok`` and
    ``data``, or not ``ok`` and ``error``."""

    TYPE: ClassVar[str] = "result"
    ref: int = attrs.field(validator=_ref)
    ok: bool
    data: Any = None
    error: ErrorInfo | None = None

    def __attrs_post_init__(self) -> None:
        if self.ok == (self.error is not None):
            raise ValueError("a result has an error exactly when ok is false")


@attrs.frozen
class Joined:
    """The answer to a :class:`Join`.  ``seq`` is the room's last seq when the
    join took effect.  ``recovered``: the events after ``since.seq`` follow, in
    order; otherwise the client reloads the room's state as of ``seq`` and the
    next event is ``seq + 1``."""

    TYPE: ClassVar[str] = "joined"
    room: str = attrs.field(validator=_room)
    epoch: str
    seq: int = attrs.field(validator=_non_negative)
    recovered: bool


@attrs.frozen
class Event:
    """One event of a room.  ``seq`` is gap-free per room; an event that merges
    several (consecutive chunks of one streamed message) covers
    ``seq..last_seq``.  ``ts`` is milliseconds since the Unix epoch, ``origin``
    the connection id that caused it, ``temp_id`` the id of the caller's
    optimistic copy."""

    TYPE: ClassVar[str] = "event"
    room: str = attrs.field(validator=_room)
    seq: int = attrs.field(validator=_non_negative)
    event: str
    data: Any = None
    ts: int | None = None
    user_id: str | None = None
    origin: str | None = None
    temp_id: str | None = None
    last_seq: int | None = None

    def __attrs_post_init__(self) -> None:
        if self.last_seq is not None and self.last_seq < self.seq:
            raise ValueError("last_seq must be >= seq")

    @property
    def end_seq(self) -> int:
        """The last seq this event covers."""
        return self.seq if self.last_seq is None else self.last_seq


@attrs.frozen
class Presence:
    """Presence on a board, at most 30 frames per second, culled to the
    client's viewport.  ``users``: when present, everyone on the board (the
    list replaces the previous one); ``cursors``: the latest cursor of each user
    that moved since the previous frame; ``viewport``: the viewport of the user
    this client follows; ``highlights``: ``action:highlight`` entries (action
    id, user id and color, target type and id, action) of the board's latest
    reliable actions, for the flash on the changed card."""

    TYPE: ClassVar[str] = "presence"
    board: str
    users: list[dict[str, Any]] | None = None
    cursors: list[dict[str, Any]] | None = None
    viewport: Viewport | None = None
    highlights: list[dict[str, Any]] | None = None


@attrs.frozen
class Lagged:
    """The server dropped this client's backlog for ``room``: events from
    ``resume_from`` on were not sent.  The client rejoins with ``since``."""

    TYPE: ClassVar[str] = "lagged"
    room: str = attrs.field(validator=_room)
    resume_from: int = attrs.field(validator=_non_negative)


@attrs.frozen
class Left:
    """The client is no longer in ``room``: ``reason`` is ``"left"`` after a
    :class:`Leave`, otherwise an error code (``forbidden``, ``not_found``,
    ``too_many_subscriptions``, ``rate_limited``...); ``message`` says why
    in words when a join was refused."""

    TYPE: ClassVar[str] = "left"
    room: str = attrs.field(validator=_room)
    reason: str
    message: str | None = None


@attrs.frozen
class Error:
    """An error about the connection or a message that has no ``ref``."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str


@attrs.frozen
class Pong:
    TYPE: ClassVar[str] = "pong"
    t: int


ClientMessage: TypeAlias = Hello | Call | Auth | Join | Leave | PresenceUpdate | Ping
ServerMessage: TypeAlias = (
    Welcome | Result | Joined | Event | Presence | Lagged | Left | Error | Pong
)
Message: TypeAlias = ClientMessage | ServerMessage

_CLIENT_CLASSES: tuple[type[ClientMessage], ...] = (
    Hello,
    Call,
    Auth,
    Join,
    Leave,
    PresenceUpdate,
    Ping,
)
_SERVER_CLASSES: tuple[type[ServerMessage], ...] = (
    Welcome,
    Result,
    Joined,
    Event,
    Presence,
    Lagged,
    Left,
    Error,
    Pong,
)

CLIENT_MESSAGE_TYPES: Final[Mapping[str, type[ClientMessage]]] = MappingProxyType(
    {cls.TYPE: cls for cls in _CLIENT_CLASSES}
)
"""Wire type -> class, for what the client sends."""
SERVER_MESSAGE_TYPES: Final[Mapping[str, type[ServerMessage]]] = MappingProxyType(
    {cls.TYPE: cls for cls in _SERVER_CLASSES}
)
"""Wire type -> class, for what the server sends."""
