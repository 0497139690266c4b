"""``agor-actors``: the daemon's command line.

``agor-actors serve [--host 127.0.0.1] [--port 3030] [--data-dir .agor] [--db URL]
[--broker URL] [--log-format text|json] [--log-level INFO] [--metrics-token T]
[--metrics-port N [--metrics-host H]] [--allow-origin ORIGIN]...
[--certfile PEM --keyfile PEM] [--jwt-private-key PEM] [--jwt-public-key PEM]
[--access-token-ttl S] [--refresh-token-ttl S] [--node-heartbeat S] [--node-liveness S]
[--presence-grace S] [--commit-linger-ms MS] [--sqlite-commit loop|thread]
[--new-keys]`` runs
the daemon until SIGINT or SIGTERM (then drains and exits 0; exit 2 when the
port cannot be had);
``agor-actors backup [--data-dir .agor] DEST`` copies the data dir into the new
directory ``DEST``: the SQLite database as one consistent snapshot (safe
while a daemon runs on it), the owner's token and the keys;
``agor-actors token [--data-dir .agor] [--rotate [--url URL]]`` prints the
local owner's token; with ``--rotate`` it asks the running daemon for a new
one (the old one is refused from then on; the daemon writes it to
``<data-dir>/token``) and prints that.

Only ``serve`` creates a data dir and its token: ``token`` and ``top`` read
the token a daemon made and fail with a message naming where they looked
when there is none (exit 2), so that running them from the wrong directory
never makes a new owner.

Each subcommand is one entry of ``COMMANDS`` (how to add its arguments, what
to run).  ``agor-actors top [--watch S]`` shows the supervision tree of a
running daemon (``/debug/actors``): supervisors, then the actors with the
deepest mailboxes, their restarts and last crash; then its busiest
connections (``/debug/connections``: frames and bytes received and sent,
the outbox's depth, calls pending, user, codec, rooms).  With ``--watch``
it redraws in place, with rates since the last refresh.  It finds the
daemon through ``--url``, or the ``url`` file the daemon wrote to its
data dir, and reads the token there; it never creates anything.  ``agor-actors open
[--browser]`` prints a one-time link that signs a browser in to a running
daemon (the owner, or the user whose ``--token`` it is) and opens the board.
"""

from __future__ import annotations

import argparse
import contextlib
import http
import json
import math
import os
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final

from .printable import escape_controls

__all__ = ["COMMANDS", "NoToken", "build_parser", "main", "read_token"]


class NoToken(Exception):
    """There is no owner token where a command looked for one."""


def read_token(data_dir: pathlib.Path) -> str:
    """The owner token the daemon wrote to ``<data_dir>/token``.  Raises
    :class:`NoToken` (with a message saying where it looked and what to
    pass) when there is none: only ``serve`` creates it."""
    from .daemon._token import TOKEN_FILE

    path = data_dir / TOKEN_FILE
    try:
        token = path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        token = ""
    except OSError as exc:
        raise NoToken(f"cannot read the token in {path.absolute()}: {exc.strerror}") from None
    if not token:
        state = "is empty" if path.exists() else "does not exist"
        raise NoToken(
            f"no daemon data here: {path.absolute()} {state}. Pass the daemon's "
            "--data-dir (or set AGOR_DATA_DIR); 'agor-actors serve --data-dir DIR' makes one"
        )
    return token


_STATUS_CODES: Final = frozenset(int(status) for status in http.HTTPStatus)
DEFAULT_URL: Final = "http://127.0.0.1:3030"
URL_FILE: Final = "url"
"""``<data-dir>/url``: the running daemon's HTTP URL (written by ``serve``)."""


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=pathlib.Path,
        default=pathlib.Path(os.environ.get("AGOR_DATA_DIR") or ".agor"),
        help="where the database and the token live (default: .agor)",
    )


