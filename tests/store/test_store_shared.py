"""A shared store: several stores (several daemons) write one database, and
each room still has one gap-free sequence.

Each store has an engine of its own (as a daemon in another process would)
and commits from its own threads at the same time as the others, into the
same rooms, in groups that name the rooms in different orders.  Every seq
is handed out once, the log of each room tiles 1..head, and what each
caller was told is what the log holds."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_store_support import BACKENDS, Backend, assert_gap_free, backend

from agor_actors.store import (
    EventDraft,
    Mutation,
    SqlStore,
    StoredEvent,
    StoreNotFound,
    WriteRequest,
    WriteResult,
    open_store,
)

ROOMS = ("board:b", "session:s")
STORES = 2
THREADS_PER_STORE = 2
GROUPS = 25


@pytest.fixture(params=BACKENDS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    with backend(request.param, tmp_path) as b:
        yield b


def _shared(db: Backend) -> SqlStore:
    store = open_store(db.url, new_epoch=db.epochs, shared=True)
    db._stores.append(store)  # closed with the backend
    return store


def _group(writer: str, n: int) -> list[WriteRequest]:
    """Three requests: events in both rooms (in an order that depends on
    the writer, so groups lock rooms named in opposite orders), a request
    that fails (its update misses its row: it takes no seq), one event."""
    rooms = ROOMS if n % 2 else ROOMS[::-1]
    tag = f"{writer}/{n}"
    return [
        WriteRequest(
            events=[EventDraft(room=r, event="x:made", data={"by": tag}, ts=n) for r in rooms]
        ),
        WriteRequest(
            mutations=[Mutation("update", "sessions", {"id": "missing"}, {"title": "t"})],
            events=[EventDraft(room=ROOMS[0], event="x:lost", data={"by": tag}, ts=n)],
        ),
        WriteRequest(
            events=[EventDraft(room=ROOMS[0], event="x:made", data={"by": tag, "k": 2}, ts=n)]
        ),
    ]


def test_stores_writing_one_room_at_once_share_one_sequence(db: Backend) -> None:
    stores = [_shared(db) for _ in range(STORES)]
    told: list[StoredEvent] = []
    failures: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(STORES * THREADS_PER_STORE)

    def write(store: SqlStore, writer: str) -> None:
        try:
            start.wait()
            for n in range(GROUPS):
                results = store.commit(_group(writer, n))
                assert isinstance(results[0], WriteResult), results[0]
                assert isinstance(results[1], StoreNotFound), results[1]
                assert isinstance(results[2], WriteResult), results[2]
                with lock:
                    told.extend(results[0].events + results[2].events)
        except BaseException as exc:  # reported by the main thread
            with lock:
                failures.append(exc)

    threads = [
        threading.Thread(target=write, args=(store, f"s{i}t{t}"))
        for i, store in enumerate(stores)
        for t in range(THREADS_PER_STORE)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []

    writers = STORES * THREADS_PER_STORE
    expected = {ROOMS[0]: 2 * GROUPS * writers, ROOMS[1]: GROUPS * writers}
    for room, count in expected.items():
        seqs = [e.seq for e in told if e.room == room]
        assert sorted(seqs) == list(range(1, count + 1)), room  # none twice, none skipped
        assert len({e.epoch for e in told if e.room == room}) == 1
        for store in stores:
            assert_gap_free(store, room, count)
        logged = {e.seq: e for e in stores[0].events_since(room, 0, limit=100_000)}
        for event in (e for e in told if e.room == room):
            assert logged[event.seq] == event  # what the caller was told is what is logged
        assert not any(e.event == "x:lost" for e in logged.values())


def test_a_shared_store_reads_heads_instead_of_remembering_them(db: Backend) -> None:
    first, second = _shared(db), _shared(db)
    room = ROOMS[0]
    (a,) = first.commit([WriteRequest(events=[EventDraft(room, "x", None, 1)])])
    (b,) = second.commit([WriteRequest(events=[EventDraft(room, "x", None, 2)])])
    (c,) = first.commit([WriteRequest(events=[EventDraft(room, "x", None, 3)])])
    assert isinstance(a, WriteResult) and isinstance(b, WriteResult)
    assert isinstance(c, WriteResult)
    assert [r.events[0].seq for r in (a, b, c)] == [1, 2, 3]
    assert first.cached_head(room) is None  # nothing remembered: another store writes too
    assert first.room_head(room) == second.room_head(room) == (a.events[0].epoch, 3)
    single = db.open()  # a single writer still remembers what it committed
    assert not single.shared
    (d,) = single.commit([WriteRequest(events=[EventDraft(room, "x", None, 4)])])
    assert isinstance(d, WriteResult) and d.events[0].seq == 4
    assert single.cached_head(room) == (a.events[0].epoch, 4)
