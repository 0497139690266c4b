"""``/ws``: the handshake's decisions and one :class:`~._connection.Connection`
per accepted WebSocket (the transport is :mod:`._ws`).

* the codec is negotiated from the client's offer, and a WebSocket without a
  known subprotocol is refused with HTTP 400 (the JSON body says what to
  offer); an ``Origin`` not allowed (:func:`~._settings.origin_allowed`)
  gets 403 ``forbidden`` (and a security log line), a draining server 503
  ``unavailable``; a request wsproto finds is no WebSocket upgrade gets 400;
* no permessage-deflate: no extension is accepted;
* frames up to :func:`~._settings.ws_max_message_bytes` reach the protocol
  machine, which closes with 1009 and an error frame above the protocol's
  limit; larger messages are refused by the transport (1009).
"""

from __future__ import annotations

import logging
import socket

import orjson
import trio
from wsproto.events import Request

from protocols import Codec, negotiate

from ._connection import Connection
from ._settings import AppState, origin_allowed, ws_max_message_bytes
from ._ws import Accept, Refuse, handshake

__all__ = ["serve_websocket"]

security_log = logging.getLogger("agor_actors.security")


def _refusal(status: int, code: str, message: str) -> Refuse:
    return Refuse(status, orjson.dumps({"code": code, "message": message, "data": None}))


def decide(state: AppState, request: Request) -> Accept | Refuse:
    """Accept with the negotiated codec's subprotocol, or refuse."""
    origin: str | None = None
    for name, value in request.extra_headers:
        if name.lower() == b"origin":
            origin = value.decode("latin-1")
            break
    if not origin_allowed(origin, state.origins):
        security_log.warning(
            "origin refused",
            extra={"transport": "websocket", "origin": origin[:200] if origin else origin},
        )
        return _refusal(403, "forbidden", "origin not allowed")
    if state.draining:
        return _refusal(503, "unavailable", "the server is shutting down")
    codec = negotiate(list(request.subprotocols))
    if codec is None:
        offered = ", ".join(request.subprotocols) or "none"
        message = f"offer a subprotocol of {', '.join(c.value for c in Codec)}; offered: {offered}"
        return _refusal(400, "unsupported_protocol", message)
    return Accept(codec.subprotocol)


async def serve_websocket(
    state: AppState,
    sock: socket.socket,
    head: bytes,
    rest: bytes,
    *,
    deadline: float,
    tls: trio.SSLStream[trio.SocketStream] | None = None,
) -> None:
    """Answer the handshake in ``head`` by ``deadline``, then serve the
    connection until it closes (over ``tls``, the connection's TLS stream,
    if it has one).  The caller closes the socket."""
    transport = None
    with trio.CancelScope(deadline=deadline):
        transport = await handshake(
            sock,
            head,
            rest,
            lambda request: decide(state, request),
            max_message_bytes=ws_max_message_bytes(state.settings),
            close_timeout_s=state.settings.close_timeout_s,
            tls=tls,
        )
    if transport is None:
        return
    codec = negotiate([transport.subprotocol])
    assert codec is not None
    cookie = state.web.principal_from_headers(transport.headers) if state.web else None
    connection = Connection(state, transport, codec, cookie)
    state.connections.add(connection)
    if state.is_draining():  # the drain began while this one was accepted
        connection.go_away()
    try:
        await connection.run()
    finally:
        state.connections.discard(connection)
