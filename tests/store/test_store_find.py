"""``find``/``get`` with the Feathers-like query language, cursor paging and
the activity log's ``events_page``."""

from __future__ import annotations

import base64
import functools
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_store_support import BACKENDS, Backend, add_session, add_task, backend

from agor_actors.store import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    EventDraft,
    Mutation,
    SqlStore,
    StoreIntegrityError,
    StoreQueryError,
    WriteRequest,
    WriteResult,
    hash_token,
    open_store,
)

STATUSES = ("idle", "running", "awaiting_permission", "completed", "failed")
N_SESSIONS = 60


def session_values(i: int) -> dict[str, Any]:
    return {
        "board_id": None if i % 5 == 0 else ("b1" if i % 2 else "b2"),
        "status": STATUSES[i % len(STATUSES)],
        "title": f"title {i % 7}",
        "agent": (None, "claude", "codex")[i % 3],
        "locked_by": ("u1", "u2", None)[i % 3],
        "git_state": {"branch": f"br-{i}"},
        "created_at": 1000 + (i * 7) % N_SESSIONS,
        "updated_at": 2000 + i,
    }


def seed_rows() -> list[dict[str, Any]]:
    return [
        {
            "id": f"s{i:02d}",
            "rev": 0,
            "clocks": {},
            "owner_id": None,
            "permissions": None,
            **session_values(i),
        }
        for i in range(N_SESSIONS)
    ]


@pytest.fixture(scope="module", params=BACKENDS)
def seeded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SqlStore]:
    """One store with users, boards and 60 sessions, shared by the read-only tests."""
    with backend(request.param, tmp_path_factory.mktemp("find")) as b:
        store = b.open()
        store.commit([WriteRequest(mutations=base_mutations())])
        yield store


