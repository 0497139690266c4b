"""A trio-websocket client connection that owns (and always closes) its TCP
stream.

trio-websocket 0.12's ``open_websocket_url`` leaks the socket in two cases
the daemon produces on purpose: when the server refuses the handshake
(``ConnectionRejected``: an unknown subprotocol, a refused ``Origin``, a
draining server) and when the *server* closes the WebSocket (its client
waits for the TCP close, then neither the reader nor ``aclose`` closes the
stream).  Here the stream is opened first and wrapped with
``wrap_client_stream``, and closed on the way out whatever happened.

:class:`WebSocketDialer` is this opener as the world's
:class:`~agor_actors.world.Dialer`, the seam through which the client opens
its connections (the simulator's network is the other implementation).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast
from urllib.parse import urlsplit

import attrs
import trio
import trio_websocket

from ..world import DialFailed, TransportClosed

__all__ = ["WebSocketDialer", "WebSocketTransport", "dial_error", "open_websocket"]


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


class _Watched(trio.abc.Stream):
    """The stream under a client WebSocket, which notes (``ended``) when the
    peer closed it or it broke: trio-websocket's client waits for the
    server's handshake answer, and a connection cut before it (a TLS port
    spoken to in plain text, a server that died) would be waited out until
    the connect timeout."""

    __slots__ = ("_stream", "ended")

    def __init__(self, stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]) -> None:
        self._stream = stream
        self.ended = trio.Event()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        try:
            data = await self._stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.ended.set()
            raise
        if not data:
            self.ended.set()
        return bytes(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


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
                # now, not lazily on the first write: a failed handshake is
                # then this error, not a WebSocket closed mid-handshake that
                # trio-websocket waits out until the timeout
                try:
                    await stream.do_handshake()
                except trio.BrokenResourceError as exc:
                    await trio.aclose_forcefully(stream)
                    raise trio_websocket.HandshakeError() from (exc.__cause__ or exc)
            else:
                stream = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise trio_websocket.ConnectionTimeout() from None
    except OSError as exc:
        raise trio_websocket.HandshakeError() from exc
    watched = _Watched(stream)
    try:
        async with trio.open_nursery() as nursery:
            opened: list[trio_websocket.WebSocketConnection] = []

            async def handshake(race: trio.CancelScope) -> None:
                opened.append(
                    await trio_websocket.wrap_client_stream(
                        nursery,
                        cast(Any, watched),  # any trio stream works (its endpoint: a repr)
                        host_header,
                        resource,
                        subprotocols=subprotocols,
                        extra_headers=extra_headers,
                        max_message_size=max_message_size,
                    )
                )
                race.cancel()

            async def cut(race: trio.CancelScope) -> None:
                await watched.ended.wait()
                race.cancel()

            try:
                with trio.fail_after(connect_timeout_s):
                    async with trio.open_nursery() as race:
                        race.start_soon(handshake, race.cancel_scope)
                        race.start_soon(cut, race.cancel_scope)
            except trio.TooSlowError:
                raise trio_websocket.ConnectionTimeout() from None
            if not opened:  # trio-websocket would wait for the timeout
                cause = ConnectionError("the server closed the connection during the handshake")
                raise trio_websocket.HandshakeError() from cause
            ws = opened[0]
            try:
                yield ws
            finally:
                with trio.move_on_after(disconnect_timeout_s):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        inner = _unwrap(group)
        raise inner from inner.__cause__  # its cause says why (dial_error reads it)
    finally:
        await trio.aclose_forcefully(stream)


# ------------------------------------------------------------------ the seam


def _closed(exc: trio_websocket.ConnectionClosed) -> TransportClosed:
    reason = exc.reason
    if reason is None:
        return TransportClosed(1006, "")
    return TransportClosed(reason.code, reason.reason or "")


class WebSocketTransport:
    """A trio-websocket connection as the world's
    :class:`~agor_actors.world.MessageTransport`: its errors become
    :class:`~agor_actors.world.TransportClosed`."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws

    @property
    def subprotocol(self) -> str | None:
        return self.ws.subprotocol

    async def receive(self) -> bytes | str:
        """The next message.  A checkpoint; raises :class:`TransportClosed`
        with the close frame's code and reason (1006 without one)."""
        try:
            return await self.ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            raise _closed(exc) from None

    async def send(self, data: bytes | str) -> None:
        """Send one message; waits while the socket is busy.  A checkpoint;
        raises :class:`TransportClosed` once the connection is gone."""
        try:
            await self.ws.send_message(data)
        except trio_websocket.ConnectionClosed as exc:
            raise _closed(exc) from None
        except (trio.BrokenResourceError, OSError) as exc:
            raise TransportClosed(1006, f"send failed: {exc!r}") from None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """The closing handshake (trio-websocket bounds the wait)."""
        await self.ws.aclose(code, reason)


