"""Fixtures of the client tests: a real daemon core on 127.0.0.1."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator

import pytest
from client_support import Daemon, daemon


@pytest.fixture
async def running(tmp_path: pathlib.Path) -> AsyncIterator[Daemon]:
    """A daemon core (hub on a SQLite file) served on a free port."""
    async with daemon(tmp_path / "agor") as d:
        yield d
