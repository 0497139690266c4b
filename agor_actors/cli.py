"""``agor-actors``: the daemon's command line.

``agor-actors serve [--host 127.0.0.1] [--port 3030] [--data-dir .agor] [--db URL]``
runs the daemon until SIGINT or SIGTERM (then drains and exits 0);
``agor-actors token [--data-dir .agor]`` prints the local owner's token
(creating it, mode 0600, if the daemon never ran there).

Each subcommand is one entry of ``COMMANDS`` (how to add its arguments, what
to run), so ``sim`` and ``top`` slot in beside these.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Final

__all__ = ["COMMANDS", "build_parser", "main", "read_or_create_token"]

TOKEN_FILE: Final = "token"


def read_or_create_token(data_dir: pathlib.Path) -> str:
    """The owner token in ``<data_dir>/token``; created (random, mode 0600)
    when missing, as the daemon does on its first start."""
    path = data_dir / TOKEN_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    from .world import SecureEntropy

    data_dir.mkdir(parents=True, exist_ok=True)
    token = SecureEntropy().token()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # made meanwhile by a starting daemon
        return path.read_text().strip()
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
    return token


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


COMMANDS: Final[
    dict[
        str,
        tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]],
    ]
] = {
    "serve": ("run the daemon", _serve_arguments, _serve),
    "token": ("print the local owner's token", _add_data_dir, _token),
}
"""Subcommand -> (help, add its arguments, run it and return the exit status)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agor-actors", description="agor-actors: the daemon and its tools"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
