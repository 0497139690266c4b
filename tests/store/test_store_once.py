"""Idempotency keys (``WriteRequest.once``): a key is taken in the write's
own transaction, a request under a taken key writes nothing and gets the
first write's answer, and old keys are dropped.  SQLite and, with
``AGOR_TEST_PG_URL``, PostgreSQL (two stores on one database: two daemons)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_store_support import BACKENDS, Backend, add_session, backend, ev, room_seqs

from agor_actors.store import (
    Mutation,
    Once,
    StoreNotFound,
    StoreRepeated,
    WriteRequest,
    WriteResult,
)


@pytest.fixture(params=BACKENDS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    with backend(request.param, tmp_path) as b:
        yield b


def once(key: str, answer: object = None, *, ts: int = 1, digest: str = "d") -> Once:
    return Once("u-1", key, "sessions.create", digest, answer, ts)


def created(session_id: str, key: str, *, ts: int = 1) -> WriteRequest:
    return WriteRequest(
        mutations=(add_session(session_id, title=session_id),),
        events=(ev(f"session:{session_id}"),),
        once=once(key, {"id": session_id}, ts=ts),
    )


def test_a_request_under_a_taken_key_writes_nothing(db: Backend) -> None:
    store = db.open()
    # the second in the same group, the third in a later one
    first, second = store.commit([created("s-1", "k-1"), created("s-2", "k-1")])
    assert isinstance(first, WriteResult)
    assert isinstance(second, StoreRepeated)
    # the answer as its caller got it: with the seq of its first event
    answer = {"id": "s-1", "_seq": 1}
    assert (second.call, second.digest, second.answer) == ("sessions.create", "d", answer)
    (third,) = store.commit([created("s-3", "k-1")])
    assert isinstance(third, StoreRepeated) and third.answer == answer
    assert store.get("sessions", "s-2") is None and store.get("sessions", "s-3") is None
    assert room_seqs(store, "session:s-1") == [(1, 1)]
    assert room_seqs(store, "session:s-2") == [] and room_seqs(store, "session:s-3") == []
    # another user's same key is another write
    other = WriteRequest(
        mutations=(add_session("s-4"),), once=Once("u-2", "k-1", "sessions.create", "d", None, 1)
    )
    assert isinstance(store.commit([other])[0], WriteResult)
    assert store.check_key("u-1", "k-1") == ("sessions.create", "d", answer)
    assert store.check_key("u-1", "k-9") is None


def test_a_failed_request_does_not_take_its_key(db: Backend) -> None:
    store = db.open()
    missing = WriteRequest(
        mutations=(Mutation("update", "sessions", {"id": "nope"}, {"title": "x"}),),
        once=once("k-1"),
    )
    (failed,) = store.commit([missing])
    assert isinstance(failed, StoreNotFound)
    assert store.check_key("u-1", "k-1") is None
    (written,) = store.commit([created("s-1", "k-1")])
    assert isinstance(written, WriteResult)


def test_old_keys_are_dropped(db: Backend) -> None:
    store = db.open()
    store.commit([created(f"s-{n}", f"k-{n}", ts=n) for n in range(1, 6)])
    assert store.forget_keys(before_ms=4) == 3  # taken at 1, 2 and 3
    assert [store.check_key("u-1", f"k-{n}") is None for n in range(1, 6)] == [
        True,
        True,
        True,
        False,
        False,
    ]
    assert store.forget_keys(before_ms=100, limit=1) >= 1  # bounded passes
    assert store.forget_keys(before_ms=100) <= 1
    assert all(store.check_key("u-1", f"k-{n}") is None for n in range(1, 6))
    (again,) = store.commit([created("s-9", "k-1", ts=200)])  # a dropped key is free
    assert isinstance(again, WriteResult)


def test_two_stores_racing_for_one_key_write_once(db: Backend) -> None:
    """Two daemons on one database get the same write at once (a client
    that moved to the other one sent it again): one writes it, the other
    is told it was written."""
    stores = [db.open(), db.open()]
    results: list[object] = []
    start = threading.Barrier(2)

    def commit(n: int) -> None:
        start.wait()
        results.extend(stores[n].commit([created(f"s-{n}", "k-1")]))

    threads = [threading.Thread(target=commit, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(type(r).__name__ for r in results) == ["StoreRepeated", "WriteResult"]
    written = [n for n in range(2) if stores[0].get("sessions", f"s-{n}") is not None]
    assert len(written) == 1
    repeated = next(r for r in results if isinstance(r, StoreRepeated))
    assert repeated.answer == {"id": f"s-{written[0]}", "_seq": 1}
