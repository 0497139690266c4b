"""A trio-websocket client connection that owns (and always closes) its TCP
stream.

trio-websocket 0.12's ``open_websocket_url`` leaks the socket in two cases
the daemon produces on purpose: when the server refuses the handshake
(``ConnectionRejected``: an unknown subprotocol, a refused ``Origin``, a
draining server) and when the *server* closes the WebSocket (its client
waits for the TCP close, then neither the reader nor ``aclose`` closes the
stream).  Here the stream is opened first and wrapped with
``wrap_client_stream``, and closed on the way out whatever happened.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import trio
import trio_websocket

__all__ = ["open_websocket"]


def _target(url: str) -> tuple[str, int, str, str, bool]:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    secure = parts.scheme == "wss"
    host = parts.hostname
    port = parts.port or (443 if secure else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port in (80, 443) else f"{shown}:{port}"
    return host, port, resource, host_header, secure


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception of a nursery's group (groups of several stay)."""
    while isinstance(group, BaseExceptionGroup) and len(group.exceptions) == 1:
        inner = group.exceptions[0]
        if not isinstance(inner, BaseExceptionGroup):
            return inner
        group = inner
    return group


@asynccontextmanager
async def open_websocket(
    url: str,
    *,
    subprotocols: list[str],
    extra_headers: list[tuple[bytes, bytes]] | None = None,
    connect_timeout_s: float = 10.0,
    disconnect_timeout_s: float = 2.0,
    max_message_size: int = 16 << 20,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """Connect to ``url`` offering ``subprotocols``; close on exit (1000, or
    at once when cancelled).  Raises what ``open_websocket_url`` raises:
    ``ConnectionRejected``, ``ConnectionTimeout``, ``HandshakeError`` (for
    ``OSError`` while connecting)."""
    host, port, resource, host_header, secure = _target(url)
    try:
        with trio.fail_after(connect_timeout_s):
            if secure:
                stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
                stream = await trio.open_ssl_over_tcp_stream(
                    host,
                    port,
                    ssl_context=ssl_context or ssl.create_default_context(),
                    https_compatible=True,
                )
            else:
                stream = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise trio_websocket.ConnectionTimeout() from None
    except OSError as exc:
        raise trio_websocket.HandshakeError() from exc
    try:
        async with trio.open_nursery() as nursery:
            try:
                with trio.fail_after(connect_timeout_s):
                    ws = await trio_websocket.wrap_client_stream(
                        nursery,
                        stream,
                        host_header,
                        resource,
                        subprotocols=subprotocols,
                        extra_headers=extra_headers,
                        max_message_size=max_message_size,
                    )
            except trio.TooSlowError:
                raise trio_websocket.ConnectionTimeout() from None
            try:
                yield ws
            finally:
                with trio.move_on_after(disconnect_timeout_s):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise _unwrap(group) from None
    finally:
        await trio.aclose_forcefully(stream)
