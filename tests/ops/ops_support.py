"""Shared helpers for the operations tests (no tests here): a daemon in
this process (hub on a SQLite file, served on an ephemeral port of
127.0.0.1), and the daemon's command line run as a separate process."""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import attrs
import trio

from agor_actors.daemon import Hub, open_hub
from agor_actors.server import ServerSettings, serving
from agor_actors.world import real_world

REPO = pathlib.Path(__file__).resolve().parents[2]
CLI = (sys.executable, "-m", "agor_actors.cli")
"""``agor-actors`` from this checkout (the interpreter running the tests)."""
BARE_ENV = {"PATH": "/usr/bin:/bin"}
"""``env -i PATH=/usr/bin:/bin``: no Python, no virtual environment."""

WS_URL_RE = re.compile(r"WebSocket\s+(ws://[^\s]+)")


@attrs.frozen
class Daemon:
    hub: Hub
    port: int

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
    data_dir: pathlib.Path, settings: ServerSettings | None = None
) -> AsyncIterator[Daemon]:
    """A hub on a SQLite file in ``data_dir`` and its server on 127.0.0.1."""
    world = real_world()
    async with (
        open_hub(world, data_dir=data_dir) as hub,
        serving(hub, world, port=0, settings=settings) as bound,
    ):
        yield Daemon(hub, bound)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@attrs.define
class Running:
    """A daemon process and what it printed so far."""

    process: trio.Process
    out: bytearray
    err: bytearray
    ws_url: str
    started_s: float
    """Seconds from the spawn to the ready banner."""

    @property
    def stdout(self) -> str:
        return self.out.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self.err.decode("utf-8", "replace")

    @property
    def http_url(self) -> str:
        return self.ws_url.replace("ws://", "http://").removesuffix("/ws")

    async def stop(self) -> int:
        """SIGTERM (the daemon drains), then its exit status."""
        self.process.terminate()
        with trio.fail_after(15):
            return await self.process.wait()


@asynccontextmanager
async def running(
    argv: Sequence[str],
    *,
    cwd: pathlib.Path,
    env: dict[str, str] | None = None,
    ready_within_s: float = 30.0,
) -> AsyncIterator[Running]:
    """Run ``argv`` (a ``serve`` command line) until it prints its ready
    banner on stdout; stopped (SIGTERM) on the way out if still running."""
    process = await trio.lowlevel.open_process(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=env if env is not None else {**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None and process.stderr is not None
    out, err = bytearray(), bytearray()
    ready = trio.Event()
    spawned_s = trio.current_time()

    async def pump(stream: trio.abc.ReceiveStream, into: bytearray, watch: bool) -> None:
        async for chunk in stream:
            into.extend(chunk)
            if watch and WS_URL_RE.search(into.decode("utf-8", "replace")):
                ready.set()
        if watch:
            ready.set()  # ended without a banner: the caller sees why

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, process.stdout, out, True)
            nursery.start_soon(pump, process.stderr, err, False)
            with trio.fail_after(ready_within_s):
                await ready.wait()
            started_s = trio.current_time() - spawned_s
            found = WS_URL_RE.search(out.decode("utf-8", "replace"))
            assert found is not None, f"no banner; stderr:\n{err.decode('utf-8', 'replace')}"
            yield Running(process, out, err, found.group(1), started_s)
            if process.returncode is None:
                process.terminate()
            with trio.fail_after(15):
                await process.wait()
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
            await process.stdout.aclose()
            await process.stderr.aclose()