@pytest.fixture(params=BACKENDS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    with backend(request.param, tmp_path) as b:
        yield b


def base_mutations() -> list[Mutation]:
    users = [
        Mutation(
            "insert",
            "users",
            {"id": uid},
            {"name": uid, "token_hash": hash_token(uid), "created_at": 1},
        )
        for uid in ("u1", "u2")
    ]
    boards = [
        Mutation("insert", "boards", {"id": bid}, {"name": bid, "created_at": 1, "updated_at": 1})
        for bid in ("b1", "b2")
    ]
    sessions = [
        Mutation(
            "insert",
            "sessions",
            {"id": row["id"]},
            {k: v for k, v in row.items() if k not in ("id", "rev", "clocks")},
        )
        for row in seed_rows()
    ]
    return [*users, *boards, *sessions]


def ids(items: list[dict[str, Any]]) -> list[str]:
    return [item["id"] for item in items]


def order(spec: list[tuple[str, int]]) -> Callable[[dict[str, Any]], Any]:
    """The documented order in Python: NULL smallest, then the primary key."""

    def compare(a: dict[str, Any], b: dict[str, Any]) -> int:
        for column, direction in [*spec, ("id", 1)]:
            x, y = a[column], b[column]
            if x == y:
                continue
            if x is None:
                result = -1
            elif y is None:
                result = 1
            else:
                result = -1 if x < y else 1
            return result * direction
        return 0

    return functools.cmp_to_key(compare)


def all_pages(store: SqlStore, table: str, query: dict[str, Any]) -> Iterator[list[str]]:
    cursor = None
    while True:
        page = store.find(table, {**query, "$cursor": cursor})
        yield ids(page.items)
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


# --------------------------------------------------------------------------- filters

ROWS = seed_rows()

FILTERS: dict[str, tuple[dict[str, Any], Callable[[dict[str, Any]], bool]]] = {
    "equality": ({"status": "running"}, lambda r: r["status"] == "running"),
    "two columns": (
        {"board_id": "b1", "status": "idle"},
        lambda r: r["board_id"] == "b1" and r["status"] == "idle",
    ),
    "is null": ({"locked_by": None}, lambda r: r["locked_by"] is None),
    "$in": (
        {"status": {"$in": ["idle", "failed"]}},
        lambda r: r["status"] in ("idle", "failed"),
    ),
    "$in with null": (
        {"locked_by": {"$in": ["u1", None]}},
        lambda r: r["locked_by"] in ("u1", None),
    ),
    "$in empty": ({"status": {"$in": []}}, lambda r: False),
    "$nin keeps nulls": ({"locked_by": {"$nin": ["u1"]}}, lambda r: r["locked_by"] != "u1"),
    "$nin with null": (
        {"locked_by": {"$nin": ["u1", None]}},
        lambda r: r["locked_by"] not in ("u1", None),
    ),
    "$ne keeps nulls": ({"agent": {"$ne": "claude"}}, lambda r: r["agent"] != "claude"),
    "$ne null": ({"agent": {"$ne": None}}, lambda r: r["agent"] is not None),
    "$gt": ({"created_at": {"$gt": 1030}}, lambda r: r["created_at"] > 1030),
    "$gte": ({"created_at": {"$gte": 1030}}, lambda r: r["created_at"] >= 1030),
    "$lt": ({"created_at": {"$lt": 1007}}, lambda r: r["created_at"] < 1007),
    "$lte": ({"created_at": {"$lte": 1007}}, lambda r: r["created_at"] <= 1007),
    "range": (
        {"created_at": {"$gte": 1010, "$lt": 1020}, "agent": "codex"},
        lambda r: 1010 <= r["created_at"] < 1020 and r["agent"] == "codex",
    ),
    "string order": ({"title": {"$gt": "title 4"}}, lambda r: r["title"] > "title 4"),
    "$gt skips nulls": ({"board_id": {"$gt": "b1"}}, lambda r: r["board_id"] == "b2"),
}


@pytest.mark.parametrize("name", list(FILTERS))
def test_filter(seeded: SqlStore, name: str) -> None:
    query, predicate = FILTERS[name]
    page = seeded.find("sessions", {**query, "$limit": MAX_LIMIT, "$total": True})
    expected = [r["id"] for r in ROWS if predicate(r)]
    assert ids(page.items) == expected  # default order: by id
    assert page.total == len(expected)
    assert page.next_cursor is None


def test_items_are_whole_rows_but_the_merge_clocks(seeded: SqlStore) -> None:
    page = seeded.find("sessions", {"id": "s07"})
    assert page.items == [
        {k: v for k, v in r.items() if k != "clocks"} for r in ROWS if r["id"] == "s07"
    ]
    assert page.total is None
    assert seeded.get("sessions", "s07") == next(r for r in ROWS if r["id"] == "s07")


# --------------------------------------------------------------------------- sort, limit, select

SORTS = [
    [("status", 1)],
    [("status", 1), ("created_at", -1)],
    [("locked_by", -1), ("title", 1)],
    [("locked_by", 1), ("agent", -1), ("created_at", 1)],
    [("board_id", -1)],
    [("created_at", -1)],
    [("id", -1)],
]


@pytest.mark.parametrize("spec", SORTS, ids=lambda spec: ",".join(f"{c}{d:+d}" for c, d in spec))
def test_sort(seeded: SqlStore, spec: list[tuple[str, int]]) -> None:
    page = seeded.find("sessions", {"$sort": dict(spec), "$limit": MAX_LIMIT})
    assert ids(page.items) == [r["id"] for r in sorted(ROWS, key=order(spec))]


def test_limit(seeded: SqlStore) -> None:
    page = seeded.find("sessions")
    assert len(page.items) == DEFAULT_LIMIT == 50
    assert page.next_cursor is not None
    assert len(seeded.find("sessions", {"$limit": 3}).items) == 3
    assert len(seeded.find("sessions", {"$limit": MAX_LIMIT}).items) == N_SESSIONS
    counted = seeded.find("sessions", {"$limit": 0, "status": "idle"})
    assert counted.items == [] and counted.next_cursor is None
    assert counted.total == N_SESSIONS // len(STATUSES)


def test_select(seeded: SqlStore) -> None:
    page = seeded.find("sessions", {"$select": ["title", "git_state"], "$limit": 2})
    assert page.items == [
        {"id": "s00", "title": "title 0", "git_state": {"branch": "br-0"}},
        {"id": "s01", "title": "title 1", "git_state": {"branch": "br-1"}},
    ]
    assert seeded.find("users", {"$select": ["name"]}).items == [
        {"id": "u1", "name": "u1"},
        {"id": "u2", "name": "u2"},
    ]


# --------------------------------------------------------------------------- cursor paging


@pytest.mark.parametrize("spec", SORTS, ids=lambda spec: ",".join(f"{c}{d:+d}" for c, d in spec))
def test_cursor_pages_cover_every_row_once(seeded: SqlStore, spec: list[tuple[str, int]]) -> None:
    pages = list(all_pages(seeded, "sessions", {"$sort": dict(spec), "$limit": 7}))
    assert [len(p) for p in pages] == [7] * 8 + [4]
    assert list(itertools.chain(*pages)) == [r["id"] for r in sorted(ROWS, key=order(spec))]


def test_cursor_paging_is_stable_under_inserts(db: Backend) -> None:
    store = db.open()
    store.commit([WriteRequest(mutations=base_mutations())])
    spec = [("locked_by", -1), ("created_at", 1)]
    query = {"$sort": dict(spec), "$limit": 9}
    inserted: list[dict[str, Any]] = []
    seen: list[dict[str, Any]] = []
    cursor = None
    fresh = itertools.count()
    while True:
        page = store.find("sessions", {**query, "$cursor": cursor})
        seen += page.items
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
        # between pages: rows that sort before the position and after it
        last = page.items[-1]
        for locked_by, created_at in ((None, 999), ("u1", 5000), (last["locked_by"], 999)):
            n = next(fresh)
            row = {**session_values(n), "locked_by": locked_by, "created_at": created_at}
            new_id = f"new{n:02d}"
            result = store.commit(
                [
                    WriteRequest(
                        mutations=[
                            add_session(
                                new_id,
                                **{k: v for k, v in row.items() if k not in ("created_at",)},
                                ts=created_at,
                            )
                        ]
                    )
                ]
            )
            assert isinstance(result[0], WriteResult)
            inserted.append({"id": new_id, **row, "position": last})

    seen_ids = ids(seen)
    assert len(seen_ids) == len(set(seen_ids)), "a row came twice"
    assert {r["id"] for r in ROWS} <= set(seen_ids), "a row was skipped"
    assert seen == sorted(seen, key=order(spec)), "pages are not in order"
    key = order(spec)
    for row in inserted:
        after = key(row) > key(row["position"])
        assert (row["id"] in seen_ids) == after, row


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    spec=st.lists(
        st.tuples(
            st.sampled_from(["status", "title", "created_at", "locked_by", "agent", "board_id"]),
            st.sampled_from([1, -1]),
        ),
        max_size=3,
        unique_by=lambda item: item[0],
    ),
    size=st.integers(1, 25),
    where=st.sampled_from(list(FILTERS)),
)
def test_pages_concatenate_to_the_sorted_result(
    seeded: SqlStore, spec: list[tuple[str, int]], size: int, where: str
) -> None:
    query, predicate = FILTERS[where]
    paged = list(
        itertools.chain(
            *all_pages(seeded, "sessions", {**query, "$limit": size, "$sort": dict(spec) or None})
        )
    )
    expected = [r["id"] for r in sorted(filter(predicate, ROWS), key=order(spec))]
    assert paged == expected


