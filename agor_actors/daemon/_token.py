"""The local owner's token: ``<data_dir>/token``, created on first use."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable
from typing import Final

from ..world import Entropy

__all__ = [
    "JWT_SECRET_FILE",
    "TOKEN_FILE",
    "read_or_create_secret",
    "read_or_create_token",
    "stage_secret",
]

TOKEN_FILE: Final = "token"
JWT_SECRET_FILE: Final = "jwt-secret"
"""The HS256 key of the access tokens (see ``agor_actors.identity``)."""


def read_or_create_token(data_dir: pathlib.Path, entropy: Entropy) -> str:
    """The owner token in ``<data_dir>/token``; created (``entropy.token()``,
    mode 0600) when missing."""
    return read_or_create_secret(data_dir / TOKEN_FILE, entropy.token)


def read_or_create_secret(path: pathlib.Path, new_secret: Callable[[], str]) -> str:
    """The secret in the file ``path``; created with ``new_secret()``, mode
    0600, when missing (its directory too).  Safe against a concurrent
    creator: whoever creates the file first wins and the other reads it."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = new_secret()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as file:
        file.write(secret + "\n")
    return secret


def stage_secret(path: pathlib.Path, secret: str) -> pathlib.Path:
    """Write ``secret`` (mode 0600) beside the file ``path``, to take its
    place by ``os.replace(staged, path)``: a reader of ``path`` finds the old
    secret or the new one, never a part.  Returns the staged file."""
    staged = path.with_name(path.name + ".new")
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(secret + "\n")
        file.flush()
        os.fsync(file.fileno())
    return staged
