"""The commit path's prepared statements: compiled once for the engine's
dialect, bound as SQLAlchemy would bind them, run on the DB-API cursor;
and the group commit's plain writes going through them alone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from test_store_support import BACKENDS, Backend, Epochs, add_session, backend, ev, only_events

from agor_actors.store import (
    Append,
    Expect,
    Mutation,
    SqlStore,
    StoreConflict,
    StoreNotFound,
    StoreUnavailable,
    WriteRequest,
    WriteResult,
    _backend,
    metadata,
    open_store,
)
from agor_actors.store._prepared import Prepared


@pytest.fixture(params=BACKENDS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    with backend(request.param, tmp_path) as b:
        yield b


@pytest.fixture
def store(db: Backend) -> SqlStore:
    return db.open()


def test_a_prepared_insert_binds_like_sqlalchemy(store: SqlStore) -> None:
    sessions = metadata.tables["sessions"]
    columns = ("id", "title", "git_state", "clocks", "created_at", "updated_at")
    insert = Prepared(
        sa.insert(sessions).values(
            {c: sa.bindparam(f"p_{c}", type_=sessions.c[c].type) for c in columns}
        ),
        store.engine.dialect,
    )
    # the dialect's own SQL: qmark for sqlite3, pyformat for psycopg
    assert ("?" in insert.sql) == (store.dialect == "sqlite")
    rows: list[dict[str, Any]] = [
        {
            "p_id": f"s{i}",
            "p_title": "t",
            "p_git_state": {"branch": "main", "n": i} if i else None,
            "p_clocks": {},
            "p_created_at": i,
            "p_updated_at": i,
        }
        for i in range(3)
    ]
    with store.engine.begin() as conn:
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        cursor = dbapi.cursor()
        assert insert.executemany(cursor, rows) == 3
        cursor.close()
    # JSON went in as JSON (None as JSON null), read back through SQLAlchemy
    read = [store.get("sessions", f"s{i}") for i in range(3)]
    assert [row["git_state"] if row else "missing" for row in read] == [
        None,
        {"branch": "main", "n": 1},
        {"branch": "main", "n": 2},
    ]


def test_a_driver_error_comes_out_as_sqlalchemys(store: SqlStore) -> None:
    sessions = metadata.tables["sessions"]
    insert = Prepared(
        sa.insert(sessions).values(
            id=sa.bindparam("p_id"),
            created_at=sa.bindparam("p_at", type_=sa.BigInteger),
            updated_at=sa.bindparam("p_at2", type_=sa.BigInteger),
            clocks=sa.bindparam("p_clocks", type_=sessions.c.clocks.type),
        ),
        store.engine.dialect,
    )
    row = {"p_id": "dup", "p_at": 1, "p_at2": 1, "p_clocks": {}}
    with store.engine.connect() as conn:
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        cursor = dbapi.cursor()
        insert.execute(cursor, dict(row))
        with pytest.raises(sa.exc.IntegrityError) as caught:
            insert.execute(cursor, dict(row))
        assert isinstance(caught.value.orig, store.engine.dialect.loaded_dbapi.Error)
        cursor.close()
        conn.rollback()


def test_a_parameter_with_a_value_is_refused(store: SqlStore) -> None:
    sessions = metadata.tables["sessions"]
    with pytest.raises(ValueError, match="has a value"):
        Prepared(
            sa.update(sessions).where(sessions.c.id == "fixed").values(title="x"),
            store.engine.dialect,
        )


def test_plain_writes_run_no_statement_through_sqlalchemy(db: Backend) -> None:
    """A group of plain writes (a new task, streamed chunks, a delete) and
    their events: nothing compiled or executed by SQLAlchemy per statement,
    also for a room the store has not seen (its head is read raw)."""
    store = db.open()
    setup = [
        WriteRequest(
            mutations=[
                add_session("s1"),
                Mutation(
                    "insert",
                    "messages",
                    {"id": "m1"},
                    {"session_id": "s1", "role": "assistant", "created_at": 1, "updated_at": 1},
                ),
            ]
        )
    ]
    assert isinstance(store.commit(setup)[0], WriteResult)
    seen: list[str] = []

    @sa.event.listens_for(store.engine, "before_cursor_execute")
    def _count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    task = {"session_id": "s1", "prompt": "p", "created_at": 2, "updated_at": 2}
    group = [
        WriteRequest(
            mutations=[Mutation("insert", "tasks", {"id": "t1"}, task)],
            events=[ev("session:s1", "task:created", 1), ev("board:b1", "task:created", 1)],
        ),
        *(
            WriteRequest(
                mutations=[Mutation("update", "messages", {"id": "m1"}, {"content": Append(c)})],
                events=[ev("session:s1", "task:message", i)],
            )
            for i, c in enumerate("abc")
        ),
        WriteRequest(mutations=[Mutation("delete", "tasks", {"id": "t1"})]),
    ]
    results = store.commit(group)
    sa.event.remove(store.engine, "before_cursor_execute", _count)
    assert all(isinstance(r, WriteResult) for r in results), results
    assert seen == []
    message = store.get("messages", "m1")
    assert message is not None and message["content"] == "abc"
    assert message["streaming"] is False and message["clocks"] == {}  # Python-side defaults
    assert store.get("tasks", "t1") is None
    assert store.room_head("session:s1") == ("epoch-1", 4)
    assert store.room_head("board:b1") == ("epoch-2", 1)


def test_requests_with_preconditions_run_their_statements_on_the_cursor(db: Backend) -> None:
    """A request in a savepoint (a precondition, several mutations): its
    precondition's read and its plain insert, update and delete are
    statements compiled once, run on the cursor, not through SQLAlchemy;
    a precondition that fails and a row that is missing are still that
    request's own errors, and change nothing."""
    store = db.open()
    assert isinstance(
        store.commit([WriteRequest(mutations=[add_session("s1", rev=1)])])[0], WriteResult
    )
    seen: list[str] = []

    @sa.event.listens_for(store.engine, "before_cursor_execute")
    def _count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    task = {"session_id": "s1", "prompt": "p", "created_at": 2, "updated_at": 2}
    at_rev = (Expect("sessions", {"id": "s1"}, "rev", 1),)
    results = store.commit(
        [
            WriteRequest(  # the precondition holds: both mutations land
                mutations=[
                    Mutation("update", "sessions", {"id": "s1"}, {"title": "one", "rev": 2}),
                    Mutation("insert", "tasks", {"id": "t1"}, task),
                ],
                expect=at_rev,
                events=[ev("session:s1", "session:updated", 1)],
            ),
            WriteRequest(  # planned on the same revision: refused, nothing written
                mutations=[
                    Mutation("update", "sessions", {"id": "s1"}, {"title": "two", "rev": 2}),
                    Mutation("insert", "tasks", {"id": "t2"}, task),
                ],
                expect=at_rev,
                events=[ev("session:s1", "session:updated", 2)],
            ),
            WriteRequest(  # a delete of a row that is not there
                mutations=[
                    Mutation("insert", "tasks", {"id": "t3"}, task),
                    Mutation("delete", "tasks", {"id": "t-none"}),
                ]
            ),
            WriteRequest(  # a delete, after an update, in one request
                mutations=[
                    Mutation("update", "tasks", {"id": "t1"}, {"prompt": "q"}),
                    Mutation("delete", "tasks", {"id": "t1"}),
                ],
                expect=(Expect("sessions", {"id": "s1"}, "title", "one"),),
            ),
        ]
    )
    sa.event.remove(store.engine, "before_cursor_execute", _count)
    assert isinstance(results[0], WriteResult) and isinstance(results[3], WriteResult), results
    assert isinstance(results[1], StoreConflict) and results[1].current == 2
    assert isinstance(results[2], StoreNotFound)
    assert seen == []
    session = store.get("sessions", "s1")
    assert session is not None and (session["title"], session["rev"]) == ("one", 2)
    assert [store.get("tasks", t) for t in ("t1", "t2", "t3")] == [None, None, None]
    assert store.room_head("session:s1") == ("epoch-1", 1)


