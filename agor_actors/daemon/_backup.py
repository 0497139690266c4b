"""A copy of a data dir that a daemon can start on: the SQLite database as
one consistent snapshot (SQLite's online backup, while a daemon runs on
it: a daemon's recent writes are in ``agor.db-wal``, so a copy of
``agor.db`` alone can miss all of them), and the owner's token and the keys
beside it."""

from __future__ import annotations

import contextlib
import os
import pathlib
import sqlite3
from typing import Final

from ._token import JWT_SECRET_FILE, TOKEN_FILE

__all__ = ["DATABASE_FILE", "KEPT_FILES", "BackupError", "back_up_data_dir"]

DATABASE_FILE: Final = "agor.db"
KEPT_FILES: Final = (TOKEN_FILE, JWT_SECRET_FILE, "web-secret")
"""The secrets copied beside the database (the owner's token and the keys
that sign access tokens and browser cookies)."""

_BUSY_TIMEOUT_S: Final = 10.0


class BackupError(Exception):
    """The backup cannot be made; the message says why and what to do."""


def back_up_data_dir(data_dir: pathlib.Path, dest: pathlib.Path) -> list[str]:
    """Copy ``data_dir`` into the new directory ``dest`` (mode 0700, files
    0600); the names of the files written.  Raises :class:`BackupError`."""
    database = data_dir / DATABASE_FILE
    if not database.is_file():
        raise BackupError(
            f"no SQLite database at {database}: pass the daemon's --data-dir (a daemon on"
            " PostgreSQL is backed up with pg_dump, beside a copy of "
            f"{', '.join(KEPT_FILES)})"
        )
    try:
        dest.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        raise BackupError(f"{dest} exists: name a new directory") from None
    except OSError as exc:
        raise BackupError(f"cannot make {dest}: {exc.strerror}") from None
    written = [DATABASE_FILE]
    try:
        _snapshot(database, dest / DATABASE_FILE)
        for name in KEPT_FILES:
            with contextlib.suppress(FileNotFoundError):
                _copy_private(data_dir / name, dest / name)
                written.append(name)
    except BaseException:
        for name in written:
            with contextlib.suppress(OSError):
                (dest / name).unlink()
        with contextlib.suppress(OSError):
            dest.rmdir()
        raise
    return written


def _snapshot(database: pathlib.Path, to: pathlib.Path) -> None:
    """SQLite's online backup of ``database`` into the new file ``to``."""
    fd = os.open(to, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    try:
        with (
            contextlib.closing(sqlite3.connect(database, timeout=_BUSY_TIMEOUT_S)) as source,
            contextlib.closing(sqlite3.connect(to)) as target,
        ):
            source.backup(target)
    except sqlite3.Error as exc:
        raise BackupError(f"cannot back up {database}: {exc}") from None


def _copy_private(source: pathlib.Path, to: pathlib.Path) -> None:
    data = source.read_bytes()
    fd = os.open(to, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