def _port(text: str) -> int:
    """A TCP port, 0 (any free one) to 65535: the socket layer would take
    70000 as 4464 without a word."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: 0 (any free port) to 65535")
    return port


def _watch_seconds(text: str) -> float:
    """``top --watch``: seconds between redraws, finite (0: draw once)."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= seconds < math.inf:  # nan is neither
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds: 0 (once) or more")
    return seconds


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=3030, help="port to bind (default 3030)")
    _add_data_dir(parser)
    parser.add_argument(
        "--db",
        default=None,
        metavar="URL",
        help="SQLAlchemy URL (default: sqlite:///<data-dir>/agor.db; "
        "PostgreSQL: postgresql+psycopg://...)",
    )
    parser.add_argument(
        "--broker",
        default=os.environ.get("AGOR_BROKER_URL"),
        metavar="URL",
        help="run as a node of a cluster: the broker that daemons sharing --db fan out"
        " through: Redis (redis://host:6379/0) or PostgreSQL LISTEN/NOTIFY"
        " (postgresql://...; may be --db itself); or AGOR_BROKER_URL",
    )
    parser.add_argument(
        "--new-keys",
        action="store_true",
        help="on a cluster: this node's keys (jwt-secret or the --jwt-* keys, web-secret)"
        " become the cluster's, after changing every node's on purpose (a node whose keys"
        " are not the others' refuses to start without it)",
    )
    parser.add_argument(
        "--node-heartbeat",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="a cluster node tells the other daemons its users on a board this often (default 5)",
    )
    parser.add_argument(
        "--node-liveness",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="a daemon not heard from for this long has vanished: its users go offline"
        " after --presence-grace more (default 15)",
    )
    parser.add_argument(
        "--presence-grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long a user stays on a board's facepile after their last connection"
        " (or their daemon) went away (default 10)",
    )
    parser.add_argument(
        "--commit-linger-ms",
        type=float,
        default=2.0,
        metavar="MS",
        help="a busy daemon waits this long for more writes before a commit: fewer, larger"
        " commits, less CPU per write (default 2; 0: commit each group at once)",
    )
    parser.add_argument(
        "--sqlite-commit",
        choices=["loop", "thread"],
        default="loop",
        help="where a SQLite database's commits run: on the daemon's loop (less CPU per"
        " write; the loop waits while SQLite appends to its log) or in a worker thread"
        " (default loop; a PostgreSQL database's always run in a thread)",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("AGOR_LOG_LEVEL", "INFO").upper(),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="the least severe records logged (default INFO)",
    )
    parser.add_argument(
        "--metrics-token",
        default=os.environ.get("AGOR_METRICS_TOKEN"),
        metavar="TOKEN",
        help="a token that may read /metrics and nothing else (default: the owner's only;"
        " or AGOR_METRICS_TOKEN)",
    )
    parser.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        metavar="N",
        help="serve /metrics (and /health) on this port of their own, not on --port",
    )
    parser.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address of the --metrics-port listener (default 127.0.0.1)",
    )
    parser.add_argument(
        "--log-format",
        default=os.environ.get("AGOR_LOG_FORMAT", "text"),
        choices=["text", "json"],
        help="log lines as readable text (default) or JSON lines",
    )
    parser.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a browser origin (scheme://host[:port]) allowed besides the daemon's own; repeatable",
    )
    parser.add_argument(
        "--certfile", type=pathlib.Path, default=None, help="TLS certificate chain (PEM)"
    )
    parser.add_argument("--keyfile", type=pathlib.Path, default=None, help="TLS private key (PEM)")
    parser.add_argument(
        "--jwt-private-key",
        type=pathlib.Path,
        default=None,
        metavar="PEM",
        help="sign access tokens with this RSA (RS256) or P-256 (ES256) key"
        " (default: HS256 with <data-dir>/jwt-secret)",
    )
    parser.add_argument(
        "--jwt-public-key",
        type=pathlib.Path,
        default=None,
        metavar="PEM",
        help="verify access tokens with this public key; alone: verify only (no sign-in here)",
    )
    parser.add_argument("--jwt-issuer", default="agor-actors", help="the tokens' iss")
    parser.add_argument("--jwt-audience", default="agor", help="the tokens' aud")
    parser.add_argument(
        "--access-token-ttl",
        type=int,
        default=15 * 60,
        metavar="SECONDS",
        help="access token lifetime (default 900)",
    )
    parser.add_argument(
        "--refresh-token-ttl",
        type=int,
        default=30 * 24 * 3600,
        metavar="SECONDS",
        help="refresh token lifetime (default 30 days)",
    )


