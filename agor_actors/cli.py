"""``agor-actors``: the daemon's command line.

``agor-actors serve [--host 127.0.0.1] [--port 3030] [--data-dir .agor] [--db URL]``
runs the daemon until SIGINT or SIGTERM (then drains and exits 0);
``agor-actors token [--data-dir .agor]`` prints the local owner's token
(creating it, mode 0600, if the daemon never ran there).

Each subcommand is one entry of ``COMMANDS`` (how to add its arguments, what
to run).  ``agor-actors top [--watch S]`` shows the supervision tree of a
running daemon (``/debug/actors``): supervisors, then the actors with the
deepest mailboxes, their restarts and last crash.  ``agor-actors open
[--browser]`` prints a one-time link that signs a browser in to a running
daemon (the owner, or the user whose ``--token`` it is) and opens the board.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final

__all__ = ["COMMANDS", "build_parser", "main", "read_or_create_token"]


def read_or_create_token(data_dir: pathlib.Path) -> str:
    """The owner token in ``<data_dir>/token``; created (random, mode 0600)
    when missing, as the daemon does on its first start."""
    from .daemon._token import read_or_create_token as read_or_create
    from .world import SecureEntropy

    return read_or_create(data_dir, SecureEntropy())


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=pathlib.Path,
        default=pathlib.Path(os.environ.get("AGOR_DATA_DIR", ".agor")),
        help="where the database and the token live (default: .agor)",
    )


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=3030, help="port to bind (default 3030)")
    _add_data_dir(parser)
    parser.add_argument(
        "--db",
        default=None,
        metavar="URL",
        help="SQLAlchemy URL (default: sqlite:///<data-dir>/agor.db; "
        "PostgreSQL: postgresql+psycopg://...)",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )


def _serve(args: argparse.Namespace) -> int:
    from .server import serve

    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return serve(host=args.host, port=args.port, data_dir=args.data_dir, db_url=args.db)


def _token(args: argparse.Namespace) -> int:
    print(read_or_create_token(args.data_dir))
    return 0


def _top_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:3030", help="the daemon's base URL")
    _add_data_dir(parser)
    parser.add_argument("--token", default=None, help="token (default: <data-dir>/token)")
    parser.add_argument(
        "--watch", type=float, default=0.0, metavar="S", help="refresh every S seconds"
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


def format_top(tree: dict[str, Any], limit: int) -> str:
    """A table of the tree: supervisors in order, then the actors with the
    deepest mailboxes and most messages first."""
    rows = flatten_tree(tree)
    actors = [c for _, c in rows if "supervisor" not in c]
    supervisors = [(d, c) for d, c in rows if "supervisor" in c]
    actors.sort(key=lambda c: (-int(c.get("mailbox_depth", 0)), -int(c.get("handled", 0)), c["id"]))
    lines = [f"{'supervisor':<40} {'state':<10} {'children':>8} {'restarts':>8}"]
    for depth, sup in supervisors:
        name = "  " * depth + sup["id"]
        kids = len(sup["supervisor"].get("children", []))
        lines.append(f"{name:<40} {sup['state']:<10} {kids:>8} {sup['restarts']:>8}")
    lines.append("")
    lines.append(
        f"{'actor':<56} {'state':<10} {'mailbox':>11} {'handled':>9} {'restarts':>8}  last crash"
    )
    for actor in actors[:limit]:
        mailbox = f"{actor.get('mailbox_depth', '-')}/{actor.get('mailbox_bound', '-')}"
        lines.append(
            f"{actor['id'][:56]:<56} {actor['state']:<10} {mailbox:>11} "
            f"{actor.get('handled', '-'):>9} {actor['restarts']:>8}  {actor.get('last_crash') or ''}"
        )
    if len(actors) > limit:
        lines.append(f"... and {len(actors) - limit} more actors")
    return "\n".join(lines)


def _top(args: argparse.Namespace) -> int:
    import json
    import time
    import urllib.error
    import urllib.request

    token = args.token or read_or_create_token(args.data_dir)
    request = urllib.request.Request(
        args.url.rstrip("/") + "/debug/actors", headers={"Authorization": f"Bearer {token}"}
    )
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                tree = json.loads(response.read())
        except (urllib.error.URLError, OSError) as exc:
            print(f"agor-actors top: cannot read {request.full_url}: {exc}", file=sys.stderr)
            return 1
        if args.watch > 0:
            print("\x1b[2J\x1b[H", end="")
        print(format_top(tree, args.limit))
        if args.watch <= 0:
            return 0
        time.sleep(args.watch)


def _open_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:3030", help="the daemon's base URL")
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


def _open(args: argparse.Namespace) -> int:
    """Ask the daemon for a one-time sign-in code; print (and open) the link."""
    import json
    import urllib.error
    import urllib.parse
    import urllib.request
    import webbrowser

    token = args.token or read_or_create_token(args.data_dir)
    base = args.url.rstrip("/")
    next_path = "/" if args.board is None else "/?board=" + urllib.parse.quote(args.board)
    request = urllib.request.Request(
        base + "/auth/codes",
        data=json.dumps({"next": next_path}).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")
        print(f"agor-actors open: {base} refused: {exc.code} {detail}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"agor-actors open: cannot reach {base} (is it running?): {exc}", file=sys.stderr)
        return 1
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
    "token": ("print the local owner's token", _add_data_dir, _token),
    "top": ("show the supervision tree of a running daemon", _top_arguments, _top),
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
