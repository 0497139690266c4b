"""The one port's front (``agor_actors.server._front``) over real sockets on
127.0.0.1: ``/ws`` (trio-websocket) and the REST routes (hypercorn) side by
side; request heads that stall, are garbage or are too large; WebSocket
handshakes refused with their JSON reason; a peer that never answers the
closing handshake; and the drain (503 for newcomers, 1001 for the others,
then no more listening).  Every wait is on an event under
``trio.fail_after``; nothing sleeps on the wall clock."""

from __future__ import annotations

import contextlib
import json
import pathlib
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing
import trio_websocket
from server_support import Daemon, daemon, http, raw_client, until_closed

from agor_actors.client import connect, open_websocket
from agor_actors.daemon import Hub, open_hub
from agor_actors.server import ServerSettings, run_server
from agor_actors.server._front import HeadError, ReplayStream, read_head, route
from agor_actors.world import real_world
from protocols import Call, Codec, Error, Join, Joined, Result, Welcome

SHORT_HEAD = ServerSettings(head_timeout_s=0.5)

HANDSHAKE = (
    "GET {target} HTTP/1.1\r\n"
    "Host: 127.0.0.1\r\n"
    "Connection: Upgrade\r\n"
    "Upgrade: websocket\r\n"
    "Sec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "{extra}"
    "\r\n"
)


@pytest.fixture
async def running(tmp_path: pathlib.Path) -> AsyncIterator[Daemon]:
    async with daemon(tmp_path / "agor", SHORT_HEAD) as d:
        yield d


