"""What the server's parts share: the hub seam, the settings, the origin
check and the state of the running app (its connections, the drain)."""

from __future__ import annotations

import pathlib
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import urlsplit

import attrs
import outcome
import trio

from protocols import Call, ErrorCode, Limits, PresenceUpdate, Since

from ..domain import Principal, SignOut
from ..metrics import Metrics
from ..outbox import Outbox
from ..world import World
from ._web import SignInCodes, WebSessions

if TYPE_CHECKING:
    from ._connection import Connection
    from ._web import WebAuth

__all__ = [
    "AppState",
    "ServerHub",
    "ServerSettings",
    "normalize_origin",
    "origin_allowed",
    "own_origins",
    "tls_context",
    "ws_max_message_bytes",
]


class ServerHub(SignInCodes, WebSessions, Protocol):
    """What the server needs of the daemon's hub (``agor_actors.daemon.Hub``):
    its sign-in codes too."""

    metrics: Metrics

    async def authenticate(self, token: str | None) -> Principal | None: ...

    async def confirm(self, principal: Principal) -> Principal | None: ...

    def on_sign_out(self, hook: Callable[[SignOut], None]) -> None: ...

    async def authentication(self, method: str, data: Any) -> Any: ...
    def connect(self, principal: Principal, connection_id: str) -> None: ...

    async def call(
        self,
        principal: Principal,
        *,
        connection_id: str | None,
        service: str,
        method: str,
        id: str | None = None,
        data: Any = None,
        query: dict[str, Any] | None = None,
        temp_id: str | None = None,
        base_rev: int | None = None,
        idempotency_key: str | None = None,
        if_match: bool = False,
    ) -> Any: ...

    async def submit(
        self,
        principal: Principal,
        connection_id: str | None,
        call: Call,
        reply: Callable[[outcome.Outcome[Any]], None],
        *,
        caller_gone: Callable[[], bool] | None = None,
    ) -> Callable[[], Awaitable[Any]] | None: ...

    async def join(
        self,
        principal: Principal,
        connection_id: str,
        outbox: Outbox,
        room: str,
        since: Since | None,
    ) -> None: ...

    async def leave(self, connection_id: str, room: str) -> None: ...

    async def presence(
        self, principal: Principal, connection_id: str, update: PresenceUpdate
    ) -> None: ...

    async def disconnect(self, connection_id: str) -> None: ...

    def snapshot(self) -> dict[str, Any]: ...


@attrs.frozen(kw_only=True)
class ServerSettings:
    """Tunables of the server.  Times in seconds unless named otherwise."""

    limits: Limits = attrs.field(factory=Limits)
    heartbeat_ms: int = 15_000
    """Announced in ``welcome``: the client pings at least this often."""
    dead_after_s: float = 37.5
    """A connection that sent nothing for this long is closed (4000): two
    and a half heartbeats, as ``Heartbeat.from_heartbeat_ms`` says."""
    hello_timeout_s: float = 10.0
    """A connection that has not completed ``hello`` by then is closed (4001)."""
    outbox_messages_max: int = 2000
    outbox_bytes_max: int = 4 * 1024 * 1024
    outbox_control_max: int = 1024
    call_grace_s: float = 5.0
    """On drain: how long in-flight calls may take to be answered."""
    flush_timeout_s: float = 2.0
    """On close: how long the writer may take to flush the outbox."""
    drain_timeout_s: float = 10.0
    """On drain: how long to wait for every connection to be closed."""
    max_body_bytes: int = 1 << 20
    """Largest HTTP request body (413 beyond)."""
    http_body_timeout_s: float = 20.0
    """An HTTP request's whole body must arrive within this (408 beyond): a
    client that announces a body and sends it slowly, or never, does not
    hold its connection longer (quart's default is 60 s; 1 MiB in 20 s is
    52 KB/s)."""
    disconnect_timeout_s: float = 5.0
    head_timeout_s: float = 10.0
    """A new connection must send its request head (and, on ``/ws``, get
    through the WebSocket handshake) within this, or it is closed."""
    head_max_bytes: int = 16 * 1024
    """Largest request line and headers (431 beyond)."""
    http_keep_alive_s: float = 5.0
    """An HTTP connection idle this long after its last response is closed
    (on shutdown: at once)."""
    http_graceful_s: float = 3.0
    """On shutdown, once the WebSockets are drained: how long HTTP requests
    in flight may take to be answered before their connections are cut."""
    close_timeout_s: float = 2.0
    """On close: how long the WebSocket closing handshake may take before the
    TCP connection is cut (a stalled peer never answers it)."""
    metrics_token: str | None = None
    """A token that may read ``/metrics`` (and nothing else), for a scraper
    that should not hold the owner's token; None: the owner only."""
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    """Serve ``/metrics`` (and ``/health``) on a listener of their own at
    ``metrics_host:metrics_port``, and not on the public port (404 there);
    None: on the public port."""
    metrics_idle_s: float = 30.0
    """A connection to the metrics port that sends nothing for this long
    (whole seconds, rounded up) is closed (a scraper that keeps one open
    between scrapes reconnects)."""
    data_dir: pathlib.Path | None = None
    """Where the browser session cookie's key lives (``web-secret``); None: a
    key in memory (cookies then last as long as the process)."""
    allow_origins: tuple[str, ...] = ()
    """Browser origins allowed besides the daemon's own (``--allow-origin``),
    as ``scheme://host[:port]``."""
    certfile: pathlib.Path | None = None
    """TLS: the certificate chain (PEM); with ``keyfile``, the port speaks
    only TLS (``wss://``, ``https://``)."""
    keyfile: pathlib.Path | None = None
    commit_linger_s: float = 0.002
    """A busy store writer waits this long for more writes before it commits
    a group (fewer, larger commits: less CPU per write for at most this much
    latency); an idle one commits at once.  0: never waits."""
    new_keys: bool = False
    """On a cluster: this node's keys (``jwt-secret`` or the ``--jwt-*``
    keys, ``web-secret``) become the cluster's (``--new-keys``, after
    changing every node's on purpose); without, a node whose keys are not
    the other nodes' refuses to start."""
    sqlite_commit_on_loop: bool = True
    """Whether a SQLite store's commits run on the loop's own thread
    (``--sqlite-commit loop``: less CPU per write, the loop waits for each
    commit) or in a worker thread (``thread``); see
    :class:`~agor_actors.world.Blocking`.  A PostgreSQL store's always run
    in a worker thread.  Read only when ``run_daemon`` makes the world."""


