"""HTTP connections on the daemon's port and its shutdown: a keep-alive
connection is kept for the next request, closed once idle for
``http_keep_alive_s``, and closed at once on shutdown rather than holding
it for ``http_graceful_s`` (hypercorn's idle timer used to die with the
first request's app task: see ``agor_actors.server._front.KeptAliveServer``);
one whose client stopped reading is cut at the end of ``http_graceful_s``;
one whose request body never comes is answered 408 after
``http_body_timeout_s``."""

from __future__ import annotations

import contextlib
import pathlib

import trio
from server_support import daemon, http

from agor_actors.server import ServerSettings


async def _get_health(stream: trio.SocketStream) -> bytes:
    """One ``GET /health`` on a kept-alive connection: the whole response."""
    await stream.send_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        assert chunk, f"closed before the response's head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = await stream.receive_some(65536)
        assert chunk, "closed before the end of the response's body"
        body += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return body


async def _until_closed(stream: trio.SocketStream) -> None:
    while await stream.receive_some(65536):
        pass


async def test_an_idle_keep_alive_connection_serves_again_then_is_closed(
    tmp_path: pathlib.Path,
) -> None:
    settings = ServerSettings(http_keep_alive_s=0.5)
    async with daemon(tmp_path / "agor", settings) as d:
        stream = await trio.open_tcp_stream("127.0.0.1", d.port)
        async with stream:
            with trio.fail_after(10):
                assert b'"ok"' in await _get_health(stream)
                assert b'"ok"' in await _get_health(stream)  # the same connection
                await _until_closed(stream)  # idle: the server closes it


async def test_shutdown_closes_idle_keep_alive_connections_at_once(
    tmp_path: pathlib.Path,
) -> None:
    """With long keep-alive and graceful times, the daemon still stops at
    once: the idle connection is closed as the shutdown begins."""
    settings = ServerSettings(http_keep_alive_s=600.0, http_graceful_s=600.0)
    closed = trio.Event()

    async def watch(stream: trio.SocketStream) -> None:
        await _until_closed(stream)
        closed.set()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            async with daemon(tmp_path / "agor", settings) as d:
                stream = await trio.open_tcp_stream("127.0.0.1", d.port)
                await _get_health(stream)
                nursery.start_soon(watch, stream)
            # the daemon has stopped (within the guard, not after 600 s)
            await closed.wait()
            await stream.aclose()


async def test_a_client_that_stops_reading_does_not_hold_the_shutdown(
    tmp_path: pathlib.Path,
) -> None:
    """hypercorn writes shielded from cancellation: a response to a client
    that stopped reading held the daemon's shutdown until the kernel gave
    up on the connection (``TCP_USER_TIMEOUT_MS``, 30 s).  After the
    graceful time the front closes the socket under the write."""
    settings = ServerSettings(http_graceful_s=0.5)
    with trio.fail_after(20):  # well under TCP_USER_TIMEOUT_MS
        async with daemon(tmp_path / "agor", settings) as d:
            session = await http(
                "POST", f"{d.http_url}/sessions", token=d.token, json={"title": "t"}
            )
            sid = session.body["id"]
            for _ in range(30):  # a page of ~7.5 MB: more than the sockets hold
                made = await http(
                    "POST",
                    f"{d.http_url}/messages",
                    token=d.token,
                    json={"session_id": sid, "role": "user", "content": "x" * 250_000},
                )
                assert made.status == 201
            sock = trio.socket.socket()
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
            await sock.connect(("127.0.0.1", d.port))
            stalled = trio.SocketStream(sock)
            await stalled.send_all(
                f"GET /messages?session_id={sid}&$limit=30 HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {d.token}\r\n\r\n".encode()
            )
            assert await stalled.receive_some(64)  # the answer has begun; read no more
        # the daemon has stopped (within the guard): the stalled connection was cut
        with trio.fail_after(5), contextlib.suppress(trio.BrokenResourceError):
            while await stalled.receive_some(1 << 20):
                pass
        await stalled.aclose()


async def test_a_body_that_never_comes_gets_408_and_frees_the_connection(
    tmp_path: pathlib.Path,
) -> None:
    """Sign-in reads its body before anyone is known: a client that
    announces a body and never sends it is answered 408 after
    ``http_body_timeout_s`` and its connection closed."""
    settings = ServerSettings(http_body_timeout_s=0.5)
    async with daemon(tmp_path / "agor", settings) as d:
        stream = await trio.open_tcp_stream("127.0.0.1", d.port)
        async with stream:
            await stream.send_all(
                b"POST /authentication HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
            )
            received = b""
            with trio.fail_after(10), contextlib.suppress(trio.BrokenResourceError):
                while chunk := await stream.receive_some(65536):
                    received += chunk
        assert received.startswith(b"HTTP/1.1 408"), received[:80]
        assert b'"code":"timeout"' in received
