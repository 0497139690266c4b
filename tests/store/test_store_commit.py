"""Group commit, per-room sequences, preconditions, failures and durability."""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_store_support import (
    BACKENDS,
    Backend,
    Epochs,
    add_session,
    assert_gap_free,
    backend,
    ev,
    only_events,
    room_seqs,
)

from agor_actors.store import (
    SCHEMA_VERSION,
    Append,
    Compact,
    EventDraft,
    Expect,
    History,
    Mutation,
    Once,
    SqlStore,
    StoreConflict,
    StoreError,
    StoreIntegrityError,
    StoreNotFound,
    StoreQueryError,
    StoreSchemaError,
    StoreUnavailable,
    WriteRequest,
    WriteResult,
    hash_token,
    open_store,
)


@pytest.fixture(params=BACKENDS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    with backend(request.param, tmp_path) as b:
        yield b


@pytest.fixture
def store(db: Backend) -> SqlStore:
    return db.open()


def ok(result: WriteResult | StoreError) -> WriteResult:
    assert isinstance(result, WriteResult), result
    return result


def seqs(result: WriteResult | StoreError) -> list[tuple[int, int | None]]:
    return [(e.seq, e.last_seq) for e in ok(result).events]


# --------------------------------------------------------------------------- schema


def test_schema_is_created_once_and_versioned(db: Backend) -> None:
    first = db.open()
    assert first.schema_version() == SCHEMA_VERSION == 5
    first.close()
    again = db.open()  # idempotent: opening an existing database changes nothing
    assert again.schema_version() == SCHEMA_VERSION
    assert db.admin("SELECT value FROM meta WHERE key = 'schema_version'") == ["5"]
    inspector_tables = set(sa.inspect(again.engine).get_table_names())
    assert {
        "meta",
        "users",
        "boards",
        "board_members",
        "sessions",
        "tasks",
        "messages",
        "message_parts",
        "tool_calls",
        "rooms",
        "events",
        "field_history",
        "idempotency_keys",
    } <= inspector_tables


def test_a_newer_schema_is_refused(db: Backend) -> None:
    db.open().close()
    db.admin(f"UPDATE meta SET value = '{SCHEMA_VERSION + 1}' WHERE key = 'schema_version'")
    with pytest.raises(StoreSchemaError, match="newer"):
        db.open()


def test_a_version_1_database_is_migrated_and_keeps_its_members(db: Backend) -> None:
    """Version 1 refused board members with the role ``admin`` (its CHECK
    constraint predates the role): opening it migrates it to the current
    version in place, members kept, and ``admin`` is taken."""
    store = db.open()
    board = {"name": "B", "owner_id": "u1", "created_at": 1, "updated_at": 1}
    ok(
        store.commit(
            [
                WriteRequest(
                    mutations=(
                        Mutation(
                            "insert",
                            "users",
                            {"id": "u1"},
                            {"name": "a", "token_hash": "h1", "created_at": 1},
                        ),
                        Mutation(
                            "insert",
                            "users",
                            {"id": "u2"},
                            {"name": "b", "token_hash": "h2", "created_at": 1},
                        ),
                        Mutation("insert", "boards", {"id": "b1"}, board),
                    )
                )
            ]
        )[0]
    )
    store.close()
    old = "CHECK (role IN ('owner', 'editor', 'viewer'))"
    if db.kind == "postgresql":
        db.admin(
            "ALTER TABLE board_members DROP CONSTRAINT ck_board_members_role",
            f"ALTER TABLE board_members ADD CONSTRAINT ck_board_members_role {old}",
        )
    else:
        db.admin(
            "DROP TABLE board_members",
            "CREATE TABLE board_members (board_id VARCHAR NOT NULL REFERENCES boards (id)"
            " ON DELETE CASCADE, user_id VARCHAR NOT NULL REFERENCES users (id)"
            " ON DELETE CASCADE, role VARCHAR NOT NULL, PRIMARY KEY (board_id, user_id),"
            f" CONSTRAINT ck_board_members_role {old})",
            "CREATE INDEX ix_board_members_user_id ON board_members (user_id)",
        )
    db.admin(
        "INSERT INTO board_members (board_id, user_id, role) VALUES ('b1', 'u1', 'owner')",
        "UPDATE meta SET value = '1' WHERE key = 'schema_version'",
    )
    with pytest.raises(sa.exc.IntegrityError):  # what version 1 did
        db.admin("INSERT INTO board_members (board_id, user_id, role) VALUES ('b1', 'u2', 'admin')")
    migrated = db.open()
    assert migrated.schema_version() == SCHEMA_VERSION
    ok(
        migrated.commit(
            [
                WriteRequest(
                    mutations=(
                        Mutation(
                            "insert",
                            "board_members",
                            {"board_id": "b1", "user_id": "u2"},
                            {"role": "admin"},
                        ),
                    )
                )
            ]
        )[0]
    )
    assert sorted((m["user_id"], m["role"]) for m in migrated.board_members("b1")) == [
        ("u1", "owner"),
        ("u2", "admin"),
    ]
    refused = migrated.commit(
        [
            WriteRequest(
                mutations=(
                    Mutation(
                        "update",
                        "board_members",
                        {"board_id": "b1", "user_id": "u2"},
                        {"role": "king"},
                    ),
                )
            )
        ]
    )[0]
    assert isinstance(refused, StoreError)  # the new constraint holds
    migrated.close()
    assert db.open().schema_version() == SCHEMA_VERSION  # and once only


def test_a_version_4_database_gains_removed_users(db: Backend) -> None:
    """Version 4 had no ``users.removed_at``: opening it adds the column,
    the users there are not removed, and a removed user's token finds no
    one."""
    store = db.open()
    user = {"name": "a", "token_hash": "h1", "created_at": 1}
    ok(
        store.commit([WriteRequest(mutations=(Mutation("insert", "users", {"id": "u1"}, user),))])[
            0
        ]
    )
    store.close()
    db.admin(
        "ALTER TABLE users DROP COLUMN removed_at",
        "UPDATE meta SET value = '4' WHERE key = 'schema_version'",
    )
    migrated = db.open()
    assert migrated.schema_version() == SCHEMA_VERSION
    found = migrated.user_by_token_hash("h1")
    assert found is not None and found["id"] == "u1" and found["removed_at"] is None
    removed = Mutation("update", "users", {"id": "u1"}, {"removed_at": 5})
    ok(migrated.commit([WriteRequest(mutations=(removed,))])[0])
    assert migrated.user_by_token_hash("h1") is None
    got = migrated.get("users", "u1")
    assert got is not None and got["removed_at"] == 5
    migrated.close()


def test_sqlite_file_settings(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'a.db'}", new_epoch=Epochs())
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
            # the writer checkpoints in a worker thread; the commit only past 64 MiB
            assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 16384
        assert store.checkpoints
        assert store.checkpoint() is not None
    finally:
        store.close()
    memory = open_store("sqlite://", new_epoch=Epochs())
    assert not memory.checkpoints and memory.checkpoint() is None
    memory.close()


def test_unsupported_url_is_refused() -> None:
    with pytest.raises(StoreQueryError, match="unsupported"):
        open_store("mysql://localhost/agor", new_epoch=Epochs())


# --------------------------------------------------------------------------- group commit


def _good(session_id: str, room: str, n: int) -> WriteRequest:
    return WriteRequest(mutations=[add_session(session_id)], events=[ev(room, n=n)])


BAD: dict[str, tuple[Callable[[str], WriteRequest], type[StoreError]]] = {
    # "s-a" is inserted by the first request of the same group
    "duplicate key": (lambda room: _good("s-a", room, 9), StoreIntegrityError),
    "check constraint": (
        lambda room: WriteRequest(
            mutations=[add_session("s-x", status="exploded")], events=[ev(room, n=9)]
        ),
        StoreIntegrityError,
    ),
    "foreign key": (
        lambda room: WriteRequest(
            mutations=[
                Mutation(
                    "insert",
                    "tasks",
                    {"id": "t-x"},
                    {"session_id": "ghost", "created_at": 1, "updated_at": 1},
                )
            ],
            events=[ev(room, n=9)],
        ),
        StoreIntegrityError,
    ),
    "missing row update": (
        lambda room: WriteRequest(
            mutations=[Mutation("update", "sessions", {"id": "ghost"}, {"title": "x"})],
            events=[ev(room, n=9)],
        ),
        StoreNotFound,
    ),
    "missing row delete": (
        lambda room: WriteRequest(
            mutations=[Mutation("delete", "sessions", {"id": "ghost"})], events=[ev(room, n=9)]
        ),
        StoreNotFound,
    ),
    "second mutation fails": (
        lambda room: WriteRequest(
            mutations=[
                add_session("s-x"),
                Mutation("update", "sessions", {"id": "ghost"}, {"title": "x"}),
            ],
            events=[ev(room, n=9)],
        ),
        StoreNotFound,
    ),
    "failed precondition": (
        lambda room: WriteRequest(
            expect=[Expect("sessions", {"id": "s-a"}, "title", "another title")],
            mutations=[add_session("s-x")],
            events=[ev(room, n=9)],
        ),
        StoreConflict,
    ),
    "unknown column": (
        lambda room: WriteRequest(
            mutations=[add_session("s-x", colour="red")], events=[ev(room, n=9)]
        ),
        StoreQueryError,
    ),
    "wrong value type": (
        lambda room: WriteRequest(mutations=[add_session("s-x", title=5)], events=[ev(room, n=9)]),
        StoreQueryError,
    ),
    "value not JSON": (
        lambda room: WriteRequest(
            mutations=[add_session("s-x", git_state={"branch": {1, 2}})], events=[ev(room, n=9)]
        ),
        StoreIntegrityError,
    ),
    "event payload not JSON": (
        lambda room: WriteRequest(
            mutations=[add_session("s-x")],
            events=[EventDraft(room, "sessions:created", {"set": {1, 2}}, ts=1)],
        ),
        StoreIntegrityError,
    ),
    "event only, payload not JSON": (
        lambda room: only_events(EventDraft(room, "x", {"set": {1, 2}}, ts=1)),
        StoreIntegrityError,
    ),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_one_bad_request_of_three_fails_alone(db: Backend, kind: str) -> None:
    store = db.open()
    make_bad, error = BAD[kind]
    room = "session:s"
    bad = make_bad(room)
    # the bad request also writes to a room nobody else writes to
    bad = WriteRequest(
        mutations=bad.mutations,
        events=(*bad.events, ev("board:only-bad")),
        expect=bad.expect,
    )
    results = store.commit([_good("s-a", room, 1), bad, _good("s-c", room, 2)])

    assert seqs(results[0]) == [(1, None)]
    assert isinstance(results[1], error), results[1]
    assert seqs(results[2]) == [(2, None)]
    assert store.get("sessions", "s-a") is not None
    assert store.get("sessions", "s-c") is not None
    assert store.get("sessions", "s-x") is None
    assert store.get("tasks", "t-x") is None
    assert [e.data for e in store.events_since(room, 0)] == [{"n": 1}, {"n": 2}]
    assert_gap_free(store, room, 2)
    assert store.room_head("board:only-bad") is None

    # the in-memory heads were not advanced by the failure ...
    assert seqs(store.commit([only_events(ev(room, n=3))])[0]) == [(3, None)]
    assert seqs(store.commit([only_events(ev("board:only-bad"))])[0]) == [(1, None)]
    # ... and agree with the database, as a fresh store reads it
    store.close()
    fresh = db.open()
    assert seqs(fresh.commit([only_events(ev(room, n=4))])[0]) == [(4, None)]
    assert_gap_free(fresh, room, 4)
    assert_gap_free(fresh, "board:only-bad", 1)


def test_requests_of_a_group_see_each_other(store: SqlStore) -> None:
    results = store.commit(
        [
            WriteRequest(mutations=[add_session("s1", title="one")]),
            WriteRequest(
                expect=[Expect("sessions", {"id": "s1"}, "title", "one")],
                mutations=[Mutation("update", "sessions", {"id": "s1"}, {"title": "two"})],
            ),
            WriteRequest(expect=[Expect("sessions", {"id": "s1"}, "title", "one")]),
        ]
    )
    ok(results[0])
    ok(results[1])
    assert isinstance(results[2], StoreConflict)
    assert results[2].current == "two"


def test_seqs_are_per_room_and_in_request_order(store: SqlStore) -> None:
    results = store.commit(
        [
            only_events(ev("a"), ev("b"), ev("a")),
            only_events(ev("b")),
            WriteRequest(),
            only_events(ev("a", merge_count=3), ev("c")),
        ]
    )
    assert [(e.room, e.seq) for e in ok(results[0]).events] == [("a", 1), ("b", 1), ("a", 2)]
    assert seqs(results[1]) == [(2, None)]
    assert ok(results[2]).events == ()
    assert [(e.room, e.seq, e.last_seq) for e in ok(results[3]).events] == [
        ("a", 3, 5),
        ("c", 1, None),
    ]
    epochs = {room: store.room_head(room) for room in "abc"}
    assert epochs == {"a": ("epoch-1", 5), "b": ("epoch-2", 2), "c": ("epoch-3", 1)}
    assert store.commit([]) == []


def test_stored_events_carry_everything(store: SqlStore) -> None:
    draft = EventDraft(
        room="session:s1",
        event="messages:created",
        data={"id": "m1", "content": "héllo", "nested": [1, 2.5, None, True]},
        ts=1_767_225_600_123,
        user_id="u1",
        origin="conn-7",
        temp_id="tmp-3",
    )
    (written,) = ok(store.commit([only_events(draft)])[0]).events
    (read,) = store.events_since("session:s1", 0)
    assert read == written
    assert read.room == "session:s1" and read.epoch == "epoch-1" and read.seq == 1
    assert read.data == draft.data and read.ts == draft.ts
    assert (read.user_id, read.origin, read.temp_id) == ("u1", "conn-7", "tmp-3")


def test_merged_events_take_their_range_of_seqs(store: SqlStore) -> None:
    room = "session:s1"
    results = store.commit(
        [
            only_events(ev(room, "messages:stream", 1)),
            only_events(ev(room, "messages:stream", 2, merge_count=4)),
            only_events(ev(room, "messages:stream", 3, merge_count=1)),
        ]
    )
    assert [seqs(r) for r in results] == [[(1, None)], [(2, 5)], [(6, None)]]
    assert store.room_head(room) == ("epoch-1", 6)
    assert room_seqs(store, room) == [(1, 1), (2, 5), (6, 6)]
    # a reader somewhere inside the merged range gets the whole merged event
    assert [e.seq for e in store.events_since(room, 3)] == [2, 6]
    assert [e.seq for e in store.events_since(room, 5)] == [6]
    assert [e.seq for e in store.events_since(room, 1)] == [2, 6]
    assert store.events_since(room, 6) == []
    with pytest.raises(ValueError, match="merge_count"):
        EventDraft(room, "x", None, ts=1, merge_count=0)


def test_events_since_pages_in_seq_order(store: SqlStore) -> None:
    room = "board:b1"
    for batch in range(5):
        store.commit([only_events(ev(room, n=batch * 5 + i)) for i in range(5)])
    store.commit([only_events(ev("board:other"))])
    seen: list[int] = []
    after = 0
    while page := store.events_since(room, after, limit=7):
        assert len(page) <= 7
        seen += [e.seq for e in page]
        after = page[-1].end_seq
    assert seen == list(range(1, 26))
    assert [e.data["n"] for e in store.events_since(room, 20)] == [20, 21, 22, 23, 24]
    assert store.events_since(room, 0, limit=0) == []
    assert store.events_since("room:never", 0) == []


def test_seqs_continue_after_reopen(db: Backend) -> None:
    store = db.open()
    store.commit([only_events(ev("r1"), ev("r2")), only_events(ev("r1", merge_count=2))])
    assert store.room_head("r1") == ("epoch-1", 3)
    store.close()

    again = db.open()
    assert again.room_head("r1") == ("epoch-1", 3)
    assert again.room_head("r2") == ("epoch-2", 1)
    assert again.room_head("r3") is None
    results = again.commit([only_events(ev("r1"), ev("r2"), ev("r3"))])
    assert [(e.room, e.epoch, e.seq) for e in ok(results[0]).events] == [
        ("r1", "epoch-1", 4),
        ("r2", "epoch-2", 2),
        ("r3", "epoch-3", 1),
    ]
    assert_gap_free(again, "r1", 4)


def test_a_second_store_reads_what_the_first_committed(db: Backend) -> None:
    writer = db.open()
    results = writer.commit(
        [
            WriteRequest(
                mutations=[add_session("s1", title="durable", git_state={"branch": "main"})],
                events=[ev("session:s1", "sessions:created")],
            )
        ]
    )
    ok(results[0])
    # a second store on the same database (another process would see the same)
    reader = db.open()
    row = reader.get("sessions", "s1")
    assert row is not None
    assert row["title"] == "durable" and row["git_state"] == {"branch": "main"}
    assert reader.room_head("session:s1") == ("epoch-1", 1)
    assert [e.event for e in reader.events_since("session:s1", 0)] == ["sessions:created"]


def test_a_second_writer_is_detected_and_the_store_recovers(db: Backend) -> None:
    first = db.open()
    second = db.open()  # breaks the single-writer rule on purpose
    first.commit([only_events(ev("r"))])
    # seq 2 is taken behind the first store's back: its write collides ...
    assert seqs(second.commit([only_events(ev("r"))])[0]) == [(2, None)]
    collided = first.commit([only_events(ev("r")), only_events(ev("other"))])
    assert isinstance(collided[0], StoreIntegrityError)
    assert seqs(collided[1]) == [(1, None)]
    # ... and the next write continues after what the database holds
    assert seqs(first.commit([only_events(ev("r"))])[0]) == [(3, None)]

    # a reset behind its back: no seq collides, the head check refuses the group
    second.reset_room("r", "epoch-other")
    refused = first.commit([only_events(ev("r")), only_events(ev("other"))])
    assert all(isinstance(r, StoreUnavailable) for r in refused)
    assert "another writer" in str(refused[0])
    (event,) = ok(first.commit([only_events(ev("r"))])[0]).events
    assert (event.epoch, event.seq) == ("epoch-other", 1)
    assert_gap_free(first, "r", 1)
    assert_gap_free(first, "other", 1)


def test_reset_room_starts_a_new_epoch(store: SqlStore) -> None:
    store.commit([only_events(ev("r"), ev("r"), ev("keep"))])
    store.reset_room("r", "epoch-new")
    assert store.room_head("r") == ("epoch-new", 0)
    assert store.events_since("r", 0) == []
    assert room_seqs(store, "keep") == [(1, 1)]
    (event,) = ok(store.commit([only_events(ev("r"))])[0]).events
    assert (event.epoch, event.seq) == ("epoch-new", 1)
    store.reset_room("fresh", "epoch-fresh")  # a room never written
    assert store.room_head("fresh") == ("epoch-fresh", 0)


# --------------------------------------------------------------------------- whole failure


def _install_failing_trigger(db: Backend) -> None:
    if db.kind == "sqlite":
        db.admin(
            "CREATE TRIGGER fail_rooms_insert BEFORE INSERT ON rooms "
            "BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
            "CREATE TRIGGER fail_rooms_update BEFORE UPDATE ON rooms "
            "BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
        )
    else:
        db.admin(
            "CREATE FUNCTION fail_rooms() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'injected failure'; END $$",
            "CREATE TRIGGER fail_rooms BEFORE INSERT OR UPDATE ON rooms "
            "FOR EACH ROW EXECUTE FUNCTION fail_rooms()",
        )


def _remove_failing_trigger(db: Backend) -> None:
    if db.kind == "sqlite":
        db.admin("DROP TRIGGER fail_rooms_insert", "DROP TRIGGER fail_rooms_update")
    else:
        db.admin("DROP TRIGGER fail_rooms ON rooms", "DROP FUNCTION fail_rooms()")


def _install_poison_trigger(db: Backend) -> None:
    """Make the database itself refuse events named 'poison' (so the refusal
    comes at the group's one multi-row event insert, not before)."""
    if db.kind == "sqlite":
        db.admin(
            "CREATE TRIGGER IF NOT EXISTS poison_events BEFORE INSERT ON events "
            "WHEN NEW.event = 'poison' BEGIN SELECT RAISE(ABORT, 'poisoned event'); END"
        )
    else:
        db.admin(
            "CREATE OR REPLACE FUNCTION poison_events() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN IF NEW.event = 'poison' THEN "
            "RAISE EXCEPTION 'poisoned event' USING ERRCODE = 'check_violation'; "
            "END IF; RETURN NEW; END $$",
            "CREATE OR REPLACE TRIGGER poison_events BEFORE INSERT ON events "
            "FOR EACH ROW EXECUTE FUNCTION poison_events()",
        )


def test_an_event_the_database_refuses_fails_only_its_request(db: Backend) -> None:
    store = db.open()
    _install_poison_trigger(db)
    results = store.commit(
        [
            _good("s1", "r", 1),
            WriteRequest(mutations=[add_session("s2")], events=[ev("r", "poison"), ev("new")]),
            only_events(ev("r", n=3)),
        ]
    )
    assert seqs(results[0]) == [(1, None)]
    assert isinstance(results[1], StoreIntegrityError) and "poisoned" in str(results[1])
    assert seqs(results[2]) == [(2, None)]
    assert store.get("sessions", "s1") is not None and store.get("sessions", "s2") is None
    assert_gap_free(store, "r", 2)
    assert store.room_head("new") is None


def test_a_failed_transaction_fails_every_request_and_writes_nothing(db: Backend) -> None:
    store = db.open()
    store.commit([only_events(ev("r", n=1), ev("r", n=2))])
    _install_failing_trigger(db)

    group = [_good("s1", "r", 3), only_events(ev("r", n=4), ev("new")), _good("s2", "new", 5)]
    results = store.commit(group)
    assert len(results) == 3
    assert all(isinstance(r, StoreError) for r in results)
    assert results[0] is results[1] is results[2]
    assert "injected failure" in str(results[0])
    assert store.get("sessions", "s1") is None and store.get("sessions", "s2") is None
    assert_gap_free(store, "r", 2)
    assert store.room_head("new") is None

    _remove_failing_trigger(db)
    results = store.commit(group)
    assert [[(e.room, e.seq) for e in ok(r).events] for r in results] == [
        [("r", 3)],
        [("r", 4), ("new", 1)],
        [("new", 2)],
    ]
    assert_gap_free(store, "r", 4)
    assert_gap_free(store, "new", 2)


def test_a_full_disk_fails_the_group_and_loses_nothing(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'full.db'}", new_epoch=Epochs())
    limit: dict[str, int | None] = {"pages": None}

    @sa.event.listens_for(store.engine, "begin")
    def _limit_pages(conn: sa.Connection) -> None:
        # at each transaction (the writer keeps its connection between commits)
        pages = limit["pages"]
        driver = conn.connection.driver_connection
        assert driver is not None
        driver.execute(f"PRAGMA max_page_count = {pages or 1073741823}")

    try:
        store.commit([_good("s0", "r", 0)])
        with store.engine.connect() as conn:
            limit["pages"] = conn.exec_driver_sql("PRAGMA page_count").scalar()
        big = "x" * 2_000_000
        results = store.commit(
            [
                _good("s1", "r", 1),
                WriteRequest(mutations=[add_session("s2", title=big)], events=[ev("r", n=2)]),
                only_events(ev("r", n=3), ev("new")),
            ]
        )
        assert all(isinstance(r, StoreUnavailable) for r in results), results
        assert "full" in str(results[0])
        limit["pages"] = None
        assert store.get("sessions", "s1") is None
        assert_gap_free(store, "r", 1)
        assert store.room_head("new") is None
        assert seqs(store.commit([_good("s1", "r", 1)])[0]) == [(2, None)]
    finally:
        store.close()


def test_a_local_writer_keeps_its_connection_and_takes_a_new_one_after_a_failure(
    tmp_path: Path,
) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'kept.db'}", new_epoch=Epochs())
    checkouts: list[int] = []
    refuse = {"next": False}

    def _on_commit(conn: sa.Connection) -> None:
        if refuse["next"]:
            refuse["next"] = False
            raise sa.exc.OperationalError("COMMIT", {}, Exception("disk I/O error (injected)"))

    sa.event.listen(store.engine, "checkout", lambda dbapi, *_: checkouts.append(id(dbapi)))
    sa.event.listen(store.engine, "commit", _on_commit)
    try:
        for n in range(3):
            assert seqs(store.commit([_good(f"s{n}", "r", n)])[0]) == [(n + 1, None)]
        assert checkouts == []  # the connection that made the schema, kept
        # a COMMIT that fails leaves the transaction open on the driver's
        # connection: it goes back to the pool (which rolls it back) and
        # the next commit takes a fresh one
        refuse["next"] = True
        failed = store.commit([_good("s9", "r", 9)])
        assert all(isinstance(r, StoreUnavailable) for r in failed), failed
        assert seqs(store.commit([_good("s3", "r", 3)])[0]) == [(4, None)]
        assert len(checkouts) == 1
        assert store.get("sessions", "s9") is None
        assert_gap_free(store, "r", 4)
    finally:
        store.close()


# --------------------------------------------------------------------------- mutations


def test_update_upsert_append_and_delete(store: SqlStore) -> None:
    store.commit(
        [
            WriteRequest(
                mutations=[
                    add_session("s1"),
                    Mutation(
                        "insert",
                        "messages",
                        {"id": "m1"},
                        {
                            "session_id": "s1",
                            "role": "assistant",
                            "content": Append("Hel"),
                            "streaming": True,
                            "created_at": 1,
                            "updated_at": 1,
                        },
                    ),
                ]
            )
        ]
    )
    for chunk in ("lo", ", ", "world"):
        result = store.commit(
            [
                WriteRequest(
                    mutations=[
                        Mutation("update", "messages", {"id": "m1"}, {"content": Append(chunk)})
                    ]
                )
            ]
        )
        ok(result[0])
    message = store.get("messages", "m1")
    assert message is not None
    assert message["content"] == "Hello, world" and message["streaming"] is True

    def log_line(text: str) -> Mutation:
        values = {"session_id": "s1", "role": "tool", "created_at": 2, "updated_at": 2}
        return Mutation("upsert", "messages", {"id": "m2"}, {**values, "content": Append(text)})

    ok(
        store.commit(
            [WriteRequest(mutations=[log_line("a")]), WriteRequest(mutations=[log_line("b")])]
        )[1]
    )
    message = store.get("messages", "m2")
    assert message is not None and message["content"] == "ab"

    upsert = Mutation(
        "upsert", "boards", {"id": "b1"}, {"name": "first", "created_at": 1, "updated_at": 1}
    )
    ok(store.commit([WriteRequest(mutations=[upsert])])[0])
    renamed = Mutation(
        "upsert", "boards", {"id": "b1"}, {"name": "second", "created_at": 1, "updated_at": 2}
    )
    ok(store.commit([WriteRequest(mutations=[renamed])])[0])
    board = store.get("boards", "b1")
    assert board is not None and board["name"] == "second" and board["updated_at"] == 2
    assert board["clocks"] == {} and board["rev"] == 0

    bad_append = Mutation("update", "sessions", {"id": "s1"}, {"rev": Append("1")})
    assert isinstance(store.commit([WriteRequest(mutations=[bad_append])])[0], StoreQueryError)
    bad_key = Mutation("update", "sessions", {"id": "s1", "x": 1}, {"title": "t"})
    assert isinstance(store.commit([WriteRequest(mutations=[bad_key])])[0], StoreQueryError)
    key_change = Mutation("update", "sessions", {"id": "s1"}, {"id": "s2"})
    assert isinstance(store.commit([WriteRequest(mutations=[key_change])])[0], StoreQueryError)
    not_writable = Mutation("insert", "events", {"room": "r", "seq": 1}, {})
    assert isinstance(store.commit([WriteRequest(mutations=[not_writable])])[0], StoreQueryError)

    # deleting a session takes its messages with it (foreign keys are on)
    ok(store.commit([WriteRequest(mutations=[Mutation("delete", "sessions", {"id": "s1"})])])[0])
    assert store.get("sessions", "s1") is None
    assert store.get("messages", "m1") is None
    gone = store.commit([WriteRequest(mutations=[Mutation("delete", "sessions", {"id": "s1"})])])
    assert isinstance(gone[0], StoreNotFound)


def test_a_streamed_text_is_kept_in_parts_and_read_back_whole(db: Backend) -> None:
    """Appends to a message's ``content`` go in as parts (the row is not
    rewritten per chunk); every read, the precondition included, sees the
    column followed by its parts; setting the text outright drops them."""
    store = db.open()
    ok(
        store.commit([WriteRequest(mutations=[add_session("s1"), _message("m1"), _message("m2")])])[
            0
        ]
    )
    ok(
        store.commit(
            [
                WriteRequest(
                    mutations=[Mutation("update", "messages", {"id": "m1"}, {"content": "He"})]
                )
            ]
        )[0]
    )
    # plain runs (two messages interleaved), a request with a precondition
    # (its own savepoint) and an upsert all append
    results = store.commit(
        [
            _chunk("m1", "l", "session:s1", 1),
            _chunk("m2", "ab", "session:s1", 2),
            _chunk("m1", "lo", "session:s1", 3),
            WriteRequest(
                expect=[Expect("messages", {"id": "m1"}, "content", "Hello")],
                mutations=[Mutation("update", "messages", {"id": "m1"}, {"content": Append(",")})],
            ),
            WriteRequest(
                mutations=[Mutation("upsert", "messages", {"id": "m1"}, {"content": Append(" w")})]
            ),
            _chunk("m2", "c", "session:s1", 4),
        ]
    )
    assert all(isinstance(r, WriteResult) for r in results), results
    assert db.admin("SELECT content FROM messages WHERE id = 'm1'") == ["He"]
    assert db.admin("SELECT count(*) FROM message_parts WHERE message_id = 'm1'") == [4]
    m1, m2 = store.get("messages", "m1"), store.get("messages", "m2")
    assert m1 is not None and m1["content"] == "Hello, w" and m1["updated_at"] == 13
    assert m2 is not None and m2["content"] == "abc"
    page = store.find("messages", {"session_id": "s1", "$sort": {"id": 1}})
    assert [(m["id"], m["content"]) for m in page.items] == [("m1", "Hello, w"), ("m2", "abc")]
    chosen = store.find("messages", {"$select": ["content"], "$sort": {"id": -1}, "$limit": 1})
    assert chosen.items == [{"id": "m2", "content": "abc"}]
    # a precondition on the text compares the whole of it
    stale = store.commit(
        [
            WriteRequest(
                expect=[Expect("messages", {"id": "m1"}, "content", "He")],
                mutations=[Mutation("update", "messages", {"id": "m1"}, {"streaming": False})],
            )
        ]
    )[0]
    assert isinstance(stale, StoreConflict) and stale.current == "Hello, w"
    # a text of several parts is not one SQL value: no filter or sort on it
    for query in ({"content": "abc"}, {"$sort": {"content": 1}}):
        with pytest.raises(StoreQueryError, match="stored in parts"):
            store.find("messages", query)
    # set outright (a plain update, and an upsert), the text starts over
    ok(
        store.commit(
            [
                WriteRequest(
                    mutations=[Mutation("update", "messages", {"id": "m1"}, {"content": "new"})]
                ),
                _chunk("m1", "!", "session:s1", 5),
                WriteRequest(
                    mutations=[Mutation("upsert", "messages", {"id": "m2"}, {"content": "x"})]
                ),
            ]
        )[0]
    )
    m1, m2 = store.get("messages", "m1"), store.get("messages", "m2")
    assert m1 is not None and m1["content"] == "new!"
    assert m2 is not None and m2["content"] == "x"
    assert db.admin("SELECT count(*) FROM message_parts") == [1]
    # a message's parts go with it
    ok(store.commit([WriteRequest(mutations=[Mutation("delete", "messages", {"id": "m1"})])])[0])
    assert db.admin("SELECT count(*) FROM message_parts") == [0]
    store.close()


def test_compact_folds_a_streamed_text_into_its_row(db: Backend) -> None:
    store = db.open()
    ok(
        store.commit([WriteRequest(mutations=[add_session("s1"), _message("m1"), _message("m2")])])[
            0
        ]
    )
    ok(store.commit([_chunk("m1", text, "session:s1", n) for n, text in enumerate("abc")])[0])
    finish = {"streaming": False, "content": Compact()}
    results = store.commit(
        [
            WriteRequest(
                expect=[Expect("messages", {"id": "m1"}, "content", "abc")],
                mutations=[Mutation("update", "messages", {"id": "m1"}, finish)],
            ),
            # nothing to fold: the row as it was
            WriteRequest(mutations=[Mutation("update", "messages", {"id": "m2"}, finish)]),
            _chunk("m1", "d", "session:s1", 9, streaming=False),  # after it: a part again
        ]
    )
    assert all(isinstance(r, WriteResult) for r in results), results
    assert db.admin("SELECT content FROM messages ORDER BY id") == ["abc", ""]
    assert db.admin("SELECT text FROM message_parts") == ["d"]
    m1, m2 = store.get("messages", "m1"), store.get("messages", "m2")
    assert m1 is not None and m1["content"] == "abcd" and m1["streaming"] is False
    assert m2 is not None and m2["content"] == "" and m2["streaming"] is False
    for bad in (
        Mutation("update", "messages", {"id": "m1"}, {"role": Compact()}),
        Mutation("update", "sessions", {"id": "s1"}, {"title": Compact()}),
        Mutation("upsert", "messages", {"id": "m1"}, {"content": Compact()}),
        Mutation("insert", "messages", {"id": "m3"}, {"session_id": "s1", "content": Compact()}),
    ):
        refused = store.commit([WriteRequest(mutations=[bad])])[0]
        assert isinstance(refused, StoreQueryError), (bad, refused)
    assert store.get("messages", "m3") is None
    store.close()


def test_a_version_2_database_keeps_its_messages_whole(db: Backend) -> None:
    """Opened by this version, a database of schema 2 gains the parts table;
    its messages read as they were and stream on."""
    store = db.open()
    ok(store.commit([WriteRequest(mutations=[add_session("s1"), _message("m1")])])[0])
    store.close()
    db.admin(
        "UPDATE messages SET content = 'before' WHERE id = 'm1'",
        "DROP TABLE message_parts",
        "DROP INDEX ix_events_board_user_seq",
        "CREATE INDEX ix_events_room_user_seq ON events (room, user_id, seq)",
        "UPDATE meta SET value = '2' WHERE key = 'schema_version'",
    )
    migrated = db.open()
    assert migrated.schema_version() == SCHEMA_VERSION
    indexes = {i["name"] for i in sa.inspect(migrated.engine).get_indexes("events")}
    assert "ix_events_board_user_seq" in indexes
    assert "ix_events_room_user_seq" not in indexes
    ok(migrated.commit([_chunk("m1", " and after", "session:s1", 1)])[0])
    message = migrated.get("messages", "m1")
    assert message is not None and message["content"] == "before and after"
    migrated.close()


def test_a_version_3_database_gains_the_idempotency_keys(db: Backend) -> None:
    store = db.open()
    ok(store.commit([WriteRequest(mutations=[add_session("s1")])])[0])
    store.close()
    db.admin(
        "DROP TABLE idempotency_keys",
        "UPDATE meta SET value = '3' WHERE key = 'schema_version'",
    )
    migrated = db.open()
    assert migrated.schema_version() == SCHEMA_VERSION
    once = Once("u-1", "k-1", "sessions.create", "d", {"id": "s2"}, 1)
    ok(migrated.commit([WriteRequest(mutations=[add_session("s2")], once=once)])[0])
    assert migrated.check_key("u-1", "k-1") == ("sessions.create", "d", {"id": "s2"})
    assert migrated.get("sessions", "s1") is not None
    migrated.close()


def _message(mid: str, session: str = "s1") -> Mutation:
    return Mutation(
        "insert",
        "messages",
        {"id": mid},
        {
            "session_id": session,
            "role": "assistant",
            "streaming": True,
            "created_at": 1,
            "updated_at": 1,
        },
    )


def _chunk(mid: str, text: str, room: str, n: int, *, streaming: bool = True) -> WriteRequest:
    change: dict[str, Any] = {"content": Append(text), "updated_at": 10 + n}
    if streaming:
        change["streaming"] = True
    return WriteRequest(
        mutations=[Mutation("update", "messages", {"id": mid}, change)],
        events=[ev(room, "task:message", n=n)],
    )


def test_plain_updates_in_one_group_keep_request_order(store: SqlStore) -> None:
    """Plain updates go to the database in runs; a run must not reorder
    them against the other requests of the group, and a run that misses a
    row or fails must give that request, and only it, its error."""
    ok(
        store.commit([WriteRequest(mutations=[add_session("s1"), _message("m1"), _message("m2")])])[
            0
        ]
    )
    # a precondition makes this one a request of its own (a savepoint)
    finish = WriteRequest(
        expect=[Expect("messages", {"id": "m1"}, "streaming", True)],
        mutations=[Mutation("update", "messages", {"id": "m1"}, {"streaming": False})],
        events=[ev("session:s1", "task:message", n=90)],
    )
    results = store.commit(
        [
            _chunk("m1", "a", "session:s1", 1),
            _chunk("m2", "x", "session:s2", 2),
            _chunk("m1", "b", "session:s1", 3),
            finish,  # the run before it must reach the database first
            _chunk("m1", "c", "session:s1", 4, streaming=False),  # another shape
            _chunk("m2", "y", "session:s2", 5),  # and back
        ]
    )
    assert all(isinstance(r, WriteResult) for r in results)
    m1, m2 = store.get("messages", "m1"), store.get("messages", "m2")
    assert m1 is not None and m1["content"] == "abc" and m1["streaming"] is False
    assert m1["updated_at"] == 14
    assert m2 is not None and m2["content"] == "xy" and m2["streaming"] is True
    assert [seqs(r) for r in results] == [
        [(1, None)],
        [(1, None)],
        [(2, None)],
        [(3, None)],
        [(4, None)],
        [(2, None)],
    ]

    # a run that misses a row: that request fails, the others commit
    results = store.commit(
        [
            _chunk("m2", "1", "session:s2", 6),
            WriteRequest(mutations=[Mutation("delete", "messages", {"id": "m2"})]),
            _chunk("m2", "2", "session:s2", 7),  # gone
            _chunk("m1", "d", "session:s1", 8, streaming=False),
        ]
    )
    assert [type(r).__name__ for r in results] == [
        "WriteResult",
        "WriteResult",
        "StoreNotFound",
        "WriteResult",
    ]
    assert store.get("messages", "m2") is None
    assert_gap_free(store, "session:s2", 3)  # the failed chunk took no seq

    # a database error inside a run (a foreign key) fails that request only
    bad = WriteRequest(
        mutations=[Mutation("update", "messages", {"id": "m1"}, {"task_id": "ghost"})],
        events=[ev("session:s1", n=7)],
    )
    more = store.commit(
        [_chunk("m1", "e", "session:s1", 8), bad, _chunk("m1", "f", "session:s1", 9)]
    )
    assert isinstance(more[1], StoreIntegrityError)
    assert seqs(more[0]) == [(6, None)] and seqs(more[2]) == [(7, None)]
    m1 = store.get("messages", "m1")
    assert m1 is not None and m1["content"] == "abcdef" and m1["task_id"] is None
    assert_gap_free(store, "session:s1", 7)


def test_preconditions_carry_the_current_value(store: SqlStore) -> None:
    ok(
        store.commit(
            [
                WriteRequest(
                    mutations=[
                        Mutation(
                            "insert",
                            "users",
                            {"id": "u1"},
                            {"name": "Ada", "token_hash": hash_token("t1"), "created_at": 1},
                        ),
                        add_session("s1", permissions={"u2": "edit"}, locked_by="u1"),
                    ]
                )
            ]
        )[0]
    )

    def attempt(*expect: Expect) -> WriteResult | StoreError:
        change = Mutation("update", "sessions", {"id": "s1"}, {"locked_by": None})
        return store.commit([WriteRequest(expect=expect, mutations=[change])])[0]

    stale = attempt(Expect("sessions", {"id": "s1"}, "locked_by", "u2"))
    assert isinstance(stale, StoreConflict)
    assert (stale.table, stale.key, stale.column) == ("sessions", {"id": "s1"}, "locked_by")
    assert (stale.expected, stale.current) == ("u2", "u1")

    json_stale = attempt(Expect("sessions", {"id": "s1"}, "permissions", {"u2": "view"}))
    assert isinstance(json_stale, StoreConflict) and json_stale.current == {"u2": "edit"}
    missing = attempt(Expect("sessions", {"id": "nope"}, "locked_by", None))
    assert isinstance(missing, StoreNotFound)
    bad_column = attempt(Expect("sessions", {"id": "s1"}, "colour", None))
    assert isinstance(bad_column, StoreQueryError)
    row = store.get("sessions", "s1")
    assert row is not None and row["locked_by"] == "u1"  # none of those wrote

    ok(
        attempt(
            Expect("sessions", {"id": "s1"}, "locked_by", "u1"),
            Expect("sessions", {"id": "s1"}, "permissions", {"u2": "edit"}),
            Expect("sessions", {"id": "s1"}, "rev", 0),
        )
    )
    row = store.get("sessions", "s1")
    assert row is not None and row["locked_by"] is None
    # after the write the old expectation is stale, and NULL is a value too
    stale_again = attempt(Expect("sessions", {"id": "s1"}, "locked_by", "u1"))
    assert isinstance(stale_again, StoreConflict) and stale_again.current is None
    ok(attempt(Expect("sessions", {"id": "s1"}, "locked_by", None)))
    rev_as_bool = attempt(Expect("sessions", {"id": "s1"}, "rev", False))
    assert isinstance(rev_as_bool, StoreConflict)


def test_history_rows_are_kept(store: SqlStore) -> None:
    lost = History(
        entity="sessions",
        entity_id="s1",
        field="title",
        value={"text": "mine"},
        hlc="0001767225600000-0001",
        writer="u2",
        ts=5,
        overwritten_by_hlc="0001767225600000-0002",
        overwritten_by_writer="u1",
    )
    ok(store.commit([WriteRequest(mutations=[add_session("s1")], history=[lost])])[0])
    failed = store.commit(
        [WriteRequest(mutations=[add_session("s1")], history=[attrs.evolve(lost, writer="u3")])]
    )[0]
    assert isinstance(failed, StoreIntegrityError)
    page = store.find("field_history", {"entity_id": "s1"})
    assert [(h["writer"], h["value"], h["overwritten_by_writer"]) for h in page.items] == [
        ("u2", {"text": "mine"}, "u1")
    ]


def test_expired_refresh_tokens_are_dropped(db: Backend) -> None:
    store = db.open()
    user = Mutation(
        "insert", "users", {"id": "u1"}, {"name": "a", "token_hash": "h", "created_at": 1}
    )
    tokens = [
        Mutation(
            "insert",
            "refresh_tokens",
            {"id": f"r{n}"},
            {
                "token_hash": f"t{n}",
                "family_id": "f",
                "user_id": "u1",
                "created_at": 1,
                "expires_at": n * 10,
                "rotated_at": 2 if n % 2 else None,
            },
        )
        for n in range(1, 6)
    ]
    ok(store.commit([WriteRequest(mutations=(user, *tokens))])[0])
    assert store.forget_refresh_tokens(before_ms=31) == 3  # expired at 10, 20 and 30
    assert [store.refresh_token(f"t{n}") is None for n in range(1, 6)] == [
        True,
        True,
        True,
        False,
        False,
    ]
    assert store.forget_refresh_tokens(before_ms=100, limit=1) >= 1  # bounded passes
    assert store.forget_refresh_tokens(before_ms=100) <= 1
    assert store.live_refresh_tokens(user_id="u1") == []
    assert store.get("users", "u1") is not None


def test_sign_in_codes_are_taken_once(db: Backend) -> None:
    store = db.open()
    user = Mutation(
        "insert", "users", {"id": "u1"}, {"name": "a", "token_hash": "h", "created_at": 1}
    )
    ok(store.commit([WriteRequest(mutations=(user,))])[0])

    other = Mutation(
        "insert", "users", {"id": "u2"}, {"name": "b", "token_hash": "i", "created_at": 1}
    )
    ok(store.commit([WriteRequest(mutations=(other,))])[0])

    def put(digest: str, now_ms: int, user: str = "u1") -> str | None:
        return store.put_sign_in_code(
            digest,
            user,
            "/?b",
            now_ms=now_ms,
            expires_ms=now_ms + 60,
            pending_max=3,
            user_pending_max=2,
        )

    assert put("d1", 0) is None and put("d2", 0) is None
    assert put("d3", 10) == " for this user"  # two of u1's pending
    assert put("e1", 10, "u2") is None
    assert put("e2", 10, "u2") == ""  # three pending in all
    assert store.take_sign_in_code("d1", now_ms=10) == ("u1", "/?b")
    assert store.take_sign_in_code("d1", now_ms=10) is None  # once
    assert store.take_sign_in_code("nope", now_ms=10) is None
    assert put("d3", 10) is None
    assert store.take_sign_in_code("d2", now_ms=60) is None  # expired (and dropped)
    assert put("d4", 80) is None and put("d5", 80) is None  # d3 expired at 70: dropped
    assert store.take_sign_in_code("d3", now_ms=80) is None


def test_web_sessions_open_close_and_expire(db: Backend) -> None:
    store = db.open()
    users = [
        Mutation("insert", "users", {"id": u}, {"name": u, "token_hash": u, "created_at": 1})
        for u in ("u1", "u2")
    ]
    ok(store.commit([WriteRequest(mutations=tuple(users))])[0])
    for digest, user, expires in (("a", "u1", 100), ("b", "u1", 200), ("c", "u2", 300)):
        store.open_web_session(digest, user, now_ms=0, expires_ms=expires)
    assert store.web_session_user("a", now_ms=50) == "u1"
    assert store.web_session_user("a", now_ms=100) is None  # expired
    assert store.web_session_user("nope", now_ms=0) is None
    assert store.open_web_sessions(["a", "b", "c", "nope"], now_ms=100) == {"b", "c"}
    many = [f"x{n}" for n in range(1_200)]  # asked in parts
    for digest in many[::100]:
        store.open_web_session(digest, "u2", now_ms=0, expires_ms=500)
    assert store.open_web_sessions([*many, "c"], now_ms=0) == {*many[::100], "c"}
    assert store.open_web_sessions([], now_ms=0) == set()
    assert store.close_web_sessions(digest="b") == 1  # logged out
    assert store.web_session_user("b", now_ms=0) is None
    store.open_web_session("d", "u1", now_ms=0, expires_ms=400)
    assert store.close_web_sessions(user_id="u1") == 2  # a password change: a and d
    assert store.web_session_user("c", now_ms=0) == "u2"
    assert store.forget_web_sessions(before_ms=301) == 1
    assert store.web_session_user("c", now_ms=0) is None


def test_users_and_board_members(store: SqlStore) -> None:
    def user(uid: str, token: str, owner: bool = False) -> Mutation:
        return Mutation(
            "insert",
            "users",
            {"id": uid},
            {
                "name": uid.upper(),
                "token_hash": hash_token(token),
                "is_owner": owner,
                "created_at": 1,
            },
        )

    def member(uid: str, role: str) -> Mutation:
        return Mutation(
            "insert", "board_members", {"board_id": "b1", "user_id": uid}, {"role": role}
        )

    board = Mutation(
        "insert",
        "boards",
        {"id": "b1"},
        {"name": "B", "owner_id": "u1", "created_at": 1, "updated_at": 1},
    )
    results = store.commit(
        [
            WriteRequest(mutations=[user("u1", "secret-1", True), user("u2", "secret-2"), board]),
            WriteRequest(mutations=[member("u2", "viewer"), member("u1", "owner")]),
            WriteRequest(mutations=[user("u3", "secret-1")]),  # same token: unique hash
            WriteRequest(mutations=[user("u4", "secret-4"), member("u4", "superuser")]),
        ]
    )
    ok(results[0])
    ok(results[1])
    assert isinstance(results[2], StoreIntegrityError)
    assert isinstance(results[3], StoreIntegrityError)
    assert hash_token("secret-1") == hashlib.sha256(b"secret-1").hexdigest()

    found = store.user_by_token_hash(hash_token("secret-1"))
    assert found == {
        "id": "u1",
        "name": "U1",
        "is_owner": True,
        "created_at": 1,
        "removed_at": None,
    }
    assert store.user_by_token_hash(hash_token("nobody")) is None
    assert store.get("users", "u4") is None  # its request failed as a whole
    # the sweep's read: the token hashes of users not removed, in parts of 500
    assert store.token_hashes(["u1", "u2", "u4", *(f"x{n}" for n in range(1_000))]) == {
        "u1": hash_token("secret-1"),
        "u2": hash_token("secret-2"),
    }
    ok(
        store.commit(
            [WriteRequest(mutations=[Mutation("update", "users", {"id": "u2"}, {"removed_at": 9})])]
        )[0]
    )
    assert store.token_hashes(["u2"]) == {} and store.token_hashes([]) == {}
    assert store.board_members("b1") == [
        {"board_id": "b1", "user_id": "u1", "role": "owner"},
        {"board_id": "b1", "user_id": "u2", "role": "viewer"},
    ]
    assert store.board_members("b-none") == []
    assert store.get("board_members", {"board_id": "b1", "user_id": "u2"}) == {
        "board_id": "b1",
        "user_id": "u2",
        "role": "viewer",
    }


# --------------------------------------------------------------------------- in memory


def test_in_memory_store_keeps_its_data_across_calls_and_threads() -> None:
    store = open_store("sqlite://", new_epoch=Epochs())
    try:
        ok(store.commit([_good("s1", "r", 1)])[0])
        seen: list[Any] = []
        reader = threading.Thread(target=lambda: seen.append(store.get("sessions", "s1")))
        reader.start()
        reader.join()
        assert seen[0] is not None and seen[0]["id"] == "s1"
        assert seqs(store.commit([_good("s2", "r", 2)])[0]) == [(2, None)]
        assert_gap_free(store, "r", 2)
    finally:
        store.close()


# --------------------------------------------------------------------------- property


ROOMS = ("room-a", "room-b", "room-c")
KINDS = (
    "ok",
    "ok",
    "events only",
    "duplicate",
    "missing",
    "conflict",
    "check",
    "bad payload",
    "poison",
)

request_specs = st.tuples(
    st.sampled_from(KINDS),
    st.lists(st.tuples(st.sampled_from(ROOMS), st.integers(1, 3)), max_size=3),
)
steps = st.lists(
    st.one_of(st.lists(request_specs, min_size=1, max_size=6), st.just("reopen")),
    min_size=1,
    max_size=6,
)
examples = itertools.count()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan=steps)
def test_any_interleaving_of_good_and_bad_requests_keeps_seqs_gap_free(
    db: Backend, plan: list[Any]
) -> None:
    prefix = f"x{next(examples)}"
    rooms = {r: f"{prefix}-{r}" for r in ROOMS}
    store = db.open()
    _install_poison_trigger(db)
    try:
        ok(
            store.commit(
                [
                    WriteRequest(
                        mutations=[
                            Mutation(
                                "upsert",
                                "sessions",
                                {"id": "anchor"},
                                {"created_at": 1, "updated_at": 1},
                            )
                        ]
                    )
                ]
            )[0]
        )
        heads = dict.fromkeys(rooms.values(), 0)
        ids = itertools.count()

        def build(kind: str, drafts: list[EventDraft]) -> WriteRequest:
            fresh = f"{prefix}-s{next(ids)}"
            if kind == "ok":
                return WriteRequest(mutations=[add_session(fresh)], events=drafts)
            if kind == "events only":
                return WriteRequest(events=drafts)
            if kind == "duplicate":
                return WriteRequest(
                    mutations=[add_session(fresh), add_session("anchor")], events=drafts
                )
            if kind == "missing":
                return WriteRequest(
                    mutations=[Mutation("update", "sessions", {"id": fresh}, {"title": "t"})],
                    events=drafts,
                )
            if kind == "conflict":
                return WriteRequest(
                    expect=[Expect("sessions", {"id": "anchor"}, "title", "never")], events=drafts
                )
            if kind == "check":
                return WriteRequest(mutations=[add_session(fresh, status="bogus")], events=drafts)
            if kind == "poison":
                return WriteRequest(
                    events=[*drafts, EventDraft(rooms["room-b"], "poison", 1, ts=1)]
                )
            return WriteRequest(events=[*drafts, EventDraft(rooms["room-a"], "x", {1, 2}, ts=1)])

        for step in plan:
            if step == "reopen":
                store.close()
                store = db.open()
                continue
            requests = []
            expected: list[list[tuple[str, int, int | None]] | None] = []
            for kind, events in step:
                drafts = [
                    EventDraft(rooms[room], "e", {"k": kind}, ts=1, merge_count=count)
                    for room, count in events
                ]
                requests.append(build(kind, drafts))
                if kind in ("ok", "events only"):
                    allocated = []
                    for draft in drafts:
                        seq = heads[draft.room] + 1
                        heads[draft.room] += draft.merge_count
                        last = heads[draft.room] if draft.merge_count > 1 else None
                        allocated.append((draft.room, seq, last))
                    expected.append(allocated)
                else:
                    expected.append(None)
            results = store.commit(requests)
            for result, want in zip(results, expected, strict=True):
                if want is None:
                    assert isinstance(result, StoreError), result
                else:
                    assert [(e.room, e.seq, e.last_seq) for e in ok(result).events] == want
        for room, head in heads.items():
            assert_gap_free(store, room, head)
    finally:
        store.close()