async def _tcp(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def _read_to_eof(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes (a reset counts as closed)."""
    received = bytearray()
    while True:
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            break
        if not data:
            break
        received += data
    return bytes(received)


async def _read_head(stream: trio.SocketStream) -> bytes:
    received = bytearray()
    while b"\r\n\r\n" not in received:
        data = await stream.receive_some(65536)
        assert data, f"closed after {bytes(received)!r}"
        received += data
    return bytes(received)


def _status(reply: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3})", reply)
    assert match is not None, reply
    return int(match.group(1))


def _json_body(reply: bytes) -> object:
    return json.loads(reply.partition(b"\r\n\r\n")[2])


async def _everything_else_works(d: Daemon) -> None:
    """A WebSocket call and a REST call, on the same port, both answered."""
    async with raw_client(d.ws_url, token=d.token) as client:
        await client.expect(Welcome)
        await client.send(Call(1, "sessions", "create", data={"title": "alive"}))
        created = await client.expect(Result)
        assert created.ok
        reply = await http("GET", f"{d.http_url}/sessions/{created.data['id']}", token=d.token)
        assert reply.status == 200 and reply.body["title"] == "alive"


# --------------------------------------------------------------- one port


async def test_websocket_and_rest_share_the_port(running: Daemon) -> None:
    async with raw_client(running.ws_url, token=running.token) as client:
        await client.expect(Welcome)
        health = await http("GET", f"{running.http_url}/health")
        assert health.status == 200 and health.body == {"status": "ok", "connections": 1}
        created = await http(
            "POST", f"{running.http_url}/sessions", token=running.token, json={"title": "rest"}
        )
        assert created.status == 201
        await client.send(Call(1, "sessions", "get", id=created.body["id"]))
        got = await client.expect(Result)
        assert got.ok and got.data["title"] == "rest"


async def test_a_query_string_on_ws_is_still_the_websocket(running: Daemon) -> None:
    url = f"{running.ws_url}?client=test"
    async with open_websocket(url, subprotocols=[Codec.CBOR.subprotocol]) as ws:
        assert ws.subprotocol == Codec.CBOR.subprotocol


async def test_the_websocket_never_negotiates_permessage_deflate(running: Daemon) -> None:
    stream = await _tcp(running.port)
    async with stream:
        extra = "Sec-WebSocket-Protocol: agor.v1.json\r\n"
        extra += "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        await stream.send_all(HANDSHAKE.format(target="/ws", extra=extra).encode())
        with trio.fail_after(5):
            head = await _read_head(stream)
    assert _status(head) == 101
    assert b"sec-websocket-protocol: agor.v1.json" in head.lower()
    assert b"sec-websocket-extensions" not in head.lower()


# ------------------------------------------------------------- bad heads


async def test_a_stalled_request_head_is_closed_after_the_timeout_and_hurts_nobody(
    running: Daemon,
) -> None:
    stalled = await _tcp(running.port)
    async with stalled:
        await stalled.send_all(b"GET /hea")
        started = trio.current_time()
        await _everything_else_works(running)  # while it stalls
        with trio.fail_after(5):
            assert await _read_to_eof(stalled) == b""
        assert trio.current_time() - started >= 0.5 * SHORT_HEAD.head_timeout_s
    await _everything_else_works(running)


async def test_a_connection_that_sends_nothing_is_closed_after_the_timeout(
    running: Daemon,
) -> None:
    silent = await _tcp(running.port)
    async with silent:
        with trio.fail_after(5):
            assert await _read_to_eof(silent) == b""
    await _everything_else_works(running)


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", id="tls-client-hello"),
        pytest.param(b"hello there\r\n\r\n", id="lowercase-words"),
        pytest.param(b"GET\r\n\r\n", id="no-target"),
        pytest.param(b"GET / SPDY/3\r\nHost: x\r\n\r\n", id="not-http"),
        pytest.param(b"\x00" * 100_000, id="zeros"),
    ],
)
async def test_garbage_gets_400_and_is_closed(running: Daemon, garbage: bytes) -> None:
    stream = await _tcp(running.port)
    async with stream:
        with trio.fail_after(5):
            with contextlib.suppress(trio.BrokenResourceError):  # closed before it all went
                await stream.send_all(garbage)
            reply = await _read_to_eof(stream)
    assert _status(reply) == 400
    assert b'"message":"not an HTTP/1.1 request"' in reply
    await _everything_else_works(running)


async def test_a_head_beyond_the_bound_gets_431(running: Daemon) -> None:
    stream = await _tcp(running.port)
    async with stream:
        head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
        with trio.fail_after(5):
            await stream.send_all(head)
            reply = await _read_to_eof(stream)
    assert _status(reply) == 431
    assert b'"message":"the request\'s headers are too large"' in reply
    await _everything_else_works(running)


async def test_a_request_line_beyond_the_bound_gets_414_saying_why(running: Daemon) -> None:
    # (a find with 20,000 query parameters got a bare 400, no word of why)
    stream = await _tcp(running.port)
    query = "&".join(f"title[$in]={i}" for i in range(20_000)).encode()
    async with stream:
        with trio.fail_after(5):
            with contextlib.suppress(trio.BrokenResourceError):  # closed before it all went
                await stream.send_all(b"GET /sessions?" + query + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = await _read_to_eof(stream)
    assert _status(reply) == 414
    assert b"content-type: application/json" in reply
    assert b'"message":"the request line is too long: a long query goes in fewer' in reply
    await _everything_else_works(running)


async def test_a_plain_get_of_ws_is_refused_at_once(tmp_path: pathlib.Path) -> None:
    """Not an upgrade: trio-websocket answers 400 and closes, and the front
    does not wait for the handshake's deadline (30 s here)."""
    async with daemon(tmp_path / "agor", ServerSettings(head_timeout_s=30)) as d:
        stream = await _tcp(d.port)
        async with stream:
            await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            with trio.fail_after(5):
                reply = await _read_to_eof(stream)
        assert _status(reply) == 400


async def test_a_request_in_several_pieces_and_a_pipelined_one_are_served(
    running: Daemon,
) -> None:
    stream = await _tcp(running.port)
    async with stream:
        with trio.fail_after(5):
            for piece in (b"GE", b"T /heal", b"th HTTP/1.1\r\nHo", b"st: x\r\n", b"\r\n"):
                await stream.send_all(piece)
            received = bytearray()
            while b'"status":"ok"' not in received:
                data = await stream.receive_some(65536)
                assert data
                received += data
            await stream.send_all(
                b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            while received.count(b'"status":"ok"') < 3:
                data = await stream.receive_some(65536)
                assert data
                received += data
    assert received.count(b"HTTP/1.1 200") == 3


# ------------------------------------------------------- /ws handshakes


async def _handshake(port: int, extra: str) -> bytes:
    stream = await _tcp(port)
    async with stream:
        await stream.send_all(HANDSHAKE.format(target="/ws", extra=extra).encode())
        with trio.fail_after(5):
            return await _read_to_eof(stream)


async def test_ws_without_a_subprotocol_gets_400_saying_what_to_offer(running: Daemon) -> None:
    reply = await _handshake(running.port, "")
    assert _status(reply) == 400
    assert b"content-type: application/json" in reply.lower()
    assert _json_body(reply) == {
        "code": "unsupported_protocol",
        "message": "offer a subprotocol of agor.v1.json, agor.v1.cbor; offered: none",
        "data": None,
    }
    with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionRejected) as caught:
        async with open_websocket(running.ws_url, subprotocols=["agor.v9.xml"]):
            pass
    assert caught.value.status_code == 400
    body = json.loads(caught.value.body or b"")
    assert body["code"] == "unsupported_protocol" and "offered: agor.v9.xml" in body["message"]


async def test_ws_from_a_foreign_origin_gets_403(running: Daemon) -> None:
    extra = "Sec-WebSocket-Protocol: agor.v1.json\r\nOrigin: https://evil.example\r\n"
    reply = await _handshake(running.port, extra)
    assert _status(reply) == 403
    assert _json_body(reply) == {"code": "forbidden", "message": "origin not allowed", "data": None}
    await _everything_else_works(running)


async def test_a_peer_that_never_answers_the_close_is_cut_after_close_timeout(
    tmp_path: pathlib.Path,
) -> None:
    """No hello: the server closes (4001) and waits for the closing
    handshake, which never comes; the TCP connection is cut after
    ``close_timeout_s``, and everybody else is fine all along."""
    settings = ServerSettings(hello_timeout_s=0.2, close_timeout_s=0.5)
    async with daemon(tmp_path / "agor", settings) as d:
        stream = await _tcp(d.port)
        async with stream:
            extra = "Sec-WebSocket-Protocol: agor.v1.json\r\n"
            await stream.send_all(HANDSHAKE.format(target="/ws", extra=extra).encode())
            with trio.fail_after(5):
                head = await _read_head(stream)
            assert _status(head) == 101
            started = trio.current_time()
            with trio.fail_after(5):
                sent = await _read_to_eof(stream)
            # an error frame, then a close frame with 4001 (0x0FA1)
            assert b"not_authenticated" in sent and b"\x88" in sent and b"\x0f\xa1" in sent
            assert trio.current_time() - started >= settings.close_timeout_s
        await _everything_else_works(d)


# ----------------------------------------------------------------- drain


@asynccontextmanager
async def _server(
    tmp_path: pathlib.Path, settings: ServerSettings
) -> AsyncIterator[tuple[int, trio.Event, trio.Event, Hub]]:
    world = real_world()
    async with open_hub(world, data_dir=tmp_path / "agor") as hub, trio.open_nursery() as nursery:
        shutdown = trio.Event()
        stopped = trio.Event()

        async def serve(task_status: trio.TaskStatus[int]) -> None:
            await run_server(
                hub, world, port=0, shutdown=shutdown, settings=settings, task_status=task_status
            )
            stopped.set()

        port = await nursery.start(serve)
        yield port, shutdown, stopped, hub
        shutdown.set()


async def test_drain_refuses_newcomers_closes_the_others_with_1001_then_stops_listening(
    tmp_path: pathlib.Path,
) -> None:
    """A WebSocket that never answers the closing handshake holds the drain
    open (``close_timeout_s`` is long here): meanwhile a new ``/ws`` gets 503
    and ``/health`` says draining; once it goes, the port is closed."""
    settings = ServerSettings(close_timeout_s=30, hello_timeout_s=30)
    async with _server(tmp_path, settings) as (port, shutdown, stopped, hub):
        token = hub.owner_token
        url = f"ws://127.0.0.1:{port}/ws"
        holder = await _tcp(port)
        async with holder, raw_client(url, token=token) as client:
            extra = "Sec-WebSocket-Protocol: agor.v1.json\r\n"
            await holder.send_all(HANDSHAKE.format(target="/ws", extra=extra).encode())
            with trio.fail_after(5):
                assert _status(await _read_head(holder)) == 101
            await client.expect(Welcome)

            shutdown.set()
            messages, reason = await until_closed(client)
            assert reason.code == 1001
            assert [m.code for m in messages if isinstance(m, Error)] == ["going_away"]

            # The drain is still on (the holder has not answered).
            with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionRejected) as caught:
                async with open_websocket(url, subprotocols=[Codec.JSON.subprotocol]):
                    pass
            assert caught.value.status_code == 503
            assert json.loads(caught.value.body or b"")["code"] == "unavailable"
            health = await http("GET", f"http://127.0.0.1:{port}/health")
            assert health.status == 503 and health.body == {"status": "draining"}
            assert not stopped.is_set()
        # The holder is gone: the drain ends, listening stops.
        with trio.fail_after(10):
            await stopped.wait()
        with pytest.raises(OSError):
            await _tcp(port)


# ----------------------------------------------------- the pieces alone


async def test_the_replay_stream_gives_the_prefix_first_then_the_socket() -> None:
    a, b = trio.socket.socketpair()
    left, right = trio.SocketStream(a), trio.SocketStream(b)
    async with left, right:
        replay = ReplayStream(right, b"0123456789")
        assert replay.socket is right.socket
        assert await replay.receive_some(4) == b"0123"
        assert await replay.receive_some(4) == b"4567"
        await left.send_all(b"after")
        assert await replay.receive_some() == b"89"
        assert await replay.receive_some(100) == b"after"
        await replay.send_all(b"back")
        assert await left.receive_some(100) == b"back"
        with pytest.raises(ValueError):
            await ReplayStream(right, b"x").receive_some(0)
        scope = trio.CancelScope()
        replay.on_close = scope
        await replay.aclose()
        assert scope.cancel_called
        assert await left.receive_some(100) == b""


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"GET /ws HTTP/1.1\r\n\r\n", "ws"),
        (b"GET /ws?a=1&b HTTP/1.1\r\n\r\n", "ws"),
        (b"GET /ws/ HTTP/1.1\r\n\r\n", "http"),
        (b"GET /wss HTTP/1.1\r\n\r\n", "http"),
        (b"POST /ws HTTP/1.1\r\n\r\n", "http"),
        (b"GET /health HTTP/1.1\r\n\r\n", "http"),
        (b"GET /x?/ws HTTP/1.0\n\n", "http"),
        (b"GET http://127.0.0.1:3030/ws HTTP/1.1\r\n\r\n", "ws"),
        (b"GET http://127.0.0.1:3030/ws/x HTTP/1.1\r\n\r\n", "http"),
    ],
)
def test_routes(head: bytes, expected: str) -> None:
    assert route(head) == expected


