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

import attrs
import pytest
from test_store_support import BACKENDS, Backend, add_session, assert_gap_free, backend

from agor_actors.store import (
    Append,
    EventDraft,
    Mutation,
    SqlStore,
    StoreConflict,
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


def _chunk(
    message: str, text: str, planned: int, *, limit: int | None = None, expect: int | None = None
) -> WriteRequest:
    """A streamed chunk as a session actor plans it: its offset is what
    that actor believes the message's length to be."""
    append = Append(text, at="offset", limit=limit, expect=expect)
    return WriteRequest(
        mutations=[Mutation("update", "messages", {"id": message}, {"content": append})],
        events=[
            EventDraft(
                "session:s",
                "task:message",
                {"message_id": message, "chunk": text, "offset": planned},
                ts=1,
            )
        ],
    )


def _offsets(results: list[WriteResult]) -> list[tuple[int, str]]:
    return [(r.events[0].data["offset"], r.events[0].data["chunk"]) for r in results]


def _two_with_a_message(db: Backend) -> tuple[SqlStore, SqlStore]:
    """Two shared stores on ``db``, which holds session ``s`` and its empty
    message ``m``."""
    first, second = _shared(db), _shared(db)
    message = Mutation(
        "insert",
        "messages",
        {"id": "m"},
        {"session_id": "s", "role": "assistant", "content": "", "created_at": 1, "updated_at": 1},
    )
    (made,) = first.commit([WriteRequest(mutations=[add_session("s"), message])])
    assert isinstance(made, WriteResult)
    return first, second


def test_a_shared_store_lands_each_chunk_where_the_message_ends(db: Backend) -> None:
    first, second = _two_with_a_message(db)
    landed: list[WriteResult] = []
    # both stores' callers believe the message empty: each chunk lands where
    # the row ends in the commit, and its event says so
    for store, texts in ((first, ("ab", "c")), (second, ("de",)), (first, ("f",))):
        results = store.commit([_chunk("m", text, 0) for text in texts])
        assert all(isinstance(r, WriteResult) for r in results), results
        landed += [r for r in results if isinstance(r, WriteResult)]
    assert _offsets(landed) == [(0, "ab"), (2, "c"), (3, "de"), (5, "f")]
    # a group whose plain run misses its row is redone with each request
    # isolated: the chunk still lands, once
    missing = WriteRequest(mutations=[Mutation("update", "sessions", {"id": "no"}, {"title": "t"})])
    results = second.commit([missing, _chunk("m", "g", 0), _chunk("gone", "x", 0)])
    assert isinstance(results[0], StoreNotFound) and isinstance(results[2], StoreNotFound)
    assert isinstance(results[1], WriteResult) and _offsets([results[1]]) == [(6, "g")]
    # past its limit, a chunk is refused and changes nothing
    too_long, fits = first.commit([_chunk("m", "hij", 0, limit=9), _chunk("m", "hi", 0, limit=9)])
    assert isinstance(too_long, StoreConflict) and too_long.current == 10
    assert isinstance(fits, WriteResult) and _offsets([fits]) == [(7, "hi")]
    row = second.get("messages", "m")
    assert row is not None and row["content"] == "abcdefghi"
    logged = [e for e in first.events_since("session:s", 0) if e.event == "task:message"]
    assert [(e.data["offset"], e.data["chunk"]) for e in logged] == [
        (0, "ab"),
        (2, "c"),
        (3, "de"),
        (5, "f"),
        (6, "g"),
        (7, "hi"),
    ]
    # a single writer takes the offsets its callers planned (they are right
    # when it is the only writer): no statement more per chunk
    single = db.open()
    (planned,) = single.commit([_chunk("m", "!", 4)])
    assert isinstance(planned, WriteResult) and _offsets([planned]) == [(4, "!")]


def test_a_chunk_that_names_its_offset_lands_only_there(db: Backend) -> None:
    """``Append.expect``: a chunk sent twice (through two daemons, after a
    lost connection) lands once, and one sent before the chunk it follows
    landed is refused, in a group and isolated alike, by a shared store and
    by a single writer that lands the request."""
    first, second = _two_with_a_message(db)
    (ab,) = first.commit([_chunk("m", "ab", 0, expect=0)])
    assert isinstance(ab, WriteResult) and _offsets([ab]) == [(0, "ab")]
    # the same chunk again, through the other store: refused, with the length
    (again,) = second.commit([_chunk("m", "ab", 0, expect=0)])
    assert isinstance(again, StoreConflict)
    assert (again.column, again.expected, again.current) == ("content", 0, 2)
    # in one group: the next chunk lands, one that skips a chunk does not
    cd, skipped = second.commit([_chunk("m", "cd", 0, expect=2), _chunk("m", "f", 0, expect=5)])
    assert isinstance(cd, WriteResult) and _offsets([cd]) == [(2, "cd")]
    assert isinstance(skipped, StoreConflict) and skipped.current == 4
    # a group redone with each request isolated checks it the same way
    missing = WriteRequest(mutations=[Mutation("update", "sessions", {"id": "no"}, {"title": "t"})])
    results = first.commit([missing, _chunk("m", "e", 0, expect=4), _chunk("m", "x", 0, expect=3)])
    assert isinstance(results[0], StoreNotFound)
    assert isinstance(results[1], WriteResult) and _offsets([results[1]]) == [(4, "e")]
    assert isinstance(results[2], StoreConflict) and results[2].current == 5
    # the limit still holds for a chunk at the right offset
    (too_long,) = first.commit([_chunk("m", "fgh", 0, expect=5, limit=7)])
    assert isinstance(too_long, StoreConflict) and too_long.expected != 5
    # a single writer checks it where it lands the request
    single = db.open()
    stale, fits = single.commit(
        [
            attrs.evolve(_chunk("m", "z", 0, expect=1), land=True),
            attrs.evolve(_chunk("m", "f", 0, expect=5), land=True),
        ]
    )
    assert isinstance(stale, StoreConflict) and stale.current == 5
    assert isinstance(fits, WriteResult) and _offsets([fits]) == [(5, "f")]
    row = second.get("messages", "m")
    assert row is not None and row["content"] == "abcdef"