def _executable() -> str:
    """How this program was started, for the commands the banner suggests."""
    invoked = sys.argv[0] if sys.argv else ""
    return invoked if pathlib.Path(invoked).name == "agor-actors" else "agor-actors"


def _serve(args: argparse.Namespace) -> int:
    from .domain.presence import PresenceConfig
    from .identity import IdentityConfig
    from .server import serve
    from .server._logs import configure_logging

    configure_logging(args.log_level, args.log_format)
    if args.broker and not args.db:
        return _fail("serve", "--broker needs --db: the database the cluster's daemons share")
    if args.new_keys and not args.broker:
        return _fail(
            "serve",
            "--new-keys is for a node of a cluster (--broker): a daemon alone has its own keys",
        )
    if args.broker:
        from .broker import broker_kind

        try:
            broker_kind(args.broker)
        except ValueError as exc:
            return _fail("serve", f"--broker: {exc}")
    timings = (args.node_heartbeat, args.node_liveness, args.presence_grace)
    if not all(0 < t < math.inf for t in timings):  # nan is neither
        return _fail(
            "serve",
            "--node-heartbeat, --node-liveness and --presence-grace must be positive (and finite)",
        )
    if args.node_liveness <= args.node_heartbeat:
        return _fail("serve", "--node-liveness must be longer than --node-heartbeat")
    if not 0 <= args.commit_linger_ms <= 100:
        return _fail("serve", "--commit-linger-ms must be between 0 and 100")
    if args.access_token_ttl < 1 or args.refresh_token_ttl < 1:
        # (a token would be issued expired: every sign-in refused, and no
        # word of why)
        return _fail(
            "serve", "--access-token-ttl and --refresh-token-ttl must be at least 1 second"
        )
    presence = PresenceConfig(
        offline_grace_s=args.presence_grace,
        node_heartbeat_s=args.node_heartbeat,
        node_liveness_s=args.node_liveness,
    )
    identity = IdentityConfig(
        issuer=args.jwt_issuer,
        audience=args.jwt_audience,
        access_ttl_s=args.access_token_ttl,
        refresh_ttl_s=args.refresh_token_ttl,
        private_key=args.jwt_private_key,
        public_key=args.jwt_public_key,
    )
    return serve(
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        db_url=args.db,
        broker_url=args.broker or None,
        banner_executable=_executable(),
        metrics_token=args.metrics_token,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        allow_origins=tuple(args.allow_origin),
        certfile=args.certfile,
        keyfile=args.keyfile,
        identity=identity,
        presence=presence,
        commit_linger_ms=args.commit_linger_ms,
        sqlite_commit_on_loop=args.sqlite_commit == "loop",
        new_keys=args.new_keys,
    )


def _fail(command: str, message: str, status: int = 2) -> int:
    print(f"agor-actors {command}: {message}", file=sys.stderr)
    return status


def _token_arguments(parser: argparse.ArgumentParser) -> None:
    _add_data_dir(parser)
    parser.add_argument(
        "--rotate",
        action="store_true",
        help="renew it: the running daemon makes a new one and refuses the old one",
    )
    parser.add_argument(
        "--url", default=None, help="with --rotate: the daemon's base URL (default: as for top)"
    )


