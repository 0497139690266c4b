"""A full disk: SQLite's "database or disk is full" (here a size limit,
``max_page_count``, which fails the same way) is :class:`StoreFull`, and a
client is told the disk is full, not only that the store is unavailable;
reads go on.  (That writes go on once there is room again was checked by
hand, on a tmpfs remounted larger: nothing to restart.)"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from trio.testing import MockClock

from agor_actors.daemon import ServiceError, open_hub
from agor_actors.store import Mutation, SqlStore, StoreFull, WriteRequest, WriteResult, open_store
from agor_actors.world import simulated_world


@pytest.fixture
def small_store(tmp_path: pathlib.Path) -> Iterator[tuple[SqlStore, list[int]]]:
    """A SQLite file whose connections may grow it to ``limit[0]`` pages."""
    path = str(tmp_path / "small.db")
    limit = [1_000_000]

    def cap(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        if any(row[2] == path for row in cursor.execute("PRAGMA database_list")):
            cursor.execute(f"PRAGMA max_page_count={limit[0]}")
        cursor.close()

    sa.event.listen(sa.engine.Engine, "connect", cap)
    try:
        limit[0] = 80
        store = open_store(f"sqlite:///{path}", new_epoch=lambda: "e")
        yield store, limit
        store.close()
    finally:
        sa.event.remove(sa.engine.Engine, "connect", cap)


def _user(i: int, chars: int) -> WriteRequest:
    values = {"name": f"{i}-" + "x" * chars, "token_hash": f"h{i}", "is_owner": False}
    values["created_at"] = 1
    return WriteRequest(mutations=(Mutation("insert", "users", {"id": f"u{i}"}, values),))


def test_a_full_database_is_store_full_and_reads_go_on(
    small_store: tuple[SqlStore, list[int]],
) -> None:
    store, _ = small_store
    results = [store.commit([_user(i, 20_000)])[0] for i in range(30)]
    full = [r for r in results if not isinstance(r, WriteResult)]
    assert full and all(isinstance(r, StoreFull) for r in full), results
    assert isinstance(results[0], WriteResult)
    assert store.get("users", "u0") is not None


async def test_a_client_is_told_the_disk_is_full(
    small_store: tuple[SqlStore, list[int]], autojump_clock: MockClock
) -> None:
    store, _ = small_store
    async with open_hub(simulated_world(1), store=store, owner_token="owner-token") as hub:
        owner = await hub.authenticate("owner-token")
        assert owner is not None
        made = await hub.call(
            owner, connection_id=None, service="sessions", method="create", data={"title": "s"}
        )
        with pytest.raises(ServiceError) as refused:
            for _ in range(40):
                await hub.call(
                    owner,
                    connection_id=None,
                    service="messages",
                    method="create",
                    data={"session_id": made["id"], "role": "user", "content": "m" * 60_000},
                )
        assert refused.value.code == "unavailable"
        assert refused.value.message == (
            "the store's disk is full: writes fail until there is room"
        )
        # reads go on
        got = await hub.call(
            owner, connection_id=None, service="sessions", method="get", id=made["id"]
        )
        assert got["id"] == made["id"]
