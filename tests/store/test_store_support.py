"""Shared helpers for the store tests (no tests here).

Each test runs against a real SQLite file in ``tmp_path`` and, when
``AGOR_TEST_PG_URL`` is set, against PostgreSQL in a schema of its own
(created before and dropped after the test, so concurrent runs cannot meet).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from agor_actors.store import EventDraft, Mutation, SqlStore, WriteRequest, open_store
from tests.pg_schema import fresh_schema

PG_URL = os.environ.get("AGOR_TEST_PG_URL", "")

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param(
        "postgresql",
        id="postgresql",
        marks=pytest.mark.skipif(
            not PG_URL, reason="AGOR_TEST_PG_URL is not set (.ci/run sets it): PostgreSQL skipped"
        ),
    ),
]


class Epochs:
    """A deterministic ``new_epoch`` for tests: epoch-1, epoch-2, ..."""

    def __init__(self) -> None:
        self.drawn = 0

    def __call__(self) -> str:
        self.drawn += 1
        return f"epoch-{self.drawn}"


class Backend:
    """One test database; :meth:`open` opens stores on it (closed at the end)."""

    def __init__(self, kind: str, url: str, schema: str | None) -> None:
        self.kind = kind
        self.url = url
        self.schema = schema
        self.epochs = Epochs()
        self._stores: list[SqlStore] = []

    def open(self) -> SqlStore:
        store = open_store(self.url, new_epoch=self.epochs)
        self._stores.append(store)
        return store

    def admin(self, *statements: str) -> list[Any]:
        """Run raw SQL on the test database, outside any store; returns the
        first column of the last statement's rows, if any."""
        engine = sa.create_engine(self.url, poolclass=NullPool)
        try:
            with engine.begin() as conn:
                result: list[Any] = []
                for statement in statements:
                    cursor = conn.exec_driver_sql(statement)
                    result = list(cursor.scalars()) if cursor.returns_rows else []
                return result
        finally:
            engine.dispose()

    def close(self) -> None:
        for store in self._stores:
            store.close()
        self._stores.clear()


@contextmanager
def backend(kind: str, tmp_path: Path) -> Iterator[Backend]:
    if kind == "sqlite":
        path = tmp_path / "agor.db"
        b = Backend(kind, f"sqlite:///{path}", None)
        try:
            yield b
        finally:
            b.close()
        return
    with fresh_schema(PG_URL, "agor_test") as (url, schema):
        b = Backend(kind, url, schema)
        try:
            yield b
        finally:
            b.close()


# --------------------------------------------------------------------------- builders


def add_session(session_id: str, *, ts: int = 1, **values: Any) -> Mutation:
    return Mutation(
        "insert", "sessions", {"id": session_id}, {"created_at": ts, "updated_at": ts, **values}
    )


def add_task(task_id: str, session_id: str, *, ts: int = 1, **values: Any) -> Mutation:
    return Mutation(
        "insert",
        "tasks",
        {"id": task_id},
        {"session_id": session_id, "created_at": ts, "updated_at": ts, **values},
    )


def ev(room: str, name: str = "sessions:patched", n: int = 0, **kwargs: Any) -> EventDraft:
    return EventDraft(room=room, event=name, data={"n": n}, ts=1000 + n, **kwargs)


def only_events(*drafts: EventDraft) -> WriteRequest:
    return WriteRequest(events=drafts)


def room_seqs(store: SqlStore, room: str) -> list[tuple[int, int]]:
    """Every (seq, end_seq) range logged in ``room``, in order."""
    return [(e.seq, e.end_seq) for e in store.events_since(room, 0, limit=100_000)]


def assert_gap_free(store: SqlStore, room: str, head: int) -> None:
    """The logged ranges of ``room`` tile 1..head exactly, and the room's
    head says so too."""
    expected_start = 1
    for seq, end in room_seqs(store, room):
        assert seq == expected_start, (room, seq, expected_start)
        assert end >= seq
        expected_start = end + 1
    assert expected_start - 1 == head
    current = store.room_head(room)
    if head == 0:
        assert current is None or current[1] == 0
    else:
        assert current is not None and current[1] == head
