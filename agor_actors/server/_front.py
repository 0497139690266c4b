"""The one port's front: every accepted connection's request head is read
here, then the connection goes to our WebSocket (``/ws``: :mod:`._websocket`
over :mod:`._ws`) or to hypercorn (everything else: the quart-trio app).

Per connection, under ``head_timeout_s`` and within ``head_max_bytes``, the
front reads until the end of the request head (a blank line, as h11 finds
it).  A peer that sends nothing, or too little, is closed when the time is
up; one whose first line is not an HTTP request line gets 400 at once, one
whose head is too large 431; nothing of this reaches anything else.  The
bytes read (the head and whatever came with it) go to whoever serves the
connection next:

* ``GET /ws`` (with or without a query string): the head and what came after
  it to :func:`~._websocket.serve_websocket`, which answers the handshake
  (also by the head's deadline) and serves the connection on the socket
  itself (the transport writes without awaiting: :mod:`._ws`);
* a WebSocket handshake on another path: 404, "WebSocket connections are
  served at /ws" (hypercorn would answer a bare 400);
* anything else: hypercorn's own per-connection server
  (``hypercorn.trio.tcp_server.TCPServer``, as :class:`KeptAliveServer`:
  its keep-alive timer and close mended) over a :class:`ReplayStream`
  that receives those bytes again first, with
  the worker context and lifespan state that :mod:`._serve` keeps, exactly
  as hypercorn's ``worker_serve`` would run it.

Why drive ``TCPServer`` rather than keep ``worker_serve`` on a private
socket and proxy to it: a proxy is a second TCP connection, two more copy
tasks and buffers per HTTP connection, a hop of latency, and it hides the
client's address from the app; its own failure modes (the private listener's
backlog, half-closes, a stalled side holding the other) would need handling
too.  ``TCPServer`` is what ``worker_serve`` starts for each connection;
what it needs besides the stream (the app wrapped for ASGI, the config, a
``WorkerContext``, the lifespan state) is built once in :mod:`._serve`,
which also runs the quart app's lifespan and hypercorn's graceful shutdown
(``context.terminated``, then ``graceful_timeout``) as ``worker_serve``
does.  It does not check what it is given: the replayed stream has what it
uses of a ``trio.SocketStream`` (``socket``, ``send_eof``...).

Accepted sockets get ``TCP_NODELAY`` (and ``TCP_NOTSENT_LOWAT``) from
``trio.SocketStream`` and inherit ``TCP_USER_TIMEOUT`` from the listening
socket; the connection's task is its only task until it is routed.  A
refusal (400, 431) is followed by a short bounded read of what the peer
still sends, so that closing does not reset the connection under the reply.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
from typing import Any, Final, cast

import trio
from hypercorn.config import Config
from hypercorn.events import Event, RawData
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState

from ._settings import AppState
from ._websocket import serve_websocket

__all__ = ["Front", "HeadError", "KeptAliveServer", "ReplayStream", "read_head", "route"]

log = logging.getLogger("agor_actors.server")

_HEAD_END: Final = re.compile(rb"\n\r?\n")
_REQUEST_LINE: Final = re.compile(rb"([A-Z]{1,20}) ([\x21-\x7e]+) HTTP/[0-9](?:\.[0-9])?\r?\n")
_WS_TARGET: Final = re.compile(rb"(?:[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*)?/ws(?:\?.*)?")
_REPLY_TIMEOUT_S: Final = 1.0
_LINGER_READS: Final = 16
_LINGER_READ_BYTES: Final = 64 * 1024


def _reply(status: int, reason: str, body: bytes = b"") -> bytes:
    kind = "content-type: application/json\r\n" if body else ""
    head = (
        f"HTTP/1.1 {status} {reason}\r\n{kind}"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


_BAD_REQUEST: Final = _reply(
    400,
    "Bad Request",
    b'{"code":"bad_request","message":"not an HTTP/1.1 request","data":null}',
)
_TOO_LARGE: Final = _reply(
    431,
    "Request Header Fields Too Large",
    b'{"code":"bad_request","message":"the request\'s headers are too large","data":null}',
)
_URI_TOO_LONG: Final = _reply(
    414,
    "URI Too Long",
    b'{"code":"bad_request","message":"the request line is too long: a long query'
    b' goes in fewer, shorter parameters","data":null}',
)
_TARGET_START: Final = re.compile(rb"[A-Z]{1,20} [\x21-\x7e]+\Z")
"""The start of a request line that goes on (a long target)."""
_UPGRADE_WEBSOCKET: Final = re.compile(rb"\nupgrade:[ \t]*websocket[ \t]*\r?\n", re.IGNORECASE)
_WS_ELSEWHERE: Final = _reply(
    404,
    "Not Found",
    b'{"code":"not_found","message":"WebSocket connections are served at /ws","data":null}',
)


class ReplayStream(trio.abc.HalfCloseableStream):
    """A ``trio.SocketStream`` whose first bytes were already read: they are
    received again first, then everything is delegated.  ``on_close`` is a
    cancel scope to cancel when the stream is closed (by anyone)."""

    __slots__ = ("_prefix", "_stream", "on_close")

    def __init__(self, stream: Any, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix
        self.on_close: trio.CancelScope | None = None

    @property
    def socket(self) -> trio.socket.SocketType:
        return cast(trio.socket.SocketType, self._stream.socket)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        prefix = self._prefix
        if not prefix:
            return cast(bytes, await self._stream.receive_some(max_bytes))
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        await trio.lowlevel.checkpoint()
        if max_bytes is None or max_bytes >= len(prefix):
            self._prefix = b""
            return prefix
        self._prefix = prefix[max_bytes:]
        return prefix[:max_bytes]

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        scope, self.on_close = self.on_close, None
        if scope is not None:
            scope.cancel()
        await self._stream.aclose()


class KeptAliveServer(TCPServer):
    """hypercorn's per-connection server, whose connection changes are not
    lost to the app's cancellation.

    hypercorn makes them from the task that finished the response, which
    is the app's: after each response it (re)starts the connection's idle
    timer with ``nursery.start`` (the timer closes the connection after
    ``keep_alive_timeout``, or at once once ``context.terminated`` is set),
    and on shutdown it closes the connection (``send_eof``, ``aclose``).
    quart-trio cancels that task's nursery as soon as the request is over,
    so the timer could die at once (trio leaves a task started under a
    cancelled scope out of its nursery if the cancel comes before
    ``started()``) and the close could be cut at its first checkpoint: an
    idle keep-alive connection then stayed open for good and held every
    shutdown for the whole ``graceful_timeout``.  Here those changes are
    made shielded: a lock, a task started, a half close and a close, none
    of which waits on the peer.  (Bytes are sent as hypercorn sends them.)"""

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            await super().protocol_send(event)
            return
        with trio.CancelScope(shield=True):
            await super().protocol_send(event)


class HeadError(Exception):
    """The request head cannot be served: ``reply`` says why (or nothing)."""

    def __init__(self, reply: bytes | None) -> None:
        super().__init__(reply)
        self.reply = reply


class TlsReplayStream(ReplayStream):
    """A :class:`ReplayStream` over a ``trio.SSLStream`` whose handshake is
    done: what hypercorn asks of a TLS stream (the handshake, a no-op here;
    the protocol chosen, HTTP/1.1: the front reads HTTP/1 heads; the socket
    under it)."""

    __slots__ = ()

    async def do_handshake(self) -> None:
        await trio.lowlevel.checkpoint()

    def selected_alpn_protocol(self) -> str:
        return "http/1.1"

    @property
    def transport_stream(self) -> trio.SocketStream:
        return cast(trio.SocketStream, self._stream.transport_stream)

    @property
    def socket(self) -> trio.socket.SocketType:
        return self.transport_stream.socket

    async def send_eof(self) -> None:
        raise AttributeError("TLS streams have no half close")  # hypercorn expects this


async def read_head(stream: trio.abc.ReceiveStream, max_bytes: int) -> bytes:
    """Everything received up to the end of the request head (and whatever
    came with it).  Raises :class:`HeadError`: with no reply if the peer
    closed first, 400 if its first line is not a request line, 414 if that
    line is longer than ``max_bytes`` (a long query string), 431 if the
    head is."""
    received = bytearray()
    line_checked = False
    while True:
        data = await stream.receive_some(max_bytes)
        if not data:
            raise HeadError(None)
        scan_from = max(0, len(received) - 2)
        received += data
        if not received[:1].isupper():
            raise HeadError(_BAD_REQUEST)
        if not line_checked and b"\n" in received:
            if _REQUEST_LINE.match(received) is None:
                raise HeadError(_BAD_REQUEST)
            line_checked = True
        end = _HEAD_END.search(received, scan_from)
        if end is not None:
            if end.end() > max_bytes:
                raise HeadError(_TOO_LARGE)
            return bytes(received)
        if len(received) >= max_bytes:
            if line_checked:
                raise HeadError(_TOO_LARGE)
            long_target = _TARGET_START.match(bytes(received[:max_bytes]))
            raise HeadError(_URI_TOO_LONG if long_target else _BAD_REQUEST)


def route(head: bytes) -> str:
    """``"ws"`` for a ``GET /ws`` (with or without a query string, in
    origin or absolute form), else ``"http"``; ``head`` starts with a request line (see :func:`read_head`)."""
    line = _REQUEST_LINE.match(head)
    assert line is not None
    if line.group(1) == b"GET" and _WS_TARGET.fullmatch(line.group(2)):
        return "ws"
    return "http"


class Front:
    """What runs for each accepted connection (:meth:`handle`)."""

    def __init__(
        self,
        state: AppState,
        app: AppWrapper,
        config: Config,
        context: WorkerContext,
        connection_state: ConnectionState,
    ) -> None:
        self.state = state
        self.settings = state.settings
        self.app = app
        self.config = config
        self.context = context
        self.connection_state = connection_state
        self._reading: set[trio.CancelScope] = set()
        self._stopping = False
        self._http: set[trio.socket.SocketType] = set()

    def stop_reading_heads(self) -> None:
        """Shutdown: connections still sending their head are closed now."""
        self._stopping = True
        for scope in self._reading:
            scope.cancel()

    def cut_http(self) -> int:
        """Shutdown, once the graceful time is over: close the socket of
        every HTTP connection still served (how many).  hypercorn writes
        shielded from cancellation, so a client that stopped reading holds
        its connection, and the shutdown, until the kernel gives up on it
        (``TCP_USER_TIMEOUT``); a closed socket wakes the write at once."""
        cut = list(self._http)
        for sock in cut:
            sock.close()
        return len(cut)

    async def handle(self, sock: socket.socket) -> None:
        """One accepted (non-blocking) socket, until it is done; closes it.
        Never raises, except to be cancelled.  With TLS, the TLS handshake
        is made first, within the head's deadline."""
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        if self.state.tls is not None:
            stream = trio.SSLStream(stream, self.state.tls, server_side=True)
        try:
            await self._handle(stream, sock)
        except Exception:
            log.exception("a connection failed")
        finally:
            await trio.aclose_forcefully(stream)

    async def _handle(
        self, stream: trio.SocketStream | trio.SSLStream[trio.SocketStream], sock: socket.socket
    ) -> None:
        deadline = self.state.world.clock.now_s() + self.settings.head_timeout_s
        tls = stream if isinstance(stream, trio.SSLStream) else None
        if tls is not None and not await self._tls_handshake(tls, deadline):
            return
        head = await self._head(stream, deadline)
        if head is None:
            return
        end = _HEAD_END.search(head)
        assert end is not None  # read_head returns a whole head
        if route(head) == "ws":
            await serve_websocket(
                self.state, sock, head[: end.end()], head[end.end() :], deadline=deadline, tls=tls
            )
        elif _UPGRADE_WEBSOCKET.search(head, 0, end.end()):
            await self._refuse(stream, _WS_ELSEWHERE)  # the app has no WebSocket but /ws
        else:
            replay = ReplayStream(stream, head) if tls is None else TlsReplayStream(tls, head)
            del head  # the replay holds it until it is read, no longer
            server = KeptAliveServer(
                self.app, self.config, self.context, self.connection_state, cast(Any, replay)
            )
            plain = stream if tls is None else tls.transport_stream
            assert isinstance(plain, trio.SocketStream)
            self._http.add(plain.socket)
            try:
                await server.run()
            finally:
                self._http.discard(plain.socket)

    async def _tls_handshake(self, tls: trio.SSLStream[trio.SocketStream], deadline: float) -> bool:
        """The TLS handshake by ``deadline``; False (logged) if it failed."""
        with trio.CancelScope(deadline=deadline):
            try:
                await tls.do_handshake()
                return True
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                cause = exc.__cause__
                log.info("TLS handshake failed: %s", cause or exc)
        return False

    async def _head(
        self, stream: trio.SocketStream | trio.SSLStream[trio.SocketStream], deadline: float
    ) -> bytes | None:
        """The request head, or None (the connection is then done with)."""
        with trio.CancelScope(deadline=deadline) as scope:
            self._reading.add(scope)
            try:
                if self._stopping:
                    scope.cancel()
                return await read_head(stream, self.settings.head_max_bytes)
            except HeadError as exc:
                if exc.reply is not None:
                    await self._refuse(stream, exc.reply)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                self._reading.discard(scope)
        return None  # no complete head in time, or a bad one

    async def _refuse(
        self, stream: trio.SocketStream | trio.SSLStream[trio.SocketStream], reply: bytes
    ) -> None:
        """Send ``reply``, then read (and drop) what the peer still sends, for
        a moment: closing with unread data would reset the connection, and
        the reset can destroy the reply before the peer reads it."""
        with (
            trio.move_on_after(_REPLY_TIMEOUT_S),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            await stream.send_all(reply)
            if isinstance(stream, trio.SocketStream):  # TLS has no half close
                await stream.send_eof()
            for _ in range(_LINGER_READS):
                if not await stream.receive_some(_LINGER_READ_BYTES):
                    break
