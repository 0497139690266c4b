"""Shared helpers for the server tests (no tests here): a real daemon core
(hub on a SQLite file in ``tmp_path``) served on an ephemeral port of
127.0.0.1, and a raw protocol client over trio-websocket."""

from __future__ import annotations

import pathlib
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
import trio_websocket

from agor_actors.client import Client, Mirror, open_websocket
from agor_actors.daemon import Hub, open_hub
from agor_actors.identity import IdentityConfig
from agor_actors.server import ServerSettings, serving
from agor_actors.store import WriteRequest
from agor_actors.world import real_world
from protocols import (
    PROTOCOL_VERSION,
    Codec,
    Hello,
    Message,
    ServerMessage,
    decode_server_frame,
    encode,
)


@attrs.define
class Daemon:
    hub: Hub
    port: int
    data_dir: pathlib.Path

    @property
    def token(self) -> str:
        return self.hub.owner_token

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@asynccontextmanager
async def daemon(
    data_dir: pathlib.Path,
    settings: ServerSettings | None = None,
    *,
    port: int = 0,
    metrics_sock: socket.socket | None = None,
    identity: IdentityConfig | None = None,
) -> AsyncIterator[Daemon]:
    """A hub on a SQLite file in ``data_dir`` and its server on 127.0.0.1; on
    exit the server drains (1001) and the hub stops."""
    world = real_world()
    async with (
        open_hub(world, data_dir=data_dir, identity=identity) as hub,
        serving(hub, world, port=port, settings=settings, metrics_sock=metrics_sock) as bound,
    ):
        yield Daemon(hub, bound, data_dir)


class RawClient:
    """The protocol by hand: frames in, messages out, nothing checked."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, codec: Codec) -> None:
        self.ws = ws
        self.codec = codec

    async def send(self, message: Message | list[Message]) -> None:
        await self.ws.send_message(encode(self.codec, message))

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send_message(data)

    async def receive(self) -> list[ServerMessage]:
        return decode_server_frame(self.codec, await self.ws.get_message())

    async def expect(self, kind: type[Any], *, limit_s: float = 10.0) -> Any:
        """Messages until one of ``kind`` (others are dropped)."""
        with trio.fail_after(limit_s):
            while True:
                for message in await self.receive():
                    if isinstance(message, kind):
                        return message


@asynccontextmanager
async def raw_client(
    url: str, codec: Codec = Codec.JSON, *, token: str | None = None, hello: bool = True
) -> AsyncIterator[RawClient]:
    async with open_websocket(url, subprotocols=[codec.subprotocol]) as ws:
        client = RawClient(ws, codec)
        if hello:
            await client.send(Hello(PROTOCOL_VERSION, token, None))
        yield client


@attrs.frozen
class HttpReply:
    status: int
    body: Any
    headers: dict[str, str]


async def http(
    method: str,
    url: str,
    *,
    token: str | None = None,
    json: Any = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> HttpReply:
    """One HTTP request (urllib in a worker thread: test code only)."""
    import json as jsonlib
    import urllib.error
    import urllib.request

    data = raw if raw is not None else (None if json is None else jsonlib.dumps(json).encode())
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    for name, value in (headers or {}).items():
        request.add_header(name, value)

    def run() -> HttpReply:
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, body, head = response.status, response.read(), _lower(response.headers)
        except urllib.error.HTTPError as exc:
            status, body, head = exc.code, exc.read(), _lower(exc.headers)
            exc.close()
        return HttpReply(status, jsonlib.loads(body) if body else None, head)

    return await trio.to_thread.run_sync(run)


async def until_closed(
    client: RawClient, *, limit_s: float = 10.0
) -> tuple[list[ServerMessage], trio_websocket.CloseReason]:
    """Every message until the server closes the connection, and how it closed."""
    messages: list[ServerMessage] = []
    with trio.fail_after(limit_s):
        try:
            while True:
                messages.extend(await client.receive())
        except trio_websocket.ConnectionClosed as exc:
            assert exc.reason is not None
            return messages, exc.reason


async def commit_behind(hub: Hub, request: WriteRequest) -> None:
    """Commit ``request`` straight to ``hub``'s store, behind the hub's back,
    as another daemon of a cluster would."""
    (result,) = await trio.to_thread.run_sync(hub.store.commit, [request])
    assert not isinstance(result, Exception), result


async def calls_until_unauthorized(client: Any) -> list[str]:
    """Call ``client`` until it answers ``unauthorized`` (closed for good by
    the server): the codes it answered.  The server stops reading before it
    closes, so a call sent while the connection was still open fails with
    ``connection_lost``; each call waits for the close, so a few at most."""
    from agor_actors.client import CallError

    codes: list[str] = []
    with trio.fail_after(10):
        while not codes or codes[-1] != "unauthorized":
            try:
                await client.service("boards").find()
            except CallError as failed:
                codes.append(failed.code)
            else:
                raise AssertionError(f"answered after {codes}")
    return codes


def _lower(headers: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


async def stream_chunks(agent: Client, mirror: Mirror, message_id: str, chunks: int) -> None:
    """Stream ``chunks`` chunks into a message from ``agent`` and wait (at
    most 10 s) until ``mirror`` has seen the last."""
    last = 0
    for n in range(chunks):
        answer = await agent.service("messages").call(
            "stream", id=message_id, data={"chunk": f"w{n} "}
        )
        last = answer["_seq"]
    with trio.fail_after(10):
        await mirror.wait_until(lambda m: m.seq >= last)
