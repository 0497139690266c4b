"""``/ws``'s transport: the WebSocket protocol (wsproto) driven over the
connection's own non-blocking socket.

Why not trio-websocket here (it is the client's library): its send path is a
lock, wsproto's framing and ``send_all`` with its checkpoints for every
message to every subscriber, and its reader is a task and a channel of its
own per connection.  Server frames are unmasked, so the bytes of a frame are
the same for every connection: a room's batch is framed once
(:func:`wire_bytes`) and :meth:`WsTransport.try_send` writes those bytes to
each subscriber's socket at once, in the caller, without awaiting: a
``send`` that the kernel takes whole costs one syscall and no task switch.
What the kernel does not take (a reader slower than we write) stays as the
transport's *tail*, at most one frame plus control frames; until it is
written the transport is busy and the connection's writer waits in
:meth:`WsTransport.wait_writable`.

Receiving: ``receive`` reads the socket (64 KiB at a time) into wsproto and
returns one message at a time; a message longer than ``max_message_bytes``
closes the connection with 1009.  Pings are answered, a close from the peer
is answered and ends the connection (:class:`~agor_actors.world.TransportClosed`).

The handshake (:func:`handshake`) runs over the head the front already
read: wsproto checks the upgrade, the caller decides (a subprotocol, or a
refusal with a status and a JSON body), and bytes that came after the head
are fed to the connection once it is open.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import attrs
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import FrameProtocol
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from ..world import OutFrame, TransportClosed

__all__ = ["Accept", "Refuse", "TlsWsTransport", "WsTransport", "handshake", "wire_bytes"]

RECV_BYTES: Final = 64 * 1024
"""One read of the socket; also what a burst of received messages holds."""

CONTROL_TAIL_BYTES_MAX: Final = 64 * 1024
"""Control frames (pongs) queued behind a busy socket: beyond this the peer
floods pings without reading, and the connection is closed (1008)."""

_FRAMER: Final = FrameProtocol(client=False, extensions=[])


def wire_bytes(frame: OutFrame) -> bytes:
    """The unmasked server frame of ``frame``'s payload (text for ``str``,
    binary for ``bytes``), computed once and cached on ``frame``."""
    wire = frame.wire
    if wire is None:
        wire = frame.wire = bytes(_FRAMER.send_data(frame.payload, fin=True))
    return wire


@attrs.frozen
class Accept:
    subprotocol: str


@attrs.frozen
class Refuse:
    status: int
    body: bytes  # JSON


class WsTransport:
    """One open server WebSocket on a non-blocking socket
    (:class:`~agor_actors.world.PeerTransport`)."""

    __slots__ = (
        "_broken",
        "_close_timeout_s",
        "_eof",
        "_max_message_bytes",
        "_messages",
        "_more",
        "_parts",
        "_parts_bytes",
        "_sock",
        "_tail",
        "_ws",
        "headers",
        "subprotocol",
    )

    def __init__(
        self,
        sock: socket.socket,
        ws: WSConnection,
        *,
        max_message_bytes: int,
        close_timeout_s: float,
        subprotocol: str,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        self.subprotocol = subprotocol
        self.headers = headers
        """The handshake request's headers."""
        self._sock = sock
        self._ws = ws
        self._max_message_bytes = max_message_bytes
        self._close_timeout_s = close_timeout_s
        self._messages: deque[bytes | str] = deque()
        self._parts: list[bytes | str] = []
        self._parts_bytes = 0
        self._tail = b""
        self._more = True  # the last read filled the buffer: more may be waiting
        self._broken = False
        self._eof: TransportClosed | None = None

    # ---------------------------------------------------------------- sending

    def try_send(self, frame: OutFrame) -> bool:
        if self._tail:
            return False
        if self._broken:
            return True  # the peer is gone: the receive side reports it
        self._write(wire_bytes(frame))
        return True

    @property
    def pending(self) -> bool:
        return bool(self._tail)

    def _write(self, data: bytes) -> None:
        """Write what the kernel takes now; keep the rest as the tail."""
        if self._tail:
            self._tail += data
            return
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._broken = True
            return
        if sent < len(data):
            self._tail = data[sent:]

    async def wait_writable(self) -> None:
        """Write the tail as the socket takes it.  A checkpoint; if the peer
        is gone, returns (the receive side reports it)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while self._tail and not self._broken:
            try:
                sent = self._sock.send(self._tail)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._sock)
                continue
            except OSError:
                self._broken = True
                break
            self._tail = self._tail[sent:]
        if self._broken:
            self._tail = b""
        await trio.lowlevel.cancel_shielded_checkpoint()

    def _send_control(self, data: bytes) -> None:
        if self._broken:
            return
        if len(self._tail) > CONTROL_TAIL_BYTES_MAX:
            self._eof = TransportClosed(1008, "flood: pings not read")
            self._broken = True
            return
        self._write(data)

    # -------------------------------------------------------------- receiving

    def peer_gone(self) -> bool:
        """Whether the peer is seen gone now: closed, reset, or its close or
        EOF among what has arrived.  Reads ahead without waiting, once
        (``RECV_BYTES``), and only while no message is queued, so what it
        queues is bounded; False when it cannot tell."""
        if self._eof is not None or self._broken:
            return True
        if self._messages:
            return False
        try:
            data = self._read_now()
        except OSError:
            data = b""  # any other error: as good as gone
        if data is None:
            return False
        self._feed(data)
        return self._eof is not None

    async def receive(self) -> bytes | str:
        """The next message; a checkpoint when it has to read.  Raises
        :class:`TransportClosed` once the peer is gone, closed, or broke the
        protocol (the close frame is sent)."""
        while not self._messages:
            if self._eof is not None:
                raise self._eof
            data = await self._recv()
            self._feed(data)
        return self._messages.popleft()

    async def _recv(self) -> bytes:
        """One read of the socket (``b""``: the peer closed).  A checkpoint.
        After a read that did not fill the buffer the socket is most likely
        drained: then it waits for readability first rather than paying for
        a read that fails (``EAGAIN``)."""
        waited = False
        if not self._more:
            await trio.lowlevel.wait_readable(self._sock)
            waited = True
        while (data := self._read_now()) is None:
            waited = True
            await trio.lowlevel.wait_readable(self._sock)
        if not waited:
            await trio.lowlevel.checkpoint()
        return data

    def _read_now(self) -> bytes | None:
        """One read of the socket without waiting: None if nothing has
        arrived, ``b""`` if the peer closed or reset it."""
        try:
            data = self._sock.recv(RECV_BYTES)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE):
                raise
            data = b""
        self._more = len(data) == RECV_BYTES
        return data

    def _feed(self, data: bytes) -> None:
        """``data`` (``b""``: the peer closed) into wsproto; messages queued."""
        ws = self._ws
        try:
            ws.receive_data(data or None)
            for event in ws.events():
                if isinstance(event, TextMessage):
                    self._part(event.data, event.message_finished)
                elif isinstance(event, BytesMessage):
                    self._part(bytes(event.data), event.message_finished)
                elif isinstance(event, Ping):
                    self._send_control(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    if ws.state is ConnectionState.REMOTE_CLOSING:
                        self._send_control(ws.send(event.response()))
                    self._eof = TransportClosed(event.code, event.reason or "")
        except RemoteProtocolError as exc:
            self._fail(1002, str(exc) or "protocol error")
        if not data and self._eof is None:
            self._eof = TransportClosed(1006, "the peer closed the connection")

    def _part(self, data: bytes | str, finished: bool) -> None:
        self._parts_bytes += len(data)
        if self._parts_bytes > self._max_message_bytes:
            self._fail(1009, f"message larger than {self._max_message_bytes} bytes")
            return
        if finished and not self._parts:
            self._messages.append(data)
        else:
            self._parts.append(data)
            if finished:
                first = self._parts[0]
                joined: bytes | str = (
                    "".join(p for p in self._parts if isinstance(p, str))
                    if isinstance(first, str)
                    else b"".join(p for p in self._parts if isinstance(p, bytes))
                )
                self._messages.append(joined)
                self._parts = []
        if finished:
            self._parts_bytes = 0

    def _fail(self, code: int, reason: str) -> None:
        """The peer broke the protocol: close with ``code``; nothing more is read."""
        self._messages.clear()
        self._parts = []
        if self._ws.state is ConnectionState.OPEN:
            self._send_control(self._ws.send(CloseConnection(code, reason[:120])))
        self._eof = TransportClosed(code, reason)

    # ---------------------------------------------------------------- closing

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send the close frame and wait for the peer's (or its EOF), at most
        ``close_timeout_s``; the caller closes the socket."""
        with trio.move_on_after(self._close_timeout_s):
            ws = self._ws
            if ws.state is ConnectionState.OPEN:
                try:
                    self._send_control(ws.send(CloseConnection(code, reason[:120] or None)))
                except LocalProtocolError:
                    return
            await self.wait_writable()
            while self._eof is None and not self._broken:
                self._feed(await self._recv())
                self._messages.clear()