def test_a_store_opened_again_on_its_engine_compiles_nothing_again(
    db: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The simulator opens a store per run on one engine: the statements
    the first store compiled (fixed ones and each write's shape) are the
    engine's, and the next store compiles none of them again."""
    first = db.open()
    request = WriteRequest(
        mutations=[add_session("s1")], events=[ev("session:s1", "session:created")]
    )
    assert isinstance(first.commit([request])[0], WriteResult)
    assert first.get("sessions", "s1") is not None
    compiled: list[str] = []

    class Counted(Prepared):
        def __init__(self, statement: sa.ClauseElement, dialect: sa.Dialect, **kw: Any) -> None:
            compiled.append(str(statement))
            super().__init__(statement, dialect, **kw)

    monkeypatch.setattr(_backend, "Prepared", Counted)
    again = SqlStore(first.engine, new_epoch=Epochs())
    request = WriteRequest(
        mutations=[add_session("s2")], events=[ev("session:s2", "session:created")]
    )
    assert isinstance(again.commit([request])[0], WriteResult)
    assert again.get("sessions", "s2") is not None
    assert compiled == []
    # a store on another engine compiles its own
    other = sa.create_engine("sqlite://")
    try:
        SqlStore(other, new_epoch=Epochs())
        assert compiled
    finally:
        other.dispose()


def test_a_locked_database_fails_the_group_and_it_recovers(tmp_path: Path) -> None:
    """BEGIN IMMEDIATE runs on the driver's connection: when it cannot take
    the write lock, the group fails as a whole with StoreUnavailable."""
    path = tmp_path / "locked.db"
    store = open_store(f"sqlite:///{path}", new_epoch=Epochs())

    @sa.event.listens_for(store.engine, "checkout")
    def _no_wait(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        dbapi_connection.execute("PRAGMA busy_timeout = 0")

    other = sa.create_engine(f"sqlite:///{path}", poolclass=sa.pool.NullPool)
    try:
        assert isinstance(store.commit([only_events(ev("r", n=1))])[0], WriteResult)
        with other.connect() as holder:
            holder.exec_driver_sql("BEGIN IMMEDIATE")
            results = store.commit([only_events(ev("r", n=2)), only_events(ev("new"))])
            assert all(isinstance(r, StoreUnavailable) for r in results), results
            assert "locked" in str(results[0])
            holder.rollback()
        (event,) = store.commit([only_events(ev("r", n=3))])[0].events  # type: ignore[union-attr]
        assert event.seq == 2
        assert store.room_head("new") is None
    finally:
        other.dispose()
        store.close()