def test_a_cursor_only_fits_its_own_query(seeded: SqlStore) -> None:
    cursor = seeded.find("sessions", {"$sort": {"status": 1}, "$limit": 5}).next_cursor
    assert cursor is not None
    for other in (
        {"$sort": {"created_at": 1}},
        {"$sort": {"status": -1}},
        {"$sort": {"status": 1}, "agent": "codex"},
    ):
        with pytest.raises(StoreQueryError, match="another query"):
            seeded.find("sessions", {**other, "$cursor": cursor})
    with pytest.raises(StoreQueryError, match="another query"):
        seeded.find("tasks", {"$sort": {"status": 1}, "$cursor": cursor})
    # the same query with another limit or projection is the same query
    page = seeded.find("sessions", {"$sort": {"status": 1}, "$limit": 2, "$cursor": cursor})
    assert len(page.items) == 2


# --------------------------------------------------------------------------- bad queries


def _forged_cursor(payload: object) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(payload)).decode().rstrip("=")


BAD_QUERIES: list[tuple[str, Any, str]] = [
    ("sessions", {"colour": "red"}, "unknown column 'colour' in sessions"),
    ("sessions", {"id; DROP TABLE sessions": 1}, "unknown column"),
    ("sessions", {"status": {"$regex": "^i"}}, "unknown operator '$regex'"),
    ("sessions", {"$skip": 5}, "unknown operator '$skip'"),
    ("sessions", {"$or": [{"status": "idle"}]}, "unknown operator '$or'"),
    ("sessions", {"status": {}}, "empty operator"),
    ("sessions", {"status": ["idle"]}, "use {'$in'"),
    ("sessions", {"status": {"$in": "idle"}}, "takes a list"),
    ("sessions", {"created_at": "1000"}, "expected int"),
    ("sessions", {"created_at": True}, "expected int"),
    ("sessions", {"title": {"$gt": 3}}, "expected str"),
    ("sessions", {"created_at": {"$gt": None}}, "null"),
    ("sessions", {"git_state": {"branch": "x"}}, "JSON column"),
    ("sessions", {"$sort": {"permissions": 1}}, "JSON column"),
    ("sessions", {"$sort": {"status": 2}}, "must be 1 or -1"),
    ("sessions", {"$sort": {"status": True}}, "must be 1 or -1"),
    ("sessions", {"$sort": {"nope": 1}}, "unknown column 'nope'"),
    ("sessions", {"$sort": "status"}, "$sort takes"),
    ("sessions", {"$limit": MAX_LIMIT + 1}, "$limit must be"),
    ("sessions", {"$limit": -1}, "$limit must be"),
    ("sessions", {"$limit": "10"}, "$limit must be"),
    ("sessions", {"$select": []}, "$select takes"),
    ("sessions", {"$select": ["nope"]}, "unknown column"),
    ("sessions", {"$total": "yes"}, "$total"),
    ("sessions", {"$cursor": "not base64 at all!"}, "not a valid cursor"),
    ("sessions", {"$cursor": _forged_cursor([1, 2])}, "not a valid cursor"),
    ("sessions", {"$cursor": 42}, "$cursor must be"),
    ("users", {"token_hash": "x"}, "unknown column 'token_hash'"),
    ("users", {"$select": ["token_hash"]}, "unknown column 'token_hash'"),
    ("users", {"$sort": {"token_hash": 1}}, "unknown column 'token_hash'"),
    ("events", {}, "unknown table 'events'"),
    ("rooms", {}, "unknown table"),
    ("sessions; DROP TABLE users", {}, "unknown table"),
]