class TlsWsTransport(WsTransport):
    """:class:`WsTransport` over TLS (``wss://``): the same wsproto
    framing, read from and written to a ``trio.SSLStream``.  A TLS write
    cannot be made without awaiting, so :meth:`try_send` keeps the frame as
    the tail and the connection's writer task writes it
    (:meth:`wait_writable`): one task switch per frame more than the plain
    transport, which stays as it is."""

    __slots__ = ("_stream",)

    def __init__(
        self, stream: trio.SSLStream[trio.SocketStream], ws: WSConnection, **kw: Any
    ) -> None:
        super().__init__(stream.transport_stream.socket, ws, **kw)  # type: ignore[arg-type]
        self._stream = stream

    def _write(self, data: bytes) -> None:
        self._tail += data

    async def wait_writable(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        while self._tail and not self._broken:
            tail, self._tail = self._tail, b""
            try:
                await self._stream.send_all(tail)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._broken = True
        if self._broken:
            self._tail = b""
        await trio.lowlevel.cancel_shielded_checkpoint()

    def peer_gone(self) -> bool:
        """Closed or broken as far as it knows: a TLS read cannot be made
        without awaiting, so nothing is read ahead."""
        return self._eof is not None or self._broken

    async def _recv(self) -> bytes:
        try:
            data = await self._stream.receive_some(RECV_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        return bytes(data)


async def handshake(
    sock: socket.socket,
    head: bytes,
    rest: bytes,
    decide: Callable[[Request], Accept | Refuse],
    *,
    max_message_bytes: int,
    close_timeout_s: float,
    tls: trio.SSLStream[trio.SocketStream] | None = None,
) -> WsTransport | None:
    """Answer the upgrade request in ``head`` (the bytes up to and including
    the blank line; ``rest`` came after it): accepted, the open transport;
    refused (by ``decide`` or by wsproto: 400), None once the answer is
    written.  The caller bounds it in time and closes the socket after a
    refusal.  ``tls``: the connection's TLS stream (over ``sock``), which
    the answer and the transport then use."""
    ws = WSConnection(ConnectionType.SERVER)

    async def send_all(data: bytes) -> None:
        if tls is None:
            await _send_all(sock, data)
            return
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await tls.send_all(data)  # (or the peer is gone)

    request: Request | None = None
    try:
        ws.receive_data(head)
        for event in ws.events():
            if isinstance(event, Request):
                request = event
    except RemoteProtocolError as exc:
        hint = exc.event_hint
        reply = (
            ws.send(hint)
            if isinstance(hint, RejectConnection)
            else _plain_reply(400, b"Bad Request", str(exc).encode())
        )
        await send_all(reply)
        return None
    if request is None:
        await send_all(_plain_reply(400, b"Bad Request", b"not a WebSocket upgrade"))
        return None
    decision = decide(request)
    if isinstance(decision, Refuse):
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(decision.body)).encode()),
        ]
        data = ws.send(
            RejectConnection(status_code=decision.status, headers=headers, has_body=True)
        )
        data += ws.send(RejectData(decision.body, body_finished=True))
        await send_all(data)
        return None
    data = ws.send(AcceptConnection(subprotocol=decision.subprotocol))
    options: dict[str, Any] = {
        "max_message_bytes": max_message_bytes,
        "close_timeout_s": close_timeout_s,
        "subprotocol": decision.subprotocol,
        "headers": list(request.extra_headers),
    }
    transport = (
        WsTransport(sock, ws, **options) if tls is None else TlsWsTransport(tls, ws, **options)
    )
    await send_all(data)
    if rest:
        transport._feed(rest)
    return transport


def _plain_reply(status: int, reason: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n%s" % (status, reason, len(body), body)
    )


async def _send_all(sock: socket.socket, data: bytes) -> None:
    """Write ``data`` whole, waiting while the socket is full.  A checkpoint."""
    await trio.lowlevel.checkpoint_if_cancelled()
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        except OSError:
            return  # the peer is gone
        view = view[sent:]
