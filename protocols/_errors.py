"""Error codes, the table that maps each code to a WebSocket close code, and the
two exception types of the protocol.

* :class:`ProtocolError` is what the *peer* did wrong (bad bytes, a message the
  state does not allow, a limit exceeded).  Decoding and the connection
  machines raise or report nothing else, whatever the input.
* :class:`LocalProtocolError` is what *this* side did wrong (a result for a
  call that is not pending, a send in the wrong state, data that cannot be
  encoded).  It is a bug in the caller, so it is deliberately not a subclass of
  :class:`ProtocolError`: code that handles the peer's mistakes never swallows
  its own.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

__all__ = [
    "CLOSE_CODES",
    "CloseCode",
    "ErrorCode",
    "LocalProtocolError",
    "ProtocolError",
    "close_code_for",
]


class CloseCode(enum.IntEnum):
    """WebSocket close codes used by the protocol (RFC 6455 section 7.4 and the
    private range 4000-4999)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    INVALID_PAYLOAD = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    HEARTBEAT_TIMEOUT = 4000
    UNAUTHORIZED = 4001
    TOKEN_EXPIRED = 4002


class ErrorCode(enum.StrEnum):
    """Stable error codes.  The string value is what goes on the wire (in
    ``error`` frames, in ``result.error.code``, in ``left.reason``)."""

    # The frame itself is unusable: the connection closes.
    BAD_FRAME = "bad_frame"
    BAD_JSON = "bad_json"
    BAD_CBOR = "bad_cbor"
    BAD_UTF8 = "bad_utf8"
    WRONG_FRAME_KIND = "wrong_frame_kind"
    FRAME_TOO_LARGE = "frame_too_large"
    BATCH_TOO_LARGE = "batch_too_large"
    TOO_DEEP = "too_deep"
    # The conversation is broken: the connection closes.
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"
    NOT_AUTHENTICATED = "not_authenticated"
    UNAUTHORIZED = "unauthorized"
    TOKEN_EXPIRED = "token_expired"
    INVALID_STATE = "invalid_state"
    DUPLICATE_REF = "duplicate_ref"
    FLOOD = "flood"
    SERVER_ERROR = "server_error"
    GOING_AWAY = "going_away"
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    # One message failed: an error frame (or an error result), the connection stays open.
    UNKNOWN_TYPE = "unknown_type"
    INVALID_FIELD = "invalid_field"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_PENDING = "too_many_pending"
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
    UNKNOWN_REF = "unknown_ref"
    # Answers of the services to one call or one join.
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    INVALID_DATA = "invalid_data"
    INTERNAL = "internal"
    CONNECTION_LOST = "connection_lost"