@pytest.mark.parametrize(("table", "query", "message"), BAD_QUERIES)
def test_bad_query(seeded: SqlStore, table: str, query: Any, message: str) -> None:
    with pytest.raises(StoreQueryError) as raised:
        seeded.find(table, query)
    assert message in str(raised.value)


def test_values_are_only_values(seeded: SqlStore) -> None:
    assert seeded.find("sessions", {"title": "x' OR '1'='1"}).items == []
    evil = {"id": {"$in": ["s01'); DROP TABLE sessions; --"]}}
    assert seeded.find("sessions", evil).items == []
    assert seeded.find("sessions", {"$limit": 0}).total == N_SESSIONS


def test_forged_cursor_with_the_right_fingerprint_is_type_checked(seeded: SqlStore) -> None:
    cursor = seeded.find("sessions", {"$limit": 1}).next_cursor
    assert cursor is not None
    decoded = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    forged = _forged_cursor({"f": decoded["f"], "k": [7]})
    with pytest.raises(StoreQueryError, match="expected str"):
        seeded.find("sessions", {"$limit": 1, "$cursor": forged})


# --------------------------------------------------------------------------- get


def test_get(seeded: SqlStore) -> None:
    assert seeded.get("sessions", "s03") == next(r for r in ROWS if r["id"] == "s03")
    assert seeded.get("sessions", "nope") is None
    assert seeded.get("users", "u1") == {
        "id": "u1",
        "name": "u1",
        "is_owner": False,
        "created_at": 1,
        "removed_at": None,
    }
    with pytest.raises(StoreQueryError, match="composite"):
        seeded.get("board_members", "b1")
    with pytest.raises(StoreQueryError, match="expected str"):
        seeded.get("sessions", 3)
    with pytest.raises(StoreQueryError, match="unknown table"):
        seeded.get("meta", "schema_version")