async def _head_of(chunks: list[bytes], max_bytes: int = 64) -> bytes:
    send, receive = trio.testing.memory_stream_one_way_pair()
    for chunk in chunks:
        await send.send_all(chunk)
    await send.aclose()
    return await read_head(receive, max_bytes)


async def test_read_head_reads_to_the_blank_line_and_refuses_the_rest() -> None:
    assert await _head_of([b"GET / HTTP/1.1\r\n", b"\r\nbody"]) == b"GET / HTTP/1.1\r\n\r\nbody"
    assert await _head_of([b"GET / HTTP/1.1\n\n"]) == b"GET / HTTP/1.1\n\n"
    for chunks, reply in [
        ([b"GET / HTTP/1.1\r\n"], None),  # closed before the end of the head
        ([b""], None),
        ([b"get / HTTP/1.1\r\n\r\n"], b"400"),
        ([b"GET / HTTP/1.1\r\nX: " + b"a" * 100], b"431"),
        ([b"GET /" + b"a" * 100], b"414"),  # a request line beyond the bound
        ([b"GETaaa" + b"a" * 100], b"400"),  # no request line at all
    ]:
        with pytest.raises(HeadError) as caught:
            await _head_of(chunks)
        if reply is None:
            assert caught.value.reply is None
        else:
            assert caught.value.reply is not None and reply in caught.value.reply


