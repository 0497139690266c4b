"""Running the app on hypercorn's trio worker, and the daemon's main.

The listening socket is made here, not by hypercorn: ``TCP_USER_TIMEOUT``
(accepted sockets inherit it on Linux) lets the kernel cut a connection whose
peer stopped acknowledging, which is the only thing that frees a writer stuck
in hypercorn's shielded send; and a listen backlog of 2048 keeps a burst of
connects from overflowing the accept queue.  The socket object is handed to
hypercorn's worker as is (its ``sockets=`` argument, which is what ``fd://``
turns into) so that exactly one Python object owns the descriptor and this
module closes it once the server has stopped.
"""

from __future__ import annotations

import gc
import logging
import pathlib
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from ..world import World, real_world
from ._app import AppState, ServerHub, ServerSettings, create_app

__all__ = [
    "LISTEN_BACKLOG",
    "TCP_USER_TIMEOUT_MS",
    "listen_socket",
    "run_daemon",
    "run_server",
    "serve",
    "serving",
]

log = logging.getLogger("agor_actors.server")

LISTEN_BACKLOG = 2048
TCP_USER_TIMEOUT_MS = 30_000


def listen_socket(
    host: str,
    port: int,
    *,
    backlog: int = LISTEN_BACKLOG,
    user_timeout_ms: int = TCP_USER_TIMEOUT_MS,
) -> socket.socket:
    """A listening, non-blocking TCP socket on ``host:port`` (0: any free
    port) with ``TCP_USER_TIMEOUT`` and ``TCP_NODELAY`` set."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout_ms)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _config(settings: ServerSettings) -> Config:
    config = Config()
    config.backlog = LISTEN_BACKLOG
    # The protocol's ping/pong is the heartbeat (hypercorn never checks pongs).
    config.websocket_ping_interval = None
    # Frames above the protocol's limit reach the machine, which closes with
    # 1009 and an error frame (hypercorn's own 1009 sometimes left the TCP
    # connection open).
    config.websocket_max_message_size = max(16 << 20, 4 * settings.limits.max_frame_bytes)
    config.graceful_timeout = 3.0
    config.accesslog = None
    # hypercorn's messages go through logging like ours (no handler of its own).
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


async def run_server(
    hub: ServerHub,
    world: World,
    *,
    host: str = "127.0.0.1",
    port: int = 3030,
    shutdown: trio.Event,
    settings: ServerSettings | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``hub`` on ``host:port`` until ``shutdown`` is set, then drain:
    refuse new work (503), answer in-flight calls, flush every outbox, close
    every WebSocket with 1001, stop listening.  ``task_status.started`` gets
    the bound port.  The hub itself is drained by its owner."""
    settings = settings or ServerSettings()
    app = create_app(hub, world, settings)
    state: AppState = app.extensions["agor"]
    sock = listen_socket(host, port)
    try:
        bound_port = int(sock.getsockname()[1])

        async def shutdown_trigger() -> None:
            await shutdown.wait()
            log.info("draining %d connection(s)", len(state.connections))
            await state.drain()

        config = _config(settings)

        async def started(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            await worker_serve(
                wrap_app(app, config.wsgi_max_body_size, "asgi"),
                config,
                sockets=Sockets(secure_sockets=[], insecure_sockets=[sock], quic_sockets=[]),
                shutdown_trigger=shutdown_trigger,
                task_status=task_status,
            )

        async with trio.open_nursery() as nursery:
            await nursery.start(started)
            log.info("listening on %s:%d", host, bound_port)
            task_status.started(bound_port)
    finally:
        sock.close()


@asynccontextmanager
async def serving(
    hub: ServerHub,
    world: World,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    settings: ServerSettings | None = None,
) -> AsyncIterator[int]:
    """Serve ``hub`` in the background for the block (the bound port is what
    it gets: ``port=0`` picks a free one); on exit, drain as on SIGTERM."""
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        bound: int = await nursery.start(
            partial(
                run_server, hub, world, host=host, port=port, shutdown=shutdown, settings=settings
            )
        )
        try:
            yield bound
        finally:
            shutdown.set()


async def _watch_signals(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("signal %s: draining", signal.Signals(signum).name)
            stop.set()
            return


async def run_daemon(
    *,
    host: str,
    port: int,
    data_dir: pathlib.Path,
    db_url: str | None,
    world: World | None = None,
    settings: ServerSettings | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The daemon: open the hub, serve until SIGINT or SIGTERM, drain."""
    from ..daemon import open_hub  # the daemon's core is only needed here

    world = world or real_world()
    data_dir.mkdir(parents=True, exist_ok=True)
    db_url = db_url or f"sqlite:///{data_dir / 'agor.db'}"
    stop = trio.Event()
    async with open_hub(world, db_url=db_url, data_dir=data_dir) as hub:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, stop)
            bound = await nursery.start(
                partial(
                    run_server, hub, world, host=host, port=port, shutdown=stop, settings=settings
                )
            )
            # Everything loaded so far lives as long as the daemon: move it
            # out of the collector's reach, so that full collections stay
            # short (bench/fanout.py saw 80-90 ms pauses set the p99 before).
            gc.collect()
            gc.freeze()
            task_status.started(bound)
            # run_server returns once drained, _watch_signals once signalled.
        await hub.drain()
    log.info("stopped")


def serve(
    host: str = "127.0.0.1",
    port: int = 3030,
    data_dir: pathlib.Path | str = ".agor",
    db_url: str | None = None,
) -> int:
    """Run the daemon in this process until SIGINT or SIGTERM; returns the
    exit status (0 after a clean drain)."""
    trio.run(
        lambda: run_daemon(host=host, port=port, data_dir=pathlib.Path(data_dir), db_url=db_url)
    )
    return 0
