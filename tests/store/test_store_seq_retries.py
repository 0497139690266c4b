"""Seq allocation across failures and retries: a seq is handed out once.

The store's group commit has two ways to redo work: a group whose batched
statements fail is redone with every request isolated (``_RetryIsolated``:
a plain update that misses its row, an event row the database refuses), and
a group that fails as a whole (a refused ``COMMIT``) is retried by its
writers.  A commit whose answer is lost happened all the same.  Through all
of it, each room's log stays gap-free, every seq a caller was told about
keeps the event it was told about (never handed out again), and nothing of
a failed request is ever logged.

SQLite files only: the failures are injected the way the simulator injects
them (a ``commit`` event listener refusing the COMMIT, a trigger refusing an
event row), which the PostgreSQL variants in ``test_store_commit.py``
already cover for the group as a whole.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event as sa_event
from test_store_support import Backend, add_session, assert_gap_free, backend

from agor_actors.store import (
    Append,
    EventDraft,
    Expect,
    Mutation,
    SqlStore,
    StoreError,
    StoreNotFound,
    WriteRequest,
    WriteResult,
)


class Refusals:
    """Refuses the next ``COMMIT`` of a store's engine when armed (what a
    full disk at commit time looks like); counts the groups redone with
    every request isolated."""

    def __init__(self, store: SqlStore) -> None:
        self.armed = False
        self.refused = 0
        self.isolated = 0
        sa_event.listen(store.engine, "commit", self._on_commit)
        inner = store._commit_group

        def counting(requests: Any, *, isolate_events: bool) -> Any:
            if isolate_events:
                self.isolated += 1
            return inner(requests, isolate_events=isolate_events)

        store._commit_group = counting  # type: ignore[method-assign]

    def _on_commit(self, conn: Any) -> None:
        if self.armed:
            self.armed = False
            self.refused += 1
            raise sa.exc.OperationalError(
                "COMMIT", {}, sqlite3.OperationalError("disk I/O error (injected)")
            )


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Backend]:
    with backend("sqlite", tmp_path) as b:
        yield b


def _poison_trigger(db: Backend) -> None:
    db.admin(
        "CREATE TRIGGER IF NOT EXISTS poison_events BEFORE INSERT ON events "
        "WHEN NEW.event = 'poison' BEGIN SELECT RAISE(ABORT, 'poisoned event'); END"
    )


def _open(db: Backend) -> tuple[SqlStore, Refusals]:
    store = db.open()
    message = {"session_id": "anchor", "role": "assistant", "created_at": 1, "updated_at": 1}
    setup = WriteRequest(
        mutations=[
            Mutation("upsert", "sessions", {"id": "anchor"}, {"created_at": 1, "updated_at": 1}),
            Mutation("upsert", "messages", {"id": "m"}, message),
        ]
    )
    assert isinstance(store.commit([setup])[0], WriteResult)
    _poison_trigger(db)
    return store, Refusals(store)


def _chunk(rid: str, room: str, *, message: str = "m", merge: int = 1) -> WriteRequest:
    """A streamed chunk: one plain update (it joins a batched run)."""
    return WriteRequest(
        mutations=[Mutation("update", "messages", {"id": message}, {"content": Append(rid)})],
        events=[EventDraft(room, "task:message", {"rid": rid}, ts=1, merge_count=merge)],
    )


def _logged(store: SqlStore, room: str) -> dict[int, tuple[int, str]]:
    """seq -> (end seq, request id) of everything logged in ``room``."""
    return {e.seq: (e.end_seq, e.data["rid"]) for e in store.events_since(room, 0, limit=100_000)}


def test_a_missed_row_redoes_the_group_isolated_and_takes_no_seq(db: Backend) -> None:
    store, refusals = _open(db)
    results = store.commit(
        [
            _chunk("a", "r1"),
            _chunk("b", "r1", message="ghost"),  # misses its row: the run fails
            _chunk("c", "r1", merge=3),
            _chunk("d", "r2"),
        ]
    )
    assert refusals.isolated == 1
    assert isinstance(results[1], StoreNotFound)
    told = [
        [(e.room, e.seq, e.end_seq) for e in r.events]
        for r in results
        if isinstance(r, WriteResult)
    ]
    assert told == [[("r1", 1, 1)], [("r1", 2, 4)], [("r2", 1, 1)]]
    assert _logged(store, "r1") == {1: (1, "a"), 2: (4, "c")}
    # the store's memory of the heads agrees with the log: the next group
    # (batched again, no retry) continues right after, with no reuse
    results = store.commit([_chunk("e", "r1"), _chunk("f", "r2")])
    assert refusals.isolated == 1
    assert [r.events[0].seq for r in results if isinstance(r, WriteResult)] == [5, 2]
    assert_gap_free(store, "r1", 5)
    assert_gap_free(store, "r2", 2)
    assert store.cached_head("r1") == store.room_head("r1")


def test_a_refused_event_row_redoes_the_group_isolated(db: Backend) -> None:
    store, refusals = _open(db)
    poison = WriteRequest(
        events=[
            EventDraft("r1", "e", {"rid": "p1"}, ts=1),
            EventDraft("r1", "poison", {"rid": "p2"}, ts=1),
        ]
    )
    results = store.commit([_chunk("a", "r1"), poison, _chunk("b", "r1")])
    assert refusals.isolated == 1
    assert isinstance(results[1], StoreError)
    assert _logged(store, "r1") == {1: (1, "a"), 2: (2, "b")}
    assert store.cached_head("r1") == store.room_head("r1")


def test_a_refused_commit_then_the_retry_gets_the_seqs_nobody_saw(db: Backend) -> None:
    store, refusals = _open(db)
    store.commit([_chunk("a", "r1")])
    refusals.armed = True
    group = [_chunk("b", "r1"), _chunk("c", "r1", message="ghost"), _chunk("d", "r1")]
    failed = store.commit(group)
    assert refusals.refused == 1 and all(isinstance(r, StoreError) for r in failed)
    assert _logged(store, "r1") == {1: (1, "a")}
    retried = store.commit(group)
    assert [
        [e.seq for e in r.events] if isinstance(r, WriteResult) else type(r).__name__
        for r in retried
    ] == [[2], "StoreNotFound", [3]]
    assert_gap_free(store, "r1", 3)


# --------------------------------------------------------------------------- any interleaving

ROOMS = ("r1", "r2", "r3")
KINDS = ("chunk", "merged", "create", "missed", "poison", "conflict", "bad column")

_request = st.tuples(st.sampled_from(KINDS), st.sampled_from(ROOMS))
_step = st.one_of(
    st.tuples(st.just("group"), st.lists(_request, min_size=1, max_size=6)),
    st.tuples(st.just("refused"), st.lists(_request, min_size=1, max_size=6)),
    st.tuples(st.just("answer lost"), st.lists(_request, min_size=1, max_size=4)),
    st.tuples(st.just("reopen"), st.just([])),
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan=st.lists(_step, min_size=1, max_size=12))
def test_no_seq_is_handed_out_twice_through_failures_and_retries(
    tmp_path_factory: pytest.TempPathFactory, plan: list[tuple[str, list[tuple[str, str]]]]
) -> None:
    with backend("sqlite", tmp_path_factory.mktemp("seq")) as db:
        store, refusals = _open(db)
        ids = itertools.count()
        told: dict[tuple[str, int], tuple[int, str]] = {}  # (room, seq) -> (end, rid)
        failed: set[str] = set()
        unseen: set[str] = set()  # committed, answer lost

        def build(kind: str, room: str) -> tuple[str, WriteRequest]:
            rid = f"q{next(ids)}"
            if kind == "chunk":
                return rid, _chunk(rid, room)
            if kind == "merged":
                return rid, _chunk(rid, room, merge=3)
            if kind == "missed":
                return rid, _chunk(rid, room, message="ghost")
            draft = EventDraft(room, "poison" if kind == "poison" else "e", {"rid": rid}, ts=1)
            if kind == "create":
                return rid, WriteRequest(mutations=[add_session(rid)], events=[draft])
            if kind == "conflict":
                expect = Expect("sessions", {"id": "anchor"}, "title", "never")
                return rid, WriteRequest(expect=[expect], events=[draft])
            if kind == "bad column":
                bad = Mutation("update", "messages", {"id": "m"}, {"colour": "red"})
                return rid, WriteRequest(mutations=[bad], events=[draft])
            return rid, WriteRequest(events=[draft])  # poison: refused by the database

        for action, requests in plan:
            if action == "reopen":
                store.close()
                store, refusals = _open(db)
                continue
            built = [build(kind, room) for kind, room in requests]
            refusals.armed = action == "refused"
            results = store.commit([request for _, request in built])
            refusals.armed = False
            for (rid, _), result in zip(built, results, strict=True):
                if action == "answer lost" and isinstance(result, WriteResult):
                    unseen.add(rid)
                elif isinstance(result, WriteResult):
                    for e in result.events:
                        key = (e.room, e.seq)
                        assert key not in told, f"{key} handed out twice: {told[key]} and {rid}"
                        told[key] = (e.end_seq, rid)
                else:
                    failed.add(rid)
        for room in ROOMS:
            logged = _logged(store, room)
            head = max((end for end, _ in logged.values()), default=0)
            assert_gap_free(store, room, head)
            for (r, seq), entry in told.items():
                if r == room:
                    assert logged.get(seq) == entry, f"{room} seq {seq} is not what was told"
            rids = {rid for _, rid in logged.values()}
            assert not rids & failed, f"failed requests logged: {sorted(rids & failed)}"
            assert rids <= {rid for _, rid in told.values()} | unseen
        store.close()
