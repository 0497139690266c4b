"""HTTP keep-alive connections on the daemon's port: kept for the next
request, closed once idle for ``http_keep_alive_s``, and closed at once on
shutdown rather than holding it for ``http_graceful_s`` (hypercorn's idle
timer used to die with the first request's app task: see
``agor_actors.server._front.KeptAliveServer``)."""

from __future__ import annotations

import pathlib

import trio
from server_support import daemon

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