def _token(args: argparse.Namespace) -> int:
    try:
        token = read_token(args.data_dir)
    except NoToken as exc:
        return _fail("token", str(exc))
    if args.rotate:
        base = daemon_url(args.url, args.data_dir).rstrip("/")
        answer = _post_json("token", base, "/users/owner/rotate_token", token, None)
        if isinstance(answer, int):
            print(
                "(a daemon that is not running renews it when started again"
                f" after deleting {args.data_dir / 'token'})",
                file=sys.stderr,
            )
            return answer
        token = str(answer["token"])
    print(token)
    return 0


def _backup_arguments(parser: argparse.ArgumentParser) -> None:
    _add_data_dir(parser)
    parser.add_argument(
        "dest", type=pathlib.Path, help="a new directory to write the copy to (0700)"
    )


def _backup(args: argparse.Namespace) -> int:
    from .daemon import BackupError, back_up_data_dir

    try:
        written = back_up_data_dir(args.data_dir, args.dest)
    except BackupError as exc:
        return _fail("backup", str(exc))
    print(f"backed up {args.data_dir} to {args.dest}: {', '.join(written)}")
    print(f"to run on the copy: agor-actors serve --data-dir {args.dest}")
    return 0


def _post_json(command: str, base: str, path: str, token: str, body: Any) -> Any:
    """POST ``body`` (JSON) to the daemon at ``base`` as ``token``'s user:
    its answer, or 1 after saying on stderr why there is none."""
    return _ask_json(command, base, path, token, json.dumps(body).encode())