# --------------------------------------------------------------------------- events_page


def test_events_page_newest_first_with_filters(db: Backend) -> None:
    store = db.open()
    names = ["sessions:created", "messages:created", "tasks:created"]
    drafts = [
        EventDraft(
            room="board:b1",
            event=names[i % 3],
            data={"i": i},
            ts=i,
            user_id=("u1", "u2")[i % 2],
            merge_count=2 if i == 4 else 1,
        )
        for i in range(30)
    ]
    store.commit([WriteRequest(events=[d]) for d in drafts])
    store.commit([WriteRequest(events=[EventDraft("board:b2", "sessions:created", {}, ts=1)])])

    def walk(**filters: Any) -> list[int]:
        seen: list[int] = []
        before = None
        while True:
            page = store.events_page("board:b1", before_seq=before, limit=4, **filters)
            assert len(page.items) <= 4
            seen += [e.data["i"] for e in page.items]
            if page.next_before_seq is None:
                return seen
            before = page.next_before_seq

    assert walk() == list(range(29, -1, -1))
    wanted = ["sessions:created", "tasks:created"]
    assert walk(events=wanted) == [i for i in range(29, -1, -1) if i % 3 != 1]
    assert walk(user_id="u2") == [i for i in range(29, -1, -1) if i % 2]
    assert walk(events=["tasks:created"], user_id="u1") == [
        i for i in range(29, -1, -1) if i % 3 == 2 and i % 2 == 0
    ]
    assert walk(events=[]) == []
    page = store.events_page("board:b1", limit=3)
    assert [e.seq for e in page.items] == [31, 30, 29]  # event 4 took seqs 5..6
    assert page.next_before_seq == 29
    for bad in (0, MAX_LIMIT + 1):
        with pytest.raises(StoreQueryError, match="limit"):
            store.events_page("board:b1", limit=bad)
    for before in (2**63, -(2**63) - 1):  # the driver would overflow
        with pytest.raises(StoreQueryError, match="64-bit"):
            store.events_page("board:b1", before_seq=before)
    assert store.events_page("board:b1", before_seq=2**63 - 1, limit=1).items[0].seq == 31
    # any room's log reads the same way (a session room's has no index by user)
    store.commit([WriteRequest(events=[EventDraft("session:s", "x", {"i": 1}, 1, user_id="u1")])])
    assert [e.data for e in store.events_page("session:s", user_id="u1").items] == [{"i": 1}]
    assert store.events_page("session:s", user_id="u2").items == []


def test_a_boards_activity_by_user_reads_the_partial_index(tmp_path: Path) -> None:
    """Only board rooms' events are indexed by user (a commit of streamed
    chunks writes no page of it); the activity query says so in the index's
    own words, and SQLite's planner takes it."""
    store = open_store(f"sqlite:///{tmp_path / 'p.db'}", new_epoch=lambda: "e")
    statements: list[tuple[str, Any]] = []

    @sa.event.listens_for(store.engine, "before_cursor_execute")
    def seen(conn: Any, cursor: Any, statement: str, params: Any, *rest: Any) -> None:
        if "FROM events" in statement:
            statements.append((statement, params))

    try:
        store.events_page("board:b1", user_id="u1", events=["x"])
        ((statement, params),) = statements
        with store.engine.connect() as conn:
            plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", params).all()
        assert "ix_events_board_user_seq" in str(plan), plan
    finally:
        store.close()


def test_rows_have_plain_str_keys(tmp_path: Path) -> None:
    """Strict encoders (orjson) refuse ``str`` subclasses such as
    SQLAlchemy's ``quoted_name``: rows must come back with plain keys."""
    store = open_store(f"sqlite:///{tmp_path / 'k.db'}", new_epoch=lambda: "e")
    try:
        now = 1
        store.commit(
            [
                WriteRequest(
                    mutations=[
                        Mutation(
                            "insert",
                            "boards",
                            {"id": "b"},
                            {"name": "B", "created_at": now, "updated_at": now},
                        )
                    ]
                )
            ]
        )
        row = store.get("boards", "b")
        page = store.find("boards", {})
        assert row is not None
        for keys in (list(row), list(page.items[0])):
            assert keys and all(type(k) is str for k in keys)
    finally:
        store.close()