def dial_error(exc: BaseException) -> DialFailed:
    """What went wrong opening a WebSocket, in words."""
    if isinstance(exc, trio_websocket.ConnectionRejected):
        body = exc.body or b""
        text = f"refused the WebSocket ({exc.status_code}): {body.decode('utf-8', 'replace')}"
        return DialFailed("refused", text.rstrip(": "), status=exc.status_code, body=body)
    if isinstance(exc, trio_websocket.ConnectionTimeout):
        return DialFailed("timeout", "no answer in time")
    cause = exc.__cause__ if isinstance(exc, trio_websocket.HandshakeError) else exc
    # trio's "all attempts to connect ... failed" holds each attempt's error
    attempts = cause.__cause__ if cause is not None else None
    if isinstance(attempts, BaseExceptionGroup) and isinstance(attempts.exceptions[0], OSError):
        cause = attempts.exceptions[0]
    if isinstance(cause, ssl.SSLError):
        detail = cause.reason or str(cause)
        reason = f"TLS handshake failed: {detail.lower().replace('_', ' ')}"
        if cause.reason == "WRONG_VERSION_NUMBER":
            reason += " (the server does not speak TLS there: a ws:// URL?)"
        elif isinstance(cause, ssl.SSLCertVerificationError):
            reason = f"TLS handshake failed: {cause.verify_message or detail}"
    elif isinstance(cause, OSError) and (cause.errno or cause.strerror):
        errno = cause.errno or 0  # negative for getaddrinfo's errors
        text = os.strerror(errno) if errno > 0 else str(cause.strerror)
        reason = text[0].lower() + text[1:]
    elif cause is not None and str(cause):
        reason = str(cause)
    else:
        reason = type(exc).__name__
    return DialFailed("unreachable", reason)


@attrs.frozen
class WebSocketDialer:
    """The real :class:`~agor_actors.world.Dialer`: a WebSocket over TCP (or
    TLS for ``wss://``) with trio-websocket, through :func:`open_websocket`.
    Refusals, timeouts and socket errors while opening raise
    :class:`~agor_actors.world.DialFailed`."""

    max_message_size: int = 16 << 20
    disconnect_timeout_s: float = 2.0
    ssl_context: ssl.SSLContext | None = None

    @asynccontextmanager
    async def dial(
        self,
        url: str,
        *,
        subprotocols: Sequence[str],
        headers: Sequence[tuple[str, str]] = (),
        connect_timeout_s: float = 10.0,
    ) -> AsyncIterator[WebSocketTransport]:
        opened = False
        try:
            async with open_websocket(
                url,
                subprotocols=list(subprotocols),
                extra_headers=[(k.encode(), v.encode()) for k, v in headers] or None,
                connect_timeout_s=connect_timeout_s,
                disconnect_timeout_s=self.disconnect_timeout_s,
                max_message_size=self.max_message_size,
                ssl_context=self.ssl_context,
            ) as ws:
                opened = True
                yield WebSocketTransport(ws)
        except (trio_websocket.HandshakeError, trio_websocket.ConnectionClosed, OSError) as exc:
            if opened:
                raise
            raise dial_error(exc) from exc