def _ask_json(command: str, base: str, path: str, token: str, body: bytes | None = None) -> Any:
    """GET (or with ``body``, POST) ``path`` of the daemon at ``base`` as
    ``token``'s user: its answer, or 1 after saying on stderr why there is none."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        base + path,
        data=body,
        method="GET" if body is None else "POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")
        if command == "open" and "current_password" in detail:
            detail += " (give the password on stdin with --password-stdin)"
        return _fail(command, f"{base} refused: {exc.code} {detail}", 1)
    except (urllib.error.URLError, OSError) as exc:
        return _fail(command, f"cannot reach {base} (is it running?): {exc}", 1)


def _top_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=None,
        help="the daemon's base URL (default: the one the daemon wrote to <data-dir>/url,"
        f" else {DEFAULT_URL})",
    )
    _add_data_dir(parser)
    parser.add_argument("--token", default=None, help="token (default: <data-dir>/token)")
    parser.add_argument(
        "--watch", type=_watch_seconds, default=0.0, metavar="S", help="refresh every S seconds"
    )
    parser.add_argument("--limit", type=int, default=40, help="rows to show (busiest first)")


def flatten_tree(tree: dict[str, Any], depth: int = 0) -> list[tuple[int, dict[str, Any]]]:
    """The supervision tree of ``/debug/actors`` as (depth, child) rows."""
    rows: list[tuple[int, dict[str, Any]]] = []
    for child in tree.get("children", []):
        rows.append((depth, child))
        if "supervisor" in child:
            rows.extend(flatten_tree(child["supervisor"], depth + 1))
    return rows


def _shown(table: str) -> str:
    """``table`` with its control characters (but newlines) escaped: a
    terminal shows a name as it is, and does not run an escape sequence in
    one (an actor's crash message may quote what a client sent)."""
    return escape_controls(table, keep_newlines=True)


def format_top(
    tree: dict[str, Any],
    limit: int,
    previous: dict[str, int] | None = None,
    interval_s: float = 0.0,
) -> str:
    """A table of the tree: supervisors in order, then the actors with the
    deepest mailboxes first, then the busiest: with ``previous`` (each
    actor's ``handled`` count ``interval_s`` ago, from :func:`handled_counts`)
    the messages per second since, else the messages handled in all."""
    rows = flatten_tree(tree)
    actors = [c for _, c in rows if "supervisor" not in c]
    supervisors = [(d, c) for d, c in rows if "supervisor" in c]
    rates: dict[str, float] = {}
    if previous is not None and interval_s > 0:
        for actor in actors:
            handled = int(actor.get("handled", 0))
            before = previous.get(actor["id"], handled)
            rates[actor["id"]] = max(0, handled - before) / interval_s
    actors.sort(
        key=lambda c: (
            -int(c.get("mailbox_depth", 0)),
            -rates.get(c["id"], 0.0),
            -int(c.get("handled", 0)),
            c["id"],
        )
    )
    lines = [f"{'supervisor':<40} {'state':<10} {'children':>8} {'restarts':>8}"]
    for depth, sup in supervisors:
        name = "  " * depth + sup["id"]
        kids = len(sup["supervisor"].get("children", []))
        lines.append(f"{name:<40} {sup['state']:<10} {kids:>8} {sup['restarts']:>8}")
    lines.append("")
    lines.append(
        f"{'actor':<56} {'state':<10} {'mailbox':>11} {'handled':>9} {'msgs/s':>8}"
        f" {'restarts':>8}  last crash"
    )
    for actor in actors[:limit]:
        mailbox = f"{actor.get('mailbox_depth', '-')}/{actor.get('mailbox_bound', '-')}"
        rate = f"{rates[actor['id']]:.1f}" if actor["id"] in rates else "-"
        lines.append(
            f"{actor['id'][:56]:<56} {actor['state']:<10} {mailbox:>11} "
            f"{actor.get('handled', '-'):>9} {rate:>8} {actor['restarts']:>8}"
            f"  {actor.get('last_crash') or ''}"
        )
    if len(actors) > limit:
        lines.append(f"... and {len(actors) - limit} more actors")
    return _shown("\n".join(lines))


def _size(n: int) -> str:
    """A byte count in at most 6 characters (``812``, ``13.4K``, ``2.1M``)."""
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def format_connections(
    listing: dict[str, Any],
    limit: int,
    previous: dict[str, tuple[int, int]] | None = None,
    interval_s: float = 0.0,
) -> str:
    """The busiest connections of ``/debug/connections``: the deepest
    outboxes first, then the most frames a second (with ``previous``, each
    connection's frames received and sent ``interval_s`` ago, from
    :func:`frame_counts`), else the most frames in all."""
    rows = list(listing.get("connections", []))
    rates: dict[str, tuple[float, float]] = {}
    if previous is not None and interval_s > 0:
        for row in rows:
            before = previous.get(row["connection_id"])
            if before is not None:
                rates[row["connection_id"]] = (
                    max(0, row["frames_received"] - before[0]) / interval_s,
                    max(0, row["frames_sent"] - before[1]) / interval_s,
                )
    rows.sort(
        key=lambda r: (
            -int(r["outbox_messages"]),
            -sum(rates.get(r["connection_id"], (0.0, 0.0))),
            -(int(r["frames_received"]) + int(r["frames_sent"])),
            r["connection_id"],
        )
    )
    lines = [
        f"{'connection':<36} {'user':<12} {'codec':<5} {'frames in/out':>15} {'fr/s in/out':>13}"
        f" {'bytes in/out':>13} {'outbox':>11} {'calls':>5}  rooms"
    ]
    for row in rows[:limit]:
        rate = rates.get(row["connection_id"])
        shown_rate = f"{rate[0]:.1f}/{rate[1]:.1f}" if rate is not None else "-"
        frames = f"{row['frames_received']}/{row['frames_sent']}"
        sizes = f"{_size(row['bytes_received'])}/{_size(row['bytes_sent'])}"
        outbox = f"{row['outbox_messages']}/{_size(row['outbox_bytes'])}"
        codec = str(row["codec"]).rsplit(".", 1)[-1]
        rooms = row.get("rooms", [])
        shown_rooms = ", ".join(rooms[:3]) + (f" +{len(rooms) - 3}" if len(rooms) > 3 else "")
        lines.append(
            f"{row['connection_id'][:36]:<36} {str(row['user_id'])[:12]:<12} {codec:<5}"
            f" {frames:>15} {shown_rate:>13} {sizes:>13} {outbox:>11}"
            f" {row['pending_calls']:>5}  {shown_rooms}"
        )
    total = int(listing.get("total", len(rows)))
    if total > min(limit, len(rows)):
        lines.append(f"... {total} connections in all")
    return _shown("\n".join(lines))


def frame_counts(listing: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Each connection's frames received and sent so far (for the next rates)."""
    return {
        row["connection_id"]: (int(row["frames_received"]), int(row["frames_sent"]))
        for row in listing.get("connections", [])
    }


def handled_counts(tree: dict[str, Any]) -> dict[str, int]:
    """Each actor's messages handled so far, by id (for the next rates)."""
    return {
        c["id"]: int(c.get("handled", 0)) for _, c in flatten_tree(tree) if "supervisor" not in c
    }


def describe_url_error(url: str, exc: BaseException) -> str:
    """One line for a failed HTTP request to the daemon."""
    import urllib.error

    if isinstance(exc, urllib.error.HTTPError):
        body = ""
        with contextlib.suppress(ValueError, AttributeError, OSError):
            body = str(json.loads(exc.read() or b"{}").get("message") or "")
        reason = http.HTTPStatus(exc.code).phrase if exc.code in _STATUS_CODES else exc.reason
        detail = f": {body}" if body else ""
        return f"{url} answered {exc.code} {reason}{detail}"
    cause: object = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(cause, OSError) and cause.strerror:
        text = cause.strerror[0].lower() + cause.strerror[1:]
    else:
        text = str(cause)
    return (
        f"cannot connect to {url}: {text} (is the daemon running? start it with agor-actors serve)"
    )


def daemon_url(url: str | None, data_dir: pathlib.Path) -> str:
    """``--url`` if given, else what the daemon serving ``data_dir`` wrote to
    ``<data_dir>/url`` when it started (read, never made), else the default
    ``http://127.0.0.1:3030``."""
    if url:
        return url
    with contextlib.suppress(OSError):
        written = (data_dir / URL_FILE).read_text().strip()
        if written.startswith(("http://", "https://")):
            return written
    return DEFAULT_URL


def _top(args: argparse.Namespace) -> int:
    import time
    import urllib.error
    import urllib.request

    if args.token:
        token, source = args.token, "--token"
    else:
        try:
            token = read_token(args.data_dir)
        except NoToken as exc:
            return _fail("top", f"{exc}; or pass --token")
        source = str(args.data_dir / "token")
    base = daemon_url(args.url, args.data_dir).rstrip("/")
    headers = {"Authorization": f"Bearer {token}"}
    request = urllib.request.Request(base + "/debug/actors", headers=headers)
    connections = urllib.request.Request(
        f"{base}/debug/connections?limit={max(1, min(args.limit, 1000))}", headers=headers
    )
    from .world import SystemWallClock

    wall = SystemWallClock()  # the world's seam for the time between two refreshes
    previous: dict[str, int] | None = None
    previous_frames: dict[str, tuple[int, int]] | None = None
    taken_s = 0.0
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                tree = json.loads(response.read())
            with urllib.request.urlopen(connections, timeout=5) as response:
                listing = json.loads(response.read())
            now_s = wall.now_ms() / 1000
        except urllib.error.HTTPError as exc:
            message = describe_url_error(request.full_url, exc)
            if exc.code in (401, 403):
                message += (
                    f"; the token from {source} is not this daemon's owner token:"
                    " pass the daemon's --data-dir or --token"
                )
            return _fail("top", message, 1)
        except (urllib.error.URLError, OSError) as exc:
            return _fail("top", describe_url_error(request.full_url, exc), 1)
        view = "\n\n".join(
            [
                format_top(tree, args.limit, previous, now_s - taken_s),
                format_connections(listing, args.limit, previous_frames, now_s - taken_s),
            ]
        )
        if args.watch > 0:
            # redraw in place: home, the view with each line's rest cleared, the screen's rest
            view = "\x1b[H" + view.replace("\n", "\x1b[K\n") + "\x1b[K\x1b[J"
        print(view, flush=True)
        if args.watch <= 0:
            return 0
        previous, previous_frames, taken_s = handled_counts(tree), frame_counts(listing), now_s
        time.sleep(args.watch)


def _open_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help="the daemon's base URL (default: as for top)")
    _add_data_dir(parser)
    parser.add_argument(
        "--token",
        default=os.environ.get("AGOR_TOKEN"),
        help="sign in as the user of this token (default: $AGOR_TOKEN, else the owner's)",
    )
    parser.add_argument("--board", default=None, help="open this board (default: the first one)")
    parser.add_argument(
        "--browser", action="store_true", help="also open the link in the default web browser"
    )
    parser.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the user's password from stdin (needed when --token is an access token"
        " from a password sign-in)",
    )