def test_per_row_cursors_go_on_from_each_row(seeded: SqlStore) -> None:
    query: dict[str, Any] = {"$sort": {"title": -1}, "$limit": 7}
    page = seeded.find("sessions", query, cursors=True)
    assert page.limit == 7 and page.cursors is not None
    assert len(page.cursors) == len(page.items) == 7
    assert page.cursors[-1] == page.next_cursor
    everything = list(itertools.chain(*all_pages(seeded, "sessions", {**query, "$limit": 500})))
    for n, cursor in enumerate(page.cursors):
        after = seeded.find("sessions", {**query, "$cursor": cursor, "$limit": 3})
        assert ids(after.items) == everything[n + 1 : n + 4]
    assert seeded.find("sessions", {"$limit": 2}).cursors is None  # only when asked
    assert seeded.find("sessions", {}).limit == DEFAULT_LIMIT


def test_a_meta_secret_is_the_first_one_kept_for_every_store_on_the_database(
    db: Backend,
) -> None:
    first, second = db.open(), db.open()  # (two daemons on one database)
    assert first.meta_secret("cursor_key", "aa") == "aa"
    assert second.meta_secret("cursor_key", "bb") == "aa"
    assert second.meta_secret("other", "cc") == "cc"
    assert db.open().meta_secret("cursor_key", "dd") == "aa"


@pytest.mark.parametrize(
    "value",
    [0, 7, -3, 2**63 - 1, -(2**63), 1.5, -0.25, 1e300, "5", "1e5", True, None, [0], {"n": 1}],
)
def test_a_json_column_holding_a_bare_number_reads_back(db: Backend, value: Any) -> None:
    # SQLite's JSON columns have numeric affinity: "5" was kept as 5 and
    # read back through the JSON decoder, which refused it; every read of
    # the row (a task whose result is 0) failed
    store = db.open()
    store.commit([WriteRequest(mutations=(add_session("s1"),))])
    task = add_task("t1", "s1", prompt="p", status="completed", result=value)
    assert store.commit([WriteRequest(mutations=(task,))]) == [WriteResult(events=())]
    row = store.get("tasks", "t1")
    assert row is not None and row["result"] == value and type(row["result"]) is type(value)
    assert [item["result"] for item in store.find("tasks", {}).items] == [value]


def test_a_bare_integer_beyond_64_bits_is_refused_in_data_and_queries(db: Backend) -> None:
    store = db.open()
    store.commit([WriteRequest(mutations=(add_session("s1"),))])
    task = add_task("t1", "s1", prompt="p", result=2**64 - 1)
    [refused] = store.commit([WriteRequest(mutations=(task,))])
    assert isinstance(refused, StoreIntegrityError)
    assert "beyond 64 bits" in str(refused)
    for query in (
        {"created_at": 2**63},
        {"rev": {"$gt": 2**64 - 1}},
        {"rev": {"$in": [-(2**63) - 1]}},
    ):
        with pytest.raises(StoreQueryError, match="beyond a 64-bit integer"):
            store.find("tasks", query)


def test_a_nul_in_a_query_is_refused_on_every_store(db: Backend) -> None:
    # PostgreSQL refuses one in a text; SQLite would only match nothing
    store = db.open()
    for query in ({"title": "a\x00b"}, {"title": {"$in": ["ok", "\x00"]}}):
        with pytest.raises(StoreQueryError, match="NUL"):
            store.find("sessions", query)


def test_pages_sorted_on_a_long_text_go_on(db: Backend) -> None:
    # the cursor holds the sort value: one of a 100,000-character prompt was
    # refused as "not the next_cursor of a previous page"
    store = db.open()
    store.commit([WriteRequest(mutations=(add_session("s1"),))])
    tasks = [add_task(f"t{n}", "s1", prompt=str(n) * 100_000) for n in range(3)]
    store.commit([WriteRequest(mutations=tuple(tasks))])
    pages = list(all_pages(store, "tasks", {"$sort": {"prompt": -1}, "$limit": 1}))
    assert pages == [["t2"], ["t1"], ["t0"]]
