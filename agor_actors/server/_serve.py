"""Running the server (one port: ``/ws`` on our WebSocket, the rest on
quart-trio + hypercorn, routed per connection by :mod:`._front`), and the
daemon's main.

The listening socket is made here: ``TCP_USER_TIMEOUT`` (accepted sockets
inherit it on Linux) lets the kernel cut a connection whose peer stopped
acknowledging, and a listen backlog of 2048 keeps a burst of connects from
overflowing the accept queue.  :func:`_accept` accepts on it (the accepted
sockets stay plain non-blocking sockets: the WebSocket writes to them
without awaiting); each connection goes to :meth:`._front.Front.handle`.

hypercorn's per-connection server is driven by the front (see
:mod:`._front` for why rather than a proxy to ``worker_serve``), so what
``worker_serve`` does around its connections is done here: the quart app's
lifespan (startup before the port is announced, shutdown once every
connection is gone), one ``WorkerContext`` and one lifespan-state copy shared
by the connections, and the graceful end (``context.terminated`` closes idle
keep-alive connections, requests in flight get ``graceful_timeout``).

Shutdown, in order: :meth:`AppState.drain` (new WebSockets get 503, HTTP
requests 503 except ``/health``; in-flight calls are answered, outboxes
flushed, every WebSocket closed with 1001), then accepting stops and the
socket is closed, connections still sending their head are closed, then
hypercorn's graceful end, then the app's lifespan shutdown.
"""

from __future__ import annotations

import errno
import gc
import logging
import pathlib
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import attrs
import trio
from hypercorn.config import Config
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import wrap_app

from ..world import World, real_world
from ._app import create_app
from ._front import Front
from ._settings import AppState, ServerHub, ServerSettings

__all__ = [
    "LISTEN_BACKLOG",
    "TCP_USER_TIMEOUT_MS",
    "listen_socket",
    "run_daemon",
    "run_server",
    "serve",
    "serving",
    "tune_gc",
]

log = logging.getLogger("agor_actors.server")

LISTEN_BACKLOG = 2048
GC_GEN0 = 20_000
TCP_USER_TIMEOUT_MS = 30_000


def tune_gc() -> None:
    """The garbage collector's settings for a long-running server process,
    called once it has started.  Everything loaded so far lives as long as
    the process: it is moved out of the collector's reach (``gc.freeze``), so
    that full collections stay short (bench/fanout.py saw 80-90 ms pauses set
    the p99 before).  The young generation is collected every ``GC_GEN0``
    allocations rather than every 700: a server allocates short-lived
    objects at a high rate (trio's wake-ups, frames, events), and at 700 the
    young collections cost ~25 % of the CPU per streamed chunk
    (bench/core.py: 470 -> 355 µs at 20,000)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0, *gc.get_threshold()[1:])


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


def _config() -> Config:
    """hypercorn's config for the HTTP routes (``/ws`` is not hypercorn's)."""
    config = Config()
    config.graceful_timeout = 3.0
    config.accesslog = None
    # hypercorn's messages go through logging like ours (no handler of its own).
    config.errorlog = logging.getLogger("hypercorn.error")
    config.set_statsd_logger_class(StatsdLogger)
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
    config = _config()
    asgi = wrap_app(app, config.wsgi_max_body_size, "asgi")
    sock = listen_socket(host, port)
    try:
        bound_port = int(sock.getsockname()[1])
        lifespan_state: LifespanState = {}
        lifespan = Lifespan(asgi, config, lifespan_state)
        context = WorkerContext(None)
        async with trio.open_nursery() as lifespan_nursery:
            await lifespan_nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            front = Front(state, asgi, config, context, ConnectionState(lifespan_state.copy()))
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(_accept, sock, front, connections)
                    log.info("listening on %s:%d", host, bound_port)
                    task_status.started(bound_port)
                    await shutdown.wait()
                    log.info("draining %d connection(s)", len(state.connections))
                    await state.drain()
                    accepting.cancel_scope.cancel()
                    sock.close()  # refuse new connections from now
                front.stop_reading_heads()
                await context.terminated.set()
                connections.cancel_scope.deadline = world.clock.now_s() + config.graceful_timeout
            await lifespan.wait_for_shutdown()
            lifespan_nursery.cancel_scope.cancel()
    finally:
        sock.close()


_ACCEPT_BURST = 64
_ACCEPT_PAUSE_S = 0.1
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


async def _accept(sock: socket.socket, front: Front, connections: trio.Nursery) -> None:
    """Accept connections on the listening ``sock`` until cancelled; each
    is handled by ``front`` in ``connections``.  Out of file descriptors or
    memory: log, pause ``_ACCEPT_PAUSE_S``, go on (as trio's
    ``serve_listeners`` does)."""
    while True:
        await trio.lowlevel.wait_readable(sock)
        for _ in range(_ACCEPT_BURST):
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
                    log.error("accept: %s; pausing %.1f s", exc, _ACCEPT_PAUSE_S)
                    await trio.sleep(_ACCEPT_PAUSE_S)
                    break
                continue  # the peer gave up before we accepted (ECONNABORTED...)
            conn.setblocking(False)
            connections.start_soon(front.handle, conn)


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
    settings = attrs.evolve(settings or ServerSettings(), data_dir=data_dir)
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
            tune_gc()
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