async def test_the_front_survives_a_flood_of_bad_connections(running: Daemon) -> None:
    async def one(n: int) -> None:
        stream = await _tcp(running.port)
        async with stream:
            with trio.fail_after(5):
                await stream.send_all([b"\x00\x01", b"GET /he", b"BAD\r\n\r\n"][n % 3])
                await _read_to_eof(stream)

    async with trio.open_nursery() as nursery:
        for n in range(30):
            nursery.start_soon(partial(one, n))
    await _everything_else_works(running)


def _room_lagged(hub: Hub, room: str) -> int:
    """How many subscribers the room's actor dropped for lagging."""
    nodes = [hub.snapshot()]
    while nodes:
        node = nodes.pop()
        if node.get("room") == room and "lagged" in node:
            return int(node["lagged"])
        nodes.extend(node.get("children", []))
        if isinstance(node.get("supervisor"), dict):
            nodes.append(node["supervisor"])
    raise AssertionError(f"no actor for {room}")


async def test_drain_is_not_held_by_a_peer_that_stopped_reading(tmp_path: pathlib.Path) -> None:
    """A subscriber stops reading until its socket buffers and its outbox are
    full (the room drops it: its writer is stuck in a send).  The drain
    still ends within ``flush_timeout_s`` + ``close_timeout_s`` (not
    ``drain_timeout_s``), and the reader that reads gets 1001."""
    settings = ServerSettings(
        outbox_messages_max=64, flush_timeout_s=0.5, close_timeout_s=0.5, drain_timeout_s=30
    )
    async with _server(tmp_path, settings) as (port, shutdown, stopped, hub):
        url = f"ws://127.0.0.1:{port}/ws"
        async with (
            connect(url, token=hub.owner_token, backoff_cap_s=0.2) as producer,
            raw_client(url, token=hub.owner_token) as stalled,
        ):
            session = await producer.service("sessions").create({"title": "stalled"})
            room = f"session:{session['id']}"
            message = await producer.service("messages").create(
                {"session_id": session["id"], "role": "assistant", "content": ""}
            )
            await stalled.expect(Welcome)
            await stalled.send(Join(room))
            await stalled.expect(Joined)
            # From here on the stalled client reads nothing.
            chunk = "x" * (12 * 1024)
            with trio.fail_after(60):
                for _ in range(600):
                    await producer.service("messages").call(
                        "stream", message["id"], {"chunk": chunk}
                    )
                    if _room_lagged(hub, room):
                        break
            assert _room_lagged(hub, room) == 1

            started = trio.current_time()
            shutdown.set()
            with trio.fail_after(10):
                await stopped.wait()
            assert trio.current_time() - started < 5
            assert producer.close_reason is not None and producer.close_reason.code == 1001
