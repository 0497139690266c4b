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
hypercorn's graceful end (idle keep-alive connections closed at once,
requests in flight given ``http_graceful_s``; then the sockets of HTTP
connections still writing to a client that stopped reading are closed, as
hypercorn's shielded writes cannot be cancelled), then the app's lifespan
shutdown.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import math
import os
import pathlib
import re
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Callable
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

from ..domain.presence import PresenceConfig
from ..identity import IdentityConfig, IdentityConfigError
from ..world import World, real_world
from ._app import create_app
from ._front import Front
from ._metrics_port import serve_metrics
from ._settings import (
    AppState,
    ServerHub,
    ServerSettings,
    normalize_origin,
    own_origins,
    tls_context,
)
from ._web import SECRET_FILE as WEB_SECRET_FILE
from ._web import web_secret_check

__all__ = [
    "LISTEN_BACKLOG",
    "TCP_USER_TIMEOUT_MS",
    "ListenError",
    "StartupError",
    "listen_socket",
    "ready_banner",
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


class StartupError(Exception):
    """The daemon could not start for a reason its operator can mend: the
    data dir cannot be made, the database cannot be opened."""

    def explain(self) -> str:
        return str(self)


def _sole(error: BaseException) -> BaseException:
    """``error``, or the one exception of a group (of groups) of one."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def _first_line(error: BaseException) -> str:
    error = _sole(error)
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _shown_url(url: str) -> str:
    """A database URL with its password hidden."""
    return re.sub(r"(//[^:/@]+):[^@]*@", r"\1:***@", url)


class ListenError(OSError):
    """The listening socket could not be made (the port is in use, the
    address is not this machine's, a port below 1024 without the right)."""

    def __init__(self, host: str, port: int, cause: OSError, option: str = "--port") -> None:
        super().__init__(cause.errno, cause.strerror)
        self.host = host
        self.port = port
        self.option = option
        """What chooses the port: a command line option (``--port``) or a
        call's argument (``serve=(host, port)``)."""

    def explain(self) -> str:
        """One line for a person: what failed and what to do."""
        where = f"{self.host}:{self.port}"
        # a command line option takes N after it; a call's argument names itself
        choose = f"{self.option} N" if self.option.startswith("--") else self.option
        if self.errno == errno.EADDRINUSE:
            return (
                f"port {self.port} is already in use on {self.host} (another agor-actors?): "
                f"stop it, or choose another port with {choose}"
                + (" (make serve PORT=N)" if self.option == "--port" else "")
            )
        if self.errno == errno.EACCES:
            return f"not allowed to listen on {where}: choose a port above 1023 with {choose}"
        if self.errno == errno.EADDRNOTAVAIL:
            return (
                f"cannot listen on {where}: {self.host} is not an address of this machine (--host)"
            )
        if not 0 <= self.port <= 65535:
            return f"{self.port} is not a port: {self.option} takes 0 (any free port) to 65535"
        return f"cannot listen on {where}: {self.strerror}"


def listen_socket(
    host: str,
    port: int,
    *,
    backlog: int = LISTEN_BACKLOG,
    user_timeout_ms: int = TCP_USER_TIMEOUT_MS,
    option: str = "--port",
) -> socket.socket:
    """A listening, non-blocking TCP socket on ``host:port`` (0: any free
    port) with ``TCP_USER_TIMEOUT`` and ``TCP_NODELAY`` set.  Raises
    :class:`ListenError` (its advice naming ``option``) when the address
    cannot be had, with ``EINVAL`` for a port outside 0-65535 (which the
    socket layer would take modulo 65536, without a word)."""
    if not 0 <= port <= 65535:
        raise ListenError(host, port, OSError(errno.EINVAL, "no such port"), option)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(host, port, exc, option) from exc
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
    except OSError as exc:
        sock.close()
        raise ListenError(host, port, exc, option) from exc
    except BaseException:
        sock.close()
        raise
    return sock


def _config(settings: ServerSettings) -> Config:
    """hypercorn's config for the HTTP routes (``/ws`` is not hypercorn's)."""
    config = Config()
    config.graceful_timeout = settings.http_graceful_s
    config.keep_alive_timeout = settings.http_keep_alive_s
    config.accesslog = None
    # hypercorn's messages go through logging like ours (no handler of its own);
    # the access lines are the app's (see ._logs).
    config.errorlog = logging.getLogger("hypercorn.error")
    config.set_statsd_logger_class(StatsdLogger)
    return config


def _metrics_config(settings: ServerSettings) -> Config:
    """hypercorn's config for the metrics port, served by hypercorn's own
    ``worker_serve``, whose keep-alive timer dies as the front's did (see
    ``._front.KeptAliveServer``): a read timeout closes idle connections."""
    config = _config(settings)
    config.read_timeout = max(1, math.ceil(settings.metrics_idle_s))  # whole seconds
    return config


async def run_server(
    hub: ServerHub,
    world: World,
    *,
    host: str = "127.0.0.1",
    port: int = 3030,
    shutdown: trio.Event,
    settings: ServerSettings | None = None,
    sock: socket.socket | None = None,
    metrics_sock: socket.socket | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``hub`` on ``host:port`` until ``shutdown`` is set, then drain:
    refuse new work (503), answer in-flight calls, flush every outbox, close
    every WebSocket with 1001, stop listening.  ``task_status.started`` gets
    the bound port.  The hub itself is drained by its owner.  ``sock``: a
    socket from :func:`listen_socket` to serve on instead of making one
    (it is closed at the end all the same).  With ``settings.metrics_port``
    set (or a ``metrics_sock`` given), ``/metrics`` is served on a listener
    of its own (:mod:`._metrics_port`) until the drain is over."""
    settings = settings or ServerSettings()
    sock = sock if sock is not None else listen_socket(host, port)
    try:
        if metrics_sock is None and settings.metrics_port is not None:
            metrics_sock = listen_socket(
                settings.metrics_host, settings.metrics_port, option="--metrics-port"
            )
        if metrics_sock is not None and settings.metrics_port is None:
            settings = attrs.evolve(settings, metrics_port=int(metrics_sock.getsockname()[1]))
        app = create_app(hub, world, settings)
        state: AppState = app.extensions["agor"]
        state.tls = _tls(settings)
        state.origins = own_origins(
            host, int(sock.getsockname()[1]), tls=state.tls is not None
        ) | _allowed_origins(settings)
    except BaseException:
        sock.close()
        if metrics_sock is not None:
            metrics_sock.close()
        raise
    config = _config(settings)
    asgi = wrap_app(app, config.wsgi_max_body_size, "asgi")
    try:
        bound_port = int(sock.getsockname()[1])
        lifespan_state: LifespanState = {}
        lifespan = Lifespan(asgi, config, lifespan_state)
        context = WorkerContext(None)
        async with trio.open_nursery() as lifespan_nursery:
            await lifespan_nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            front = Front(state, asgi, config, context, ConnectionState(lifespan_state.copy()))
            metrics_done = trio.Event()
            if metrics_sock is not None:
                await lifespan_nursery.start(
                    serve_metrics, state, metrics_sock, _metrics_config(settings), metrics_done
                )
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(_accept, sock, front, connections)
                    log.info("listening on %s:%d", host, bound_port)
                    task_status.started(bound_port)
                    await shutdown.wait()
                    log.info("draining %d connection(s)", len(state.connections))
                    await state.drain()
                    metrics_done.set()
                    accepting.cancel_scope.cancel()
                sock.close()  # refuse new connections from now
                front.stop_reading_heads()
                await context.terminated.set()
                graceful_end = world.clock.now_s() + config.graceful_timeout
                connections.cancel_scope.deadline = graceful_end
                lifespan_nursery.start_soon(_cut_http_at, front, graceful_end)
            await lifespan.wait_for_shutdown()
            lifespan_nursery.cancel_scope.cancel()
    finally:
        sock.close()
        if metrics_sock is not None:
            metrics_sock.close()


def _tls(settings: ServerSettings) -> ssl.SSLContext | None:
    """The TLS context of ``--certfile``/``--keyfile`` (both or neither);
    :class:`StartupError` when they cannot be used."""
    if settings.certfile is None and settings.keyfile is None:
        return None
    if settings.certfile is None or settings.keyfile is None:
        raise StartupError("TLS needs both --certfile and --keyfile")
    try:
        return tls_context(settings.certfile, settings.keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"cannot use the TLS certificate or key: {exc}") from exc


def _allowed_origins(settings: ServerSettings) -> frozenset[str]:
    """``--allow-origin`` values, normalized; :class:`StartupError` for one
    that is not an origin."""
    allowed = set()
    for origin in settings.allow_origins:
        normalized = normalize_origin(origin)
        if normalized is None:
            raise StartupError(f"--allow-origin {origin!r} is not an origin (scheme://host[:port])")
        allowed.add(normalized)
    return frozenset(allowed)


_ACCEPT_BURST = 64
_ACCEPT_PAUSE_S = 0.1
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


async def _cut_http_at(front: Front, deadline: float) -> None:
    """At ``deadline`` (the graceful end, on trio's clock as the world's is),
    close the HTTP connections still served: what the deadline's
    cancellation cannot end (see :meth:`Front.cut_http`).  Cancelled with
    the lifespan once they have ended."""
    await trio.sleep_until(deadline)
    cut = front.cut_http()
    if cut:
        log.warning(
            "shutdown: %d HTTP connection(s) still writing after the graceful time; cut", cut
        )


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
    sock: socket.socket | None = None,
    metrics_sock: socket.socket | None = None,
) -> AsyncIterator[int]:
    """Serve ``hub`` in the background for the block (the bound port is what
    it gets: ``port=0`` picks a free one; ``sock``: a socket from
    :func:`listen_socket` to serve on instead); on exit, drain as on SIGTERM."""
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        bound: int = await nursery.start(
            partial(
                run_server,
                hub,
                world,
                host=host,
                port=port,
                shutdown=shutdown,
                settings=settings,
                sock=sock,
                metrics_sock=metrics_sock,
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
    broker_url: str | None = None,
    world: World | None = None,
    settings: ServerSettings | None = None,
    identity: IdentityConfig | None = None,
    presence: PresenceConfig | None = None,
    on_metrics_port: Callable[[int], None] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The daemon: take the port (:class:`ListenError` if it cannot be had,
    before anything is opened), open the hub, serve until SIGINT or SIGTERM,
    drain."""
    from ..daemon import (  # the daemon's core is only needed here
        DataDirLocked,
        NotClusterKeys,
        NotClusterOwner,
        open_hub,
    )

    if world is None:
        on_loop = settings is None or settings.sqlite_commit_on_loop
        world = real_world(local_on_loop=on_loop)
    sock = listen_socket(host, port)
    metrics_sock: socket.socket | None = None
    try:  # run_server closes them too; here for a failure before it runs
        if settings is not None and settings.metrics_port is not None:
            metrics_sock = listen_socket(
                settings.metrics_host, settings.metrics_port, option="--metrics-port"
            )
            if on_metrics_port is not None:  # the port taken (``--metrics-port 0``: any)
                on_metrics_port(int(metrics_sock.getsockname()[1]))
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except FileExistsError as exc:  # mkdir's word for "a file, not a directory"
            raise StartupError(
                f"cannot use {data_dir} as the data dir: it is a file, not a directory"
            ) from exc
        except OSError as exc:
            raise StartupError(f"cannot use {data_dir} as the data dir: {exc.strerror}") from exc
        settings = attrs.evolve(settings or ServerSettings(), data_dir=data_dir)
        db_url = db_url or f"sqlite:///{data_dir / 'agor.db'}"
        stop = trio.Event()
        async with contextlib.AsyncExitStack() as opened:
            try:
                hub = await opened.enter_async_context(
                    open_hub(
                        world,
                        db_url=db_url,
                        data_dir=data_dir,
                        identity=identity,
                        broker_url=broker_url,
                        presence=presence,
                        commit_linger_s=settings.commit_linger_s,
                        new_keys=settings.new_keys,
                    )
                )
                if broker_url is not None:  # (a daemon alone reads nothing more)
                    await hub.check_cluster_key(
                        "web",
                        await world.blocking.run(lambda: web_secret_check(data_dir, world)),
                        path=data_dir / WEB_SECRET_FILE,
                        signed="browser sign-ins (cookies)",
                        replace=settings.new_keys,
                    )
            except Exception as exc:
                cause = _sole(exc)  # raised in a nursery of the hub's, or not
                if isinstance(cause, DataDirLocked | NotClusterOwner | NotClusterKeys):
                    raise StartupError(str(cause)) from exc
                if isinstance(cause, IdentityConfigError):
                    raise StartupError(f"cannot use the JWT keys: {cause}") from exc
                raise StartupError(
                    f"cannot open the database {_shown_url(db_url)}: {_first_line(exc)}"
                ) from exc
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_signals, stop)
                bound = await nursery.start(
                    partial(
                        run_server,
                        hub,
                        world,
                        host=host,
                        port=port,
                        shutdown=stop,
                        settings=settings,
                        sock=sock,
                        metrics_sock=metrics_sock,
                    )
                )
                tune_gc()
                url_file = _write_url(data_dir, _http_url(host, bound))
                task_status.started(bound)
                # run_server returns once drained, _watch_signals once signalled.
            _remove_url(url_file)
            await hub.drain()
    finally:
        sock.close()
        if metrics_sock is not None:
            metrics_sock.close()
    log.info("stopped")


URL_FILE = "url"
"""``<data_dir>/url``: the running daemon's HTTP URL, for ``agor-actors top``
and ``open`` run without ``--url`` (removed when the daemon stops)."""


def _shown_host(host: str) -> str:
    """``host`` as a local client reaches it, ready for a URL."""
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _http_url(host: str, port: int) -> str:
    """The daemon's HTTP URL as a local client reaches it."""
    return f"http://{_shown_host(host)}:{port}"


def _write_url(data_dir: pathlib.Path, url: str) -> pathlib.Path | None:
    """Write ``url`` to ``<data_dir>/url`` (0600); None if it cannot be
    written (then the tools need ``--url``, nothing else is amiss)."""
    path = data_dir / URL_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            os.fchmod(file.fileno(), 0o600)
            file.write(url + "\n")
    except OSError as exc:
        log.warning("cannot write %s: %s", path, exc.strerror)
        return None
    return path


def _remove_url(path: pathlib.Path | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()


def ready_banner(host: str, port: int, data_dir: pathlib.Path, executable: str) -> str:
    """What ``serve`` prints once the daemon listens: where to connect, where
    the owner's token is, and the next commands to try."""
    shown = _shown_host(host)
    http_url = _http_url(host, port)
    token_file = data_dir / "token"
    data = f" --data-dir {data_dir}" if str(data_dir) != ".agor" else ""
    return "\n".join(
        [
            f"agor-actors is serving on {host}:{port}",
            f"  WebSocket  ws://{shown}:{port}/ws  (subprotocol agor.v1.json or agor.v1.cbor)",
            f"  HTTP API   {http_url}/<service>  (sessions, tasks, messages, boards, ...),"
            f" {http_url}/health",
            f"  token      {token_file}  (the owner's; send it in hello or as"
            " Authorization: Bearer <token>)",
            "  next       in another terminal:",
            f"             {executable} top --url {http_url}{data}",
            f'             curl -H "Authorization: Bearer $({executable} token{data})"'
            f" {http_url}/sessions",
        ]
    )


def serve(
    host: str = "127.0.0.1",
    port: int = 3030,
    data_dir: pathlib.Path | str = ".agor",
    db_url: str | None = None,
    *,
    broker_url: str | None = None,
    banner_executable: str | None = "agor-actors",
    metrics_token: str | None = None,
    metrics_host: str = "127.0.0.1",
    metrics_port: int | None = None,
    allow_origins: tuple[str, ...] = (),
    certfile: pathlib.Path | None = None,
    keyfile: pathlib.Path | None = None,
    identity: IdentityConfig | None = None,
    presence: PresenceConfig | None = None,
    commit_linger_ms: float = 2.0,
    sqlite_commit_on_loop: bool = True,
    new_keys: bool = False,
) -> int:
    """Run the daemon in this process until SIGINT or SIGTERM; returns the
    exit status: 0 after a clean drain, 2 when the port cannot be had or
    the data dir or the database cannot be opened (one line on stderr says
    why).  Once listening, prints :func:`ready_banner`
    to stdout (unless ``banner_executable`` is None)."""
    path = pathlib.Path(data_dir)
    metrics_bound = [metrics_port]

    def taken(port: int) -> None:
        metrics_bound[0] = port

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            bound: int = await nursery.start(
                partial(
                    run_daemon,
                    host=host,
                    port=port,
                    data_dir=path,
                    db_url=db_url,
                    broker_url=broker_url,
                    settings=ServerSettings(
                        metrics_token=metrics_token,
                        metrics_host=metrics_host,
                        metrics_port=metrics_port,
                        allow_origins=allow_origins,
                        certfile=certfile,
                        keyfile=keyfile,
                        commit_linger_s=commit_linger_ms / 1000,
                        sqlite_commit_on_loop=sqlite_commit_on_loop,
                        new_keys=new_keys,
                    ),
                    identity=identity,
                    presence=presence,
                    on_metrics_port=taken,
                )
            )
            metrics_port_taken = metrics_bound[0]
            log.info(
                "ready",
                extra={
                    "ws_url": f"ws://{host}:{bound}/ws",
                    "http_url": f"http://{host}:{bound}",
                    "token_file": str(path / "token"),
                    **(
                        {"metrics_url": f"http://{metrics_host}:{metrics_port_taken}/metrics"}
                        if metrics_port_taken is not None
                        else {}
                    ),
                },
            )
            if banner_executable is not None:
                banner = ready_banner(host, bound, path, banner_executable)
                if certfile is not None:
                    banner = banner.replace("ws://", "wss://").replace("http://", "https://")
                if metrics_port_taken is not None:
                    banner += f"\n  metrics    http://{metrics_host}:{metrics_port_taken}/metrics"
                print(banner, flush=True)

    try:
        trio.run(main)
    except (ListenError, StartupError, BaseExceptionGroup) as exc:
        failed = _startup_error(exc)
        if failed is None:
            raise
        print(f"agor-actors serve: {failed.explain()}", file=sys.stderr)
        return 2
    return 0


def _startup_error(exc: BaseException) -> ListenError | StartupError | None:
    """The :class:`ListenError` or :class:`StartupError` that ended the run,
    when that is all that did."""
    if isinstance(exc, ListenError | StartupError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split((ListenError, StartupError))
        if matched is not None and rest is None:
            found: BaseException = matched
            while isinstance(found, BaseExceptionGroup):
                found = found.exceptions[0]
            return found if isinstance(found, ListenError | StartupError) else None
    return None
