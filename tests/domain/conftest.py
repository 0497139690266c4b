"""Fixtures of the domain tests: an in-memory SQLite store."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from agor_actors.store import SqlStore, open_store


@pytest.fixture
def store() -> Iterator[SqlStore]:
    """A store in memory whose epochs are ``epoch-1``, ``epoch-2``... in order."""
    epochs = itertools.count(1)
    store = open_store("sqlite://", new_epoch=lambda: f"epoch-{next(epochs)}")
    try:
        yield store
    finally:
        store.close()