def ws_max_message_bytes(settings: ServerSettings) -> int:
    """trio-websocket's message size bound: well above the protocol's frame
    limit, so that a frame over that limit reaches the machine, which closes
    with 1009 and an error frame saying why."""
    return max(16 << 20, 4 * settings.limits.max_frame_bytes)


# ---------------------------------------------------------------------- origins

_LOCAL_HOSTS: Final = ("127.0.0.1", "localhost", "[::1]")
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def normalize_origin(origin: str) -> str | None:
    """``origin`` as a browser serializes it (``scheme://host[:port]``,
    lower case, no default port), or None if it is not an origin."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port  # raises ValueError for a malformed port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        return None
    host = parts.hostname.lower()
    shown = f"[{host}]" if ":" in host else host
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{shown}"
    return f"{scheme}://{shown}:{port}"


def own_origins(host: str, port: int, *, tls: bool) -> frozenset[str]:
    """The daemon's own origins: the page it serves, as a browser names it
    (``http(s)://<host>:<port>``; on a loopback or any-address bind, each of
    127.0.0.1, localhost and [::1] on that port)."""
    scheme = "https" if tls else "http"
    hosts = {host}
    if host in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::"):
        hosts.update(_LOCAL_HOSTS)
    hosts.discard("0.0.0.0")
    hosts.discard("::")
    origins = set()
    for name in hosts:
        shown = f"[{name}]" if ":" in name and not name.startswith("[") else name
        origin = normalize_origin(f"{scheme}://{shown}:{port}")
        if origin is not None:
            origins.add(origin)
    return frozenset(origins)


def origin_allowed(origin: str | None, allowed: frozenset[str]) -> bool:
    """The ``Origin`` check for browser connections: no ``Origin`` (not a
    browser), or one of ``allowed`` (exactly, once normalized): another
    port of the same host is another origin."""
    if origin is None or origin == "":
        return True
    normalized = normalize_origin(origin)
    return normalized is not None and normalized in allowed


def tls_context(certfile: pathlib.Path, keyfile: pathlib.Path) -> ssl.SSLContext:
    """The server's TLS context (TLS 1.2 at least, HTTP/1.1 by ALPN).
    Raises :class:`ssl.SSLError` or :class:`OSError` for unusable files."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    context.set_alpn_protocols(["http/1.1"])
    return context


# ----------------------------------------------------------------- the state


@attrs.define(eq=False)
class AppState:
    """What the app shares between its handlers: the hub, the world, the
    settings, the open connections, and whether it is draining."""

    hub: ServerHub
    world: World
    settings: ServerSettings
    connections: set[Connection] = attrs.field(factory=set)
    draining: bool = False
    web: WebAuth | None = None
    origins: frozenset[str] = frozenset()
    """Browser origins allowed (the daemon's own and ``allow_origins``)."""
    tls: ssl.SSLContext | None = None

    def is_draining(self) -> bool:
        return self.draining

    def signed_out(self, sign_out: SignOut) -> None:
        """Close the connections ``sign_out`` ends (``unauthorized``, 4001;
        calls in flight are answered first)."""
        for connection in list(self.connections):
            principal = connection.principal
            if principal is not None and sign_out.ends(principal):
                connection.go_away(ErrorCode.UNAUTHORIZED, sign_out.message)

    async def drain(self) -> None:
        """Refuse new work (503), answer in-flight calls, flush every outbox
        and close every WebSocket with 1001; returns when all are closed or
        after ``drain_timeout_s``."""
        self.draining = True
        connections = list(self.connections)
        for connection in connections:
            connection.go_away()
        with trio.move_on_after(self.settings.drain_timeout_s):
            for connection in connections:
                await connection.finished.wait()
