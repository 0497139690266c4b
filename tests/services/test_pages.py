"""A ``find`` page of what a principal may see (``visible_page``) over a real
SQLite store, and the sealed cursors a client gets (``CursorSeal``)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agor_actors.domain import ServiceError
from agor_actors.services import CursorSeal, visible_page
from agor_actors.store import Mutation, Page, SqlStore, WriteRequest, open_store

N = 40


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    s = open_store(f"sqlite:///{tmp_path / 'agor.db'}", new_epoch=lambda: "epoch-1")
    rows = [
        Mutation(
            "insert",
            "sessions",
            {"id": f"s{i:02d}"},
            {
                "title": f"{'mine' if i % 10 == 3 else 'other'} {i:02d}",
                "created_at": i,
                "updated_at": i,
            },
        )
        for i in range(N)
    ]
    s.commit([WriteRequest(mutations=rows)])
    try:
        yield s
    finally:
        s.close()


def pager(store: SqlStore, scan_rows: int = 2_000, narrow: tuple[str, ...] | None = None) -> Any:
    reads: list[dict[str, Any]] = []

    async def find(query: dict[str, Any]) -> Page:
        reads.append(query)
        return store.find("sessions", query, cursors=True)

    async def visible(row: dict[str, Any]) -> bool:
        return str(row["title"]).startswith("mine")

    async def page(query: dict[str, Any]) -> tuple[list[str], str | None]:
        rows, after = await visible_page(find, query, visible, scan_rows=scan_rows, narrow=narrow)
        page.rows = rows  # type: ignore[attr-defined]
        return [r["id"] for r in rows], after

    page.reads = reads  # type: ignore[attr-defined]
    return page


async def test_a_page_skips_what_is_not_visible_and_stops_after_its_last_row(
    store: SqlStore,
) -> None:
    page = pager(store)
    got, after = await page({"$limit": 2})
    assert got == ["s03", "s13"]
    assert after is not None
    # the cursor is the last visible row's: the next page starts right after it
    got, after = await page({"$limit": 2, "$cursor": after})
    assert got == ["s23", "s33"]
    assert after is None  # past s33 nothing visible: no cursor, whatever follows
    got, after = await page({"title": "other 05", "$limit": 1})
    assert (got, after) == ([], None)


async def test_a_page_that_ends_on_its_last_visible_row_has_no_cursor(store: SqlStore) -> None:
    page = pager(store)
    got, after = await page({"$limit": 4})
    assert (got, after) == (["s03", "s13", "s23", "s33"], None)
    got, after = await page({"$limit": 5})
    assert (got, after) == (["s03", "s13", "s23", "s33"], None)


async def test_past_the_scan_budget_a_page_ends_early_and_goes_on_from_there(
    store: SqlStore,
) -> None:
    page = pager(store, scan_rows=12)
    got, after = await page({"$limit": 3})
    # read s00-s02 (3), then s03-s102... in steps of 100: one step covers the rest
    assert got == ["s03", "s13", "s23"]
    short = pager(store, scan_rows=2)
    got, after = await short({"$limit": 2, "$sort": {"created_at": 1}})
    assert got == [] and after is not None  # s00, s01 read, nothing visible yet
    seen: list[str] = []
    while after is not None:
        got, after = await short({"$limit": 2, "$sort": {"created_at": 1}, "$cursor": after})
        seen += got
    assert seen == ["s03", "s13", "s23", "s33"]


def key(n: int) -> str:
    return hashlib.sha512(f"key {n}".encode()).hexdigest()


def test_a_sealed_cursor_opens_only_unchanged_and_under_its_key() -> None:
    seal = CursorSeal(key(1))
    sealed = seal.seal("eyJmIjoiYWJjIiwiayI6WyJzMDEiXX0")
    assert "eyJ" not in sealed and seal.seal("eyJmIjoiYWJjIiwiayI6WyJzMDEiXX0") == sealed
    assert seal.open(sealed) == "eyJmIjoiYWJjIiwiayI6WyJzMDEiXX0"
    flipped = sealed[:-3] + ("A" if sealed[-3] != "A" else "B") + sealed[-2:]
    for bad in (flipped, sealed[:-4], "", "!!", 7, None, "x" * 9000):
        with pytest.raises(ServiceError) as refused:
            seal.open(bad)
        assert refused.value.code == "invalid_field"
    with pytest.raises(ServiceError):
        CursorSeal(key(2)).open(sealed)
    with pytest.raises(ValueError):
        CursorSeal("ab" * 16)


async def test_a_narrow_read_answers_the_same_rows_whole(store: SqlStore) -> None:
    # read with only the columns the check needs, then the visible rows whole
    for query in ({"$limit": 3}, {"$limit": 2, "$sort": {"title": -1}}, {"$select": ["title"]}):
        whole, narrow = pager(store), pager(store, narrow=("id", "title"))
        assert await whole(dict(query)) == await narrow(dict(query))
        assert narrow.rows == whole.rows and narrow.rows
    reads = pager(store, narrow=("id", "title"))
    await reads({"$limit": 2})
    # the scan read only the named columns (and the key); then two rows whole
    assert reads.reads[0]["$select"] == ["id", "title"]
    assert reads.reads[-1] == {"id": {"$in": ["s03", "s13"]}, "$limit": 2}
