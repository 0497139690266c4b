"""Shared helpers for the client tests (no tests here): a real daemon core
(hub on a SQLite file) served on 127.0.0.1."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs

from agor_actors.daemon import Hub, open_hub
from agor_actors.server import serving
from agor_actors.world import real_world


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
async def daemon(data_dir: pathlib.Path, *, port: int = 0) -> AsyncIterator[Daemon]:
    world = real_world()
    async with open_hub(world, data_dir=data_dir) as hub, serving(hub, world, port=port) as bound:
        yield Daemon(hub, bound)
