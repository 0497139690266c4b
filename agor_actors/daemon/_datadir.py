"""The data dir is private and has one user at a time.

``<data_dir>`` is made (or narrowed to) mode 0700, the files the runtime keeps
there are 0600 whatever the umask, and an exclusive ``flock`` on
``<data_dir>/lock`` is held for as long as a hub runs on it: a second daemon
or embedded runtime on the same dir is refused with :class:`DataDirLocked`
instead of writing the same rooms' seqs behind the first one's back.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
from collections.abc import Iterator
from typing import Final

__all__ = ["LOCK_FILE", "PRIVATE_FILES", "DataDirLocked", "hold_data_dir", "make_private"]

LOCK_FILE: Final = "lock"
# Files the runtime keeps in the data dir; narrowed to 0600 when found wider.
PRIVATE_FILES: Final = (
    "token",
    "web-secret",
    "jwt-secret",
    "agor.db",
    "agor.db-wal",
    "agor.db-shm",
    LOCK_FILE,
    "url",
)
_DIR_MODE: Final = 0o700
_FILE_MODE: Final = 0o600


class DataDirLocked(Exception):
    """Another process (or another runtime in this one) holds the data dir."""


def make_private(data_dir: pathlib.Path) -> None:
    """Make ``data_dir`` (mode 0700) and narrow the runtime's files in it to
    0600.  Raises :class:`OSError` when the dir cannot be made."""
    data_dir.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    os.chmod(data_dir, _DIR_MODE)
    for name in PRIVATE_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(data_dir / name, _FILE_MODE)


@contextlib.contextmanager
def hold_data_dir(data_dir: pathlib.Path) -> Iterator[None]:
    """Make ``data_dir`` private and hold its lock for the block.  Raises
    :class:`DataDirLocked` at once (never waits) when it is held elsewhere."""
    make_private(data_dir)
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
    try:
        os.fchmod(fd, _FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            by = f" (pid {holder})" if holder.isdigit() else ""
            raise DataDirLocked(
                f"the data dir {data_dir} is in use by another agor-actors process{by};"
                " stop it or use another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
