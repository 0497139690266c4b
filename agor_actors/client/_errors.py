"""The errors a call, a join or a connect raises."""

from __future__ import annotations

from typing import Any

from protocols import ErrorCode

__all__ = ["CallError", "ClientClosed", "ConnectionLost"]


class CallError(Exception):
    """A call, a join or a connect that the server refused: ``code`` is one
    of the protocol's error codes (``not_found``, ``conflict``...), ``data``
    its details (for ``conflict``: the current value)."""

    def __init__(self, code: str, message: str, data: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.data = data


class ConnectionLost(CallError):
    """The connection dropped while the call was in flight: it may or may not
    have run."""

    def __init__(self, message: str = "the connection was lost") -> None:
        super().__init__(ErrorCode.CONNECTION_LOST.value, message)


class ClientClosed(CallError):
    """The client is closed (by :meth:`Client.aclose`, or for good after the
    server refused its token)."""

    def __init__(self, message: str = "the client is closed") -> None:
        super().__init__("closed", message)
