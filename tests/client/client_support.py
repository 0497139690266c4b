"""Shared helpers for the client tests (no tests here): a real daemon core
(hub on a SQLite file) served on 127.0.0.1."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import attrs

from agor_actors.client import WebSocketDialer
from agor_actors.daemon import Hub, open_hub
from agor_actors.server import serving
from agor_actors.world import MessageTransport, World, real_world


@attrs.frozen
class Daemon:
    hub: Hub
    port: int

    @property
    def token(self) -> str:
        return self.hub.owner_token

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


@asynccontextmanager
async def daemon(
    data_dir: pathlib.Path, *, port: int = 0, world: World | None = None
) -> AsyncIterator[Daemon]:
    world = world or real_world()
    async with open_hub(world, data_dir=data_dir) as hub, serving(hub, world, port=port) as bound:
        yield Daemon(hub, bound)


class WrappedTransport:
    """A transport that hands everything to ``inner``: tests override
    what they change (a peer that stalls, a connection that drops)."""

    def __init__(self, inner: MessageTransport) -> None:
        self.inner = inner

    @property
    def subprotocol(self) -> str | None:
        return self.inner.subprotocol

    async def receive(self) -> bytes | str:
        return await self.inner.receive()

    async def send(self, data: bytes | str) -> None:
        await self.inner.send(data)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.inner.close(code, reason)


class CountingDialer:
    """The real dialer, counting what it opens and what it is offered; each
    connection it opens goes through :meth:`wrap` (tests override it: a
    connection that stalls, drops or swallows what it is sent)."""

    def __init__(self) -> None:
        self.inner = WebSocketDialer()
        self.offered: list[list[str]] = []

    def wrap(self, transport: MessageTransport) -> MessageTransport:
        return transport

    @asynccontextmanager
    async def dial(
        self,
        url: str,
        *,
        subprotocols: Sequence[str],
        headers: Sequence[tuple[str, str]] = (),
        connect_timeout_s: float = 10.0,
    ) -> AsyncIterator[MessageTransport]:
        self.offered.append(list(subprotocols))
        async with self.inner.dial(
            url, subprotocols=subprotocols, headers=headers, connect_timeout_s=connect_timeout_s
        ) as transport:
            yield self.wrap(transport)


class _DropsAfter(WrappedTransport):
    """A transport that closes itself right after sending a frame that
    holds ``marker``: the call reaches the server, its answer never comes
    back, and the client sees ``connection_lost``."""

    def __init__(self, inner: MessageTransport, dialer: DroppingDialer) -> None:
        super().__init__(inner)
        self.dialer = dialer

    async def send(self, data: bytes | str) -> None:
        await self.inner.send(data)
        marker = self.dialer.marker
        if marker is not None and isinstance(data, str) and marker in data:
            self.dialer.marker = None
            self.dialer.dropped += 1
            await self.inner.close()


class DroppingDialer(CountingDialer):
    """The real dialer, whose connections drop once after sending ``marker``."""

    def __init__(self) -> None:
        super().__init__()
        self.marker: str | None = None
        self.dropped = 0

    def wrap(self, transport: MessageTransport) -> MessageTransport:
        return _DropsAfter(transport, self)