_CLOSE: dict[ErrorCode, CloseCode | None] = {
    ErrorCode.BAD_FRAME: CloseCode.INVALID_PAYLOAD,
    ErrorCode.BAD_JSON: CloseCode.INVALID_PAYLOAD,
    ErrorCode.BAD_CBOR: CloseCode.INVALID_PAYLOAD,
    ErrorCode.BAD_UTF8: CloseCode.INVALID_PAYLOAD,
    ErrorCode.WRONG_FRAME_KIND: CloseCode.UNSUPPORTED_DATA,
    ErrorCode.FRAME_TOO_LARGE: CloseCode.MESSAGE_TOO_BIG,
    ErrorCode.BATCH_TOO_LARGE: CloseCode.MESSAGE_TOO_BIG,
    ErrorCode.TOO_DEEP: CloseCode.POLICY_VIOLATION,
    ErrorCode.UNSUPPORTED_PROTOCOL: CloseCode.PROTOCOL_ERROR,
    ErrorCode.NOT_AUTHENTICATED: CloseCode.UNAUTHORIZED,
    ErrorCode.UNAUTHORIZED: CloseCode.UNAUTHORIZED,
    ErrorCode.TOKEN_EXPIRED: CloseCode.TOKEN_EXPIRED,
    ErrorCode.INVALID_STATE: CloseCode.PROTOCOL_ERROR,
    ErrorCode.DUPLICATE_REF: CloseCode.PROTOCOL_ERROR,
    ErrorCode.FLOOD: CloseCode.POLICY_VIOLATION,
    ErrorCode.SERVER_ERROR: CloseCode.INTERNAL_ERROR,
    ErrorCode.GOING_AWAY: CloseCode.GOING_AWAY,
    ErrorCode.HEARTBEAT_TIMEOUT: CloseCode.HEARTBEAT_TIMEOUT,
    ErrorCode.TOO_MANY_CONNECTIONS: CloseCode.POLICY_VIOLATION,
    ErrorCode.UNKNOWN_TYPE: None,
    ErrorCode.INVALID_FIELD: None,
    ErrorCode.RATE_LIMITED: None,
    ErrorCode.TOO_MANY_PENDING: None,
    ErrorCode.TOO_MANY_SUBSCRIPTIONS: None,
    ErrorCode.UNKNOWN_REF: None,
    ErrorCode.FORBIDDEN: None,
    ErrorCode.NOT_FOUND: None,
    ErrorCode.CONFLICT: None,
    ErrorCode.INVALID_DATA: None,
    ErrorCode.INTERNAL: None,
    ErrorCode.CONNECTION_LOST: None,
}

CLOSE_CODES: Final[Mapping[ErrorCode, CloseCode | None]] = MappingProxyType(_CLOSE)
"""Each error code and what it does to the connection: the WebSocket close code
the connection is closed with, or ``None`` for "error frame only, the
connection stays open"."""

# Recoverable errors that happen before the handshake is complete still close
# the connection (there is no session to keep open); this is the close code.
PRE_HANDSHAKE_CLOSE: Final = CloseCode.PROTOCOL_ERROR


def close_code_for(code: ErrorCode) -> CloseCode | None:
    """The close code of ``code`` (``None``: the connection stays open)."""
    return _CLOSE[code]


class ProtocolError(Exception):
    """The peer broke the protocol.

    ``code`` is stable and goes on the wire; ``message`` is for humans.
    ``ref`` is the ``ref`` of the call the error concerns, when one could be
    read from the offending message, so that the call can be answered with an
    error result instead of leaving it pending; ``data`` goes in that
    result's ``error.data`` (``rate_limited``: ``{"retry_after_ms": n}``).
    """

    code: ErrorCode
    message: str
    ref: int | None
    data: Any

    def __init__(
        self, code: ErrorCode, message: str, *, ref: int | None = None, data: Any = None
    ) -> None:
        super().__init__(code, message)
        self.code = ErrorCode(code)
        self.message = message
        self.ref = ref
        self.data = data

    @property
    def close_code(self) -> CloseCode | None:
        """The WebSocket close code that goes with this error (``None``: the
        connection stays open)."""
        return _CLOSE[self.code]

    @property
    def fatal(self) -> bool:
        return _CLOSE[self.code] is not None

    @property
    def close_reason(self) -> str:
        """A close reason that fits in a close frame (at most 123 bytes)."""
        return _truncate_utf8(f"{self.code}: {self.message}", 123)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"ProtocolError({self.code.value!r}, {self.message!r}, ref={self.ref!r})"


class LocalProtocolError(Exception):
    """This side misused the protocol API (a bug in the caller, not in the peer).

    ``code`` is set when the misuse matches a protocol limit, for example
    :attr:`ErrorCode.TOO_MANY_PENDING` when a client calls with too many calls
    pending, so that a caller can tell "wait and retry" from a plain bug.
    """

    code: ErrorCode | None

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.code = code


def _truncate_utf8(text: str, max_bytes: int) -> str:
    raw = text.encode("utf-8", "replace")
    if len(raw) <= max_bytes:
        return text
    return raw[:max_bytes].decode("utf-8", "ignore")