def _open(args: argparse.Namespace) -> int:
    """Ask the daemon for a one-time sign-in code; print (and open) the link."""
    import urllib.parse
    import webbrowser

    try:
        token = args.token or read_token(args.data_dir)
    except NoToken as exc:
        return _fail("open", str(exc))
    base = daemon_url(args.url, args.data_dir).rstrip("/")
    next_path = "/" if args.board is None else "/?board=" + urllib.parse.quote(args.board)
    if args.board is not None:
        # a link to a board that is not there (or not this user's) opens nothing
        board = _ask_json("open", base, "/boards/" + urllib.parse.quote(args.board, safe=""), token)
        if isinstance(board, int):
            return board
    body: dict[str, Any] = {"next": next_path}
    if args.password_stdin:
        body["current_password"] = sys.stdin.readline().rstrip("\r\n")
    answer = _post_json("open", base, "/auth/codes", token, body)
    if isinstance(answer, int):
        return answer
    link = base + answer["path"]
    print(link)
    print(f"(one use, valid {answer['expires_in_s']:.0f} s)", file=sys.stderr)
    if args.browser:
        webbrowser.open(link)
    return 0


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """A subcommand that parses its own options (see ``PASSTHROUGH``)."""


def _sim(args: argparse.Namespace) -> int:
    """``agor-actors sim ...`` is ``python -m sim ...`` (which re-executes
    itself with the hash seed pinned)."""
    from sim import main as sim_main

    return sim_main(list(args.passthrough))


COMMANDS: Final[
    dict[
        str,
        tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]],
    ]
] = {
    "serve": ("run the daemon", _serve_arguments, _serve),
    "token": (
        "print (or --rotate: renew) the local owner's token (a daemon must have run there)",
        _token_arguments,
        _token,
    ),
    "top": ("show the supervision tree of a running daemon", _top_arguments, _top),
    "backup": (
        "copy a data dir (the database as one snapshot, while a daemon runs; the token and keys)",
        _backup_arguments,
        _backup,
    ),
    "open": ("print a one-time link that signs a browser in", _open_arguments, _open),
    "sim": ("run the deterministic simulator (see python -m sim --help)", _no_arguments, _sim),
}
"""Subcommand -> (help, add its arguments, run it and return the exit status)."""

PASSTHROUGH: Final = frozenset({"sim"})
"""Subcommands whose options (``--help`` too) go to them unparsed, in
``args.passthrough``."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agor-actors", description="agor-actors: the daemon and its tools"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        sub = commands.add_parser(
            name, help=help_text, description=help_text, add_help=name not in PASSTHROUGH
        )
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in PASSTHROUGH:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.passthrough = extra
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
