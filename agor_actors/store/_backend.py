"""The synchronous store: group commit with per-room sequence allocation, and
the reads the services and rooms need.

Everything here is plain blocking code.  The daemon's store actor calls it
through ``World.blocking.run(fn)`` (a worker thread for real, inline in the
simulator); it never imports trio and never reads the clock or randomness:
timestamps, ids and epochs come in from the caller.

One :class:`SqlStore` is the single writer of its database.  It keeps each
room's ``(epoch, head_seq)`` in memory after it has committed them, so that a
group commit costs no read per room.  That memory only ever holds committed
heads: a request that fails takes no seq (no gap, no reuse) and makes the
store forget its rooms' heads, a group that fails as a whole makes it forget
all of them, and the next write re-reads them from the database.

A *shared* store (``shared=True``: several daemons on one PostgreSQL) keeps
no such memory: each group commit locks its rooms' head rows (``SELECT ...
FOR UPDATE``, in room order, so two groups never wait on each other in a
circle) and takes the seqs from what they hold, in the transaction that
makes the events durable.  Another store's group on the same rooms waits for
the lock and then reads the head this one committed: one sequence per room
whichever daemon writes.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import logging
import os
import threading
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Final, Literal

import attrs
import orjson
import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine.interfaces import DBAPICursor
from sqlalchemy.pool import StaticPool

from ..marks import mark
from . import _schema as s
from ._prepared import Prepared, driver_errors
from ._query import (
    INT64,
    MAX_LIMIT,
    Page,
    check_value,
    compile_find,
    table_for,
    visible_columns,
)
from ._schema import (
    ENTITY_TABLES,
    SCHEMA_VERSION,
    StoreConflict,
    StoreError,
    StoreIntegrityError,
    StoreNotFound,
    StoreQueryError,
    StoreRepeated,
    StoreSchemaError,
    StoreUnavailable,
    unavailable,
)

log = logging.getLogger(__name__)

__all__ = [
    "Append",
    "Compact",
    "EventDraft",
    "EventPage",
    "Expect",
    "History",
    "Mutation",
    "Once",
    "SqlStore",
    "StoredEvent",
    "WriteRequest",
    "WriteResult",
    "hash_token",
    "open_store",
]

_WRITE: Final = "agor_store_write"  # execution option: BEGIN IMMEDIATE on SQLite
_HEAD_CACHE_MAX: Final = 65_536
_NO_LIMIT: Final = 2**62  # an Append without a limit: room for any column
_SCHEMA_LOCK_KEY: Final = 0x41474F52  # pg_advisory_xact_lock key while creating the schema
_SQLITE_BUSY_TIMEOUT_MS: Final = 5_000
_SQLITE_AUTOCHECKPOINT_PAGES: Final = 16_384
"""A SQLite file's WAL is copied back into the database by
:meth:`SqlStore.checkpoint` (the writer asks for it in a worker thread);
past this many pages (64 MiB) the committing connection does it itself
(SQLite's own default, 1,000 pages, made every few seconds' commit stall
the event loop on the copy and its fsync)."""

PG_CONNECT_TIMEOUT_S: Final = 5
"""libpq's ``connect_timeout``: a server that accepts nothing (or a
blackholed address) is unavailable after 5 s, not after the kernel's
minutes of SYN retries."""

_PG_CONNECT_DEFAULTS: Final[Mapping[str, int]] = {
    # libpq's too: a server that vanishes mid-transaction (its host gone, the network cut):
    # data unacknowledged for 15 s fails the statement (TCP_USER_TIMEOUT),
    # and an idle pooled connection is probed (keepalives) instead of
    # hanging the next write for the kernel's 15 minutes of retransmissions
    "tcp_user_timeout": 15_000,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 3,
    "keepalives_count": 3,
}


_IN_PART_MAX: Final = 500
"""Values per ``IN`` list of a read asked about many keys at once."""


def _in_parts(values: Collection[str]) -> Iterator[list[str]]:
    """``values`` in lists of at most :data:`_IN_PART_MAX` (an ``IN`` each)."""
    wanted = list(values)
    for start in range(0, len(wanted), _IN_PART_MAX):
        yield wanted[start : start + _IN_PART_MAX]


def hash_token(token: str) -> str:
    """The ``users.token_hash`` of ``token`` (sha256, hex)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- records


@attrs.frozen
class Append:
    """A mutation value that appends ``text`` to a text column (streaming
    message chunks) instead of rewriting it: ``content = content || text``,
    or, for a column kept in parts (``PARTS`` of the schema: a message's
    ``content``), a new part after the others (the row itself is not
    rewritten).

    ``at`` and ``limit`` matter to a *shared* store, and to a single
    writer for a request marked ``land`` (else a single writer leaves the
    request as its caller planned it).  ``at``: the key, in the
    data of the request's events, of where ``text`` lands (the column's
    length before it, in characters), which the store sets from the row it
    updates, under that row's lock in the commit's transaction, so another
    daemon's appends in between count.  ``limit``: the column may not grow
    past that many characters (else the request fails with
    :class:`StoreConflict` on the column, ``current`` its length).
    ``expect``: the text lands only where the column is exactly that many
    characters long (an append that names its offset, as a streaming client
    does so that a chunk sent twice, or after a chunk that did not land, is
    refused rather than written twice or out of order); else the request
    fails with :class:`StoreConflict`, ``expected`` that int and
    ``current`` the column's length.  A single writer checks it only where
    it lands the request (``WriteRequest.land``): otherwise its caller
    planned the append at that offset already.  All three hold for a
    request that is that one update (no precondition, no history)."""

    text: str
    at: str | None = None
    limit: int | None = None
    expect: int | None = None


@attrs.frozen
class Compact:
    """A mutation value (in an ``update``) for a column kept in parts (see
    ``PARTS`` of the schema): its parts folded into the column, one rewrite
    of the row, so that reads find the text whole (a streamed message when
    it is finished).  Nothing to fold: the column is left as it is."""


Op = Literal["insert", "update", "delete", "upsert"]


@attrs.frozen
class Mutation:
    """One row change.  ``key`` holds exactly the table's primary key columns,
    ``values`` the other columns.  ``update`` and ``delete`` of a missing row
    fail the request with :class:`StoreNotFound`; ``upsert`` inserts or
    updates ``values`` in place."""

    op: Op
    table: str
    key: Mapping[str, Any]
    values: Mapping[str, Any] = attrs.field(factory=dict)


def _check_merge_count(instance: object, attribute: object, value: int) -> None:
    if value < 1:
        raise ValueError(f"merge_count must be at least 1, got {value}")


@attrs.frozen
class EventDraft:
    """An event to append to ``room``'s log.  ``merge_count`` > 1 means it
    stands for that many consecutive events (merged stream chunks): it takes
    that many seqs, ``seq`` .. ``last_seq``."""

    room: str
    event: str
    data: Any
    ts: int
    user_id: str | None = None
    origin: str | None = None
    temp_id: str | None = None
    merge_count: int = attrs.field(default=1, validator=_check_merge_count)

    def stored(self, epoch: str, seq: int) -> StoredEvent:
        """This event as the log holds it from ``seq`` (to ``seq +
        merge_count - 1``) in ``epoch``."""
        return StoredEvent(
            room=self.room,
            epoch=epoch,
            seq=seq,
            last_seq=seq + self.merge_count - 1 if self.merge_count > 1 else None,
            event=self.event,
            data=self.data,
            ts=self.ts,
            user_id=self.user_id,
            origin=self.origin,
            temp_id=self.temp_id,
        )


@attrs.frozen
class History:
    """A value that a per-field merge overwrote (or that lost), kept in
    ``field_history``: ``hlc`` and ``writer`` stamp the value, the
    ``overwritten_by_*`` fields the value that won."""

    entity: str
    entity_id: str
    field: str
    value: Any
    hlc: str
    writer: str
    ts: int
    overwritten_by_hlc: str | None = None
    overwritten_by_writer: str | None = None


@attrs.frozen
class Expect:
    """A precondition checked inside the transaction before the request's
    mutations: ``table`` row ``key`` must exist and its ``column`` must equal
    ``expected`` (compared in Python after loading, so JSON values compare by
    value; JSON arrays load as lists).  Otherwise the request fails with
    :class:`StoreConflict` carrying the current value (or
    :class:`StoreNotFound`)."""

    table: str
    key: Mapping[str, Any]
    column: str
    expected: Any


def _mutations(items: Iterable[Mutation]) -> tuple[Mutation, ...]:
    return tuple(items)


def _drafts(items: Iterable[EventDraft]) -> tuple[EventDraft, ...]:
    return tuple(items)


def _history(items: Iterable[History]) -> tuple[History, ...]:
    return tuple(items)


def _expects(items: Iterable[Expect]) -> tuple[Expect, ...]:
    return tuple(items)


@attrs.frozen
class Once:
    """A request's idempotency key: the request is written only if
    ``user_id``'s ``key`` is not taken, and then takes it, in the same
    transaction, with what a write sent again under it is answered
    (``call``: "service.method id"; ``digest``: of its data; ``answer``:
    JSON).  A taken key fails the request with
    :class:`~agor_actors.store.StoreRepeated` (the earlier write's call,
    digest and answer) before anything of it is written."""

    user_id: str
    key: str
    call: str
    digest: str
    answer: Any
    ts: int


@attrs.frozen
class WriteRequest:
    """What one caller wants written atomically: preconditions, then
    mutations, then history rows, then events (seqs assigned in order);
    first of all, with ``once``, its idempotency key."""

    mutations: tuple[Mutation, ...] = attrs.field(default=(), converter=_mutations)
    events: tuple[EventDraft, ...] = attrs.field(default=(), converter=_drafts)
    history: tuple[History, ...] = attrs.field(default=(), converter=_history)
    expect: tuple[Expect, ...] = attrs.field(default=(), converter=_expects)
    land: bool = False
    """A single writer too lands this request's :class:`Append` (with
    ``at``) where the row ends now, as a shared store always does: its
    caller planned it on a length that a commit of unknown outcome may
    have made wrong (see the store writer)."""
    once: Once | None = None


@attrs.frozen
class StoredEvent:
    """An event as logged: ``seq`` in ``room`` (of ``epoch``); ``last_seq``
    is the last seq a merged event covers, None for a plain one."""

    room: str
    epoch: str
    seq: int
    last_seq: int | None
    event: str
    data: Any
    ts: int
    user_id: str | None
    origin: str | None
    temp_id: str | None

    @property
    def end_seq(self) -> int:
        """The last seq this event covers."""
        return self.seq if self.last_seq is None else self.last_seq


@attrs.frozen
class WriteResult:
    """A committed request: its events with their seqs, in request order."""

    events: tuple[StoredEvent, ...]


@attrs.frozen
class EventPage:
    """Events newest first; pass ``next_before_seq`` as ``before_seq`` for the
    next (older) page; None when there is none."""

    items: list[StoredEvent]
    next_before_seq: int | None


# --------------------------------------------------------------------------- internals


@attrs.define
class _Head:
    epoch: str
    base: int  # head_seq as committed before this group (0: no rooms row yet)
    head: int  # head_seq after the allocations so far


class _GroupFailed(Exception):
    """The transaction is lost: every request of the group gets ``error``."""

    def __init__(self, error: StoreError) -> None:
        super().__init__(error)
        self.error = error


class _RetryIsolated(Exception):
    """The group's combined event insert or a run of plain updates failed
    (or missed a row): redo the group with each request, its events
    included, inside its own savepoint, to find whose it was."""


_SHAPES_MAX: Final = 64


#: What the statement of a plain write depends on: the op, the table, the
#: key columns, and each value column with whether it appends (an insert's
#: values include the columns it fills with their Python-side defaults).
_Shape = tuple[Op, str, tuple[str, ...], tuple[tuple[str, bool], ...]]


def _upsert_insert_for(dialect: sa.Dialect) -> Callable[[sa.Table], Any]:
    """The dialect's INSERT that takes ``on_conflict_do_update``."""
    return pg_dialect.insert if dialect.name == "postgresql" else sqlite_dialect.insert


def _head_statements(dialect: sa.Dialect) -> tuple[Prepared, Prepared, Prepared]:
    """The commit path's fixed statements, compiled for ``dialect``: the
    events insert (``payload`` bound as the JSON text the event's check
    already made), a room's head, and the heads' upsert, which moves a
    room's head only from what this store last committed (``base``, and its
    epoch), so another writer's move shows as a row not written."""
    insert_events = sa.insert(s.events).values(
        {c.name: sa.bindparam(c.name, type_=c.type) for c in s.events.c}
    )
    r = s.rooms.c
    select_head = sa.select(r.epoch, r.head_seq).where(r.room == sa.bindparam("room"))
    upsert = _upsert_insert_for(dialect)(s.rooms).values(
        room=sa.bindparam("room", type_=r.room.type),
        epoch=sa.bindparam("epoch", type_=r.epoch.type),
        head_seq=sa.bindparam("head", type_=r.head_seq.type),
    )
    move_heads = upsert.on_conflict_do_update(
        index_elements=[r.room],
        set_={"head_seq": upsert.excluded.head_seq},
        where=sa.and_(
            r.epoch == upsert.excluded.epoch,
            r.head_seq == sa.bindparam("base", type_=r.head_seq.type),
        ),
    )
    return (
        Prepared(insert_events, dialect, raw={"payload"}),
        Prepared(select_head, dialect),
        Prepared(move_heads, dialect),
    )


def _key_statements(dialect: sa.Dialect) -> tuple[Prepared, Prepared]:
    """An idempotency key's claim (a row returned: taken now) and the read
    of the write that took it, compiled for ``dialect``."""
    k = s.idempotency_keys.c
    insert = _upsert_insert_for(dialect)(s.idempotency_keys).values(
        {c.name: sa.bindparam(c.name, type_=c.type) for c in s.idempotency_keys.c}
    )
    claim = insert.on_conflict_do_nothing(index_elements=[k.user_id, k.key]).returning(
        k.user_id  # a row if taken now (a rowcount is not reliable here)
    )
    taken_by = sa.select(k.call, k.digest, k.answer).where(
        k.user_id == sa.bindparam("user_id", type_=k.user_id.type),
        k.key == sa.bindparam("key", type_=k.key.type),
    )
    return Prepared(claim, dialect), Prepared(taken_by, dialect)


class _Compiled:
    """The statements a store compiles, kept per engine (:data:`_COMPILED`):
    a store opened again on the same engine (the simulator opens one per
    run on one engine per process) compiles none of them again.  A
    statement depends only on the engine's dialect.  The caches of write
    shapes (plain writes, landings, preconditions) hold at most
    :data:`_SHAPES_MAX` entries each, past which a statement is compiled for
    its one use; the others are bounded by the schema (one per table, or per
    table and key)."""

    __slots__ = (
        "checks",
        "claim_key",
        "gets",
        "insert_events",
        "key_taken_by",
        "landing",
        "move_heads",
        "parts",
        "parts_reads",
        "plain",
        "select_head",
        "select_members",
    )

    def __init__(self, dialect: sa.Dialect) -> None:
        self.plain: dict[_Shape, Prepared] = {}
        self.landing: dict[tuple[_Shape, str], Prepared] = {}
        self.parts: dict[str, Prepared] = {}
        self.parts_reads: dict[str, Prepared] = {}
        self.gets: dict[tuple[str, tuple[str, ...]], Prepared] = {}
        self.checks: dict[tuple[str, str, tuple[str, ...]], Prepared] = {}
        self.insert_events, self.select_head, self.move_heads = _head_statements(dialect)
        self.claim_key, self.key_taken_by = _key_statements(dialect)
        m = s.board_members
        self.select_members = Prepared(
            sa.select(m)
            .where(m.c.board_id == sa.bindparam("board_id", type_=m.c.board_id.type))
            .order_by(m.c.user_id),
            dialect,
        )


_COMPILED: weakref.WeakKeyDictionary[sa.Engine, _Compiled] = weakref.WeakKeyDictionary()
_Landed = tuple[str, str, tuple[Any, ...]]
"""Where a landing appends: (table, column, the row's key values)."""
_Landing = tuple[_Shape, dict[str, Any], str, Append]
"""A request that is one update appending at a place the store sets:
``(shape, parameters, column, append)`` (see :meth:`SqlStore._landing`)."""


@attrs.define
class _Run:
    """Consecutive plain writes of one shape: one ``executemany`` (and one
    for the parts they append, each ``(value parameter, key parameter,
    insert)``)."""

    shape: _Shape
    statement: Prepared
    parts: tuple[tuple[str, str, Prepared], ...] = ()
    rows: list[dict[str, Any]] = attrs.field(factory=list)


@functools.cache
def _parted(table: sa.Table) -> tuple[str, ...]:
    """The columns of ``table`` kept in parts (see ``PARTS``)."""
    return tuple(column for (name, column) in s.PARTS if name == table.name)


def _owner_key(table: sa.Table) -> str:
    """The one key column of a table with parted columns."""
    (key,) = table.primary_key.columns
    return str(key.name)


def _length_of(table: sa.Table, column: str) -> sa.ColumnElement[Any]:
    """SQL: the characters of ``column`` (NULL as empty), its parts included."""
    own = sa.func.length(sa.func.coalesce(table.c[column], sa.literal_column("''", sa.Text)))
    parted = s.PARTS.get((table.name, column))
    if parted is None:
        return own
    parts, owner = parted
    total = (
        sa.select(
            sa.func.coalesce(sa.func.sum(sa.func.length(parts.c.text)), sa.literal_column("0"))
        )
        .where(parts.c[owner] == table.c[_owner_key(table)])
        .scalar_subquery()
    )
    return own + total


def _update_values(table: sa.Table, columns: Iterable[tuple[str, bool]]) -> dict[str, Any]:
    """The SET of a plain update of ``columns`` (each with whether it
    appends), parameters ``v_<name>``: a parted column's append is a part,
    not in the SET (which then sets the key to itself if nothing else)."""
    values: dict[str, Any] = {}
    for name, append in columns:
        column = table.c[name]
        if append and name in _parted(table):
            continue
        if append:
            values[name] = _appended(column, sa.bindparam(f"v_{name}", type_=sa.Text))
        else:
            values[name] = sa.bindparam(f"v_{name}", type_=column.type)
    if not values:
        key = _owner_key(table)
        values[key] = table.c[key]
    return values


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode("utf-8")


def _stored(row: sa.Row[Any]) -> StoredEvent:
    m = row._mapping
    return StoredEvent(
        room=m["room"],
        epoch=m["epoch"],
        seq=m["seq"],
        last_seq=m["last_seq"],
        event=m["event"],
        data=m["payload"],
        ts=m["ts"],
        user_id=m["user_id"],
        origin=m["origin"],
        temp_id=m["temp_id"],
    )


def _with_seq(answer: Any, stored: Sequence[StoredEvent]) -> Any:
    """A write's answer as its caller gets it: with ``_seq``, the seq of
    its first event (if it has any, and the answer is a map)."""
    if not stored or not isinstance(answer, dict):
        return answer
    return {**answer, "_seq": stored[0].seq}


def _request_error(exc: Exception) -> StoreError:
    """The error a single request gets for ``exc``; other exceptions fail the group."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, sa.exc.IntegrityError | sa.exc.DataError):
        return StoreIntegrityError(str(exc.orig))
    if isinstance(exc, sa.exc.ProgrammingError | sa.exc.NotSupportedError):
        # statement-level (e.g. a value PostgreSQL cannot cast): the savepoint isolates it
        return StoreIntegrityError(str(exc.orig))
    if isinstance(exc, sa.exc.StatementError) and not isinstance(exc, sa.exc.DBAPIError):
        # a value the driver could not bind (e.g. not JSON-serializable)
        return StoreIntegrityError(str(exc.orig) if exc.orig is not None else str(exc))
    raise exc


def _entity_table(name: object) -> sa.Table:
    if not isinstance(name, str) or name not in ENTITY_TABLES:
        raise StoreQueryError(
            f"cannot write table {name!r}; writable: {', '.join(sorted(ENTITY_TABLES))}"
        )
    return ENTITY_TABLES[name]


@functools.cache
def _pk(table: sa.Table) -> frozenset[str]:
    return frozenset(c.name for c in table.primary_key.columns)


def _check_key(table: sa.Table, key: Mapping[str, Any]) -> None:
    pk = _pk(table)
    if not (type(key) is dict or isinstance(key, Mapping)) or key.keys() != pk:
        raise StoreQueryError(
            f"key of {table.name} must have exactly the columns {sorted(pk)}, got {key!r}"
        )
    types = _value_types(table)
    for name, value in key.items():
        if value is None or type(value) is not types[name][0]:
            check_value(table.c[name], value)  # a subclass, or the error


def _key_clause(table: sa.Table, key: Mapping[str, Any]) -> list[sa.ColumnElement[bool]]:
    _check_key(table, key)
    return [table.c[name] == value for name, value in key.items()]


_SAVEPOINT: Final = "agor_request"


@contextmanager
def _raw_cursor(conn: sa.Connection) -> Iterator[DBAPICursor]:
    dbapi_connection = conn.connection.dbapi_connection
    if dbapi_connection is None:  # pragma: no cover - only after invalidation
        raise StoreUnavailable("the database connection was invalidated")
    cursor = dbapi_connection.cursor()
    try:
        yield cursor
    finally:
        cursor.close()


@contextmanager
def _savepoint(cursor: DBAPICursor) -> Iterator[None]:
    """One request's savepoint, on the DB-API cursor of the group's
    connection rather than through ``Connection.begin_nested()``: the same
    statements, without SQLAlchemy compiling and dispatching them per request
    (about 40% of the cost of a group commit of single-row requests)."""
    _raw(cursor, f"SAVEPOINT {_SAVEPOINT}")
    try:
        yield
    except BaseException as exc:
        # If the database already abandoned the whole transaction (SQLite
        # does on a full disk or an I/O error), this fails: the group fails.
        _raw(cursor, f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}", cause=exc)
        _raw(cursor, f"RELEASE SAVEPOINT {_SAVEPOINT}", cause=exc)
        raise
    _raw(cursor, f"RELEASE SAVEPOINT {_SAVEPOINT}")


def _raw(cursor: DBAPICursor, statement: str, cause: BaseException | None = None) -> None:
    try:
        cursor.execute(statement)
    except Exception as exc:
        message = f"the transaction was lost ({exc})"
        if cause is not None:
            message += f" after: {getattr(cause, 'orig', None) or cause}"
        raise _GroupFailed(unavailable(message, cause, exc)) from exc


@functools.cache
def _python_defaults(table: sa.Table) -> dict[str, Callable[[], Any]] | None:
    """The columns of ``table`` that SQLAlchemy fills on insert from a
    Python-side default, each with a function making the value; None if a
    default is of a kind only SQLAlchemy's execution can make."""
    out: dict[str, Callable[[], Any]] = {}
    for column in table.columns:
        default = column.default
        if default is None:
            continue
        if not isinstance(default, sa.ColumnDefault):  # pragma: no cover - none in the schema
            return None
        arg = default.arg
        if default.is_scalar:
            out[column.name] = functools.partial(copy.copy, arg)
        elif default.is_callable:
            out[column.name] = functools.partial(arg, None)  # wrapped to take a context
        else:  # pragma: no cover - none in the schema
            return None
    return out


@functools.cache
def _value_types(table: sa.Table) -> dict[str, tuple[type | None, bool]]:
    """Per column of ``table``: the Python type its values have (None for
    JSON, which takes anything JSON can hold) and whether it is text (so
    that it can take an :class:`Append`)."""
    return {
        c.name: (
            None if isinstance(c.type, sa.JSON) else c.type.python_type,
            isinstance(c.type, sa.String),
        )
        for c in table.columns
    }


def _check_columns(table: sa.Table, values: Mapping[str, Any], *, allow_key: bool) -> None:
    if not (type(values) is dict or isinstance(values, Mapping)):  # dict: no ABC check
        raise StoreQueryError(f"values for {table.name} must be a mapping")
    types = _value_types(table)
    pk = _pk(table)
    for name in values:
        if name not in types:
            raise StoreQueryError(f"unknown column {name!r} in {table.name}")
        if name in pk and not allow_key:
            raise StoreQueryError(f"{table.name}.{name} is part of the key; it cannot change")


def _check_values(table: sa.Table, values: Mapping[str, Any]) -> None:
    """Each value has its column's Python type (JSON columns take anything),
    so that SQLite, which would store anything, refuses what PostgreSQL would."""
    types = _value_types(table)
    for name, value in values.items():
        expected, text = types[name]
        if isinstance(value, Append):
            if not text or not isinstance(value.text, str):
                raise StoreQueryError(f"cannot append to {table.name}.{name}: not a text column")
        elif isinstance(value, Compact):
            if name not in _parted(table):
                raise StoreQueryError(f"cannot compact {table.name}.{name}: not kept in parts")
        elif expected is None:
            _check_json(value, f"{table.name}.{name}")
        elif value is not None and type(value) is not expected:
            check_value(table.c[name], value)  # a subclass, or the error


def _meta_value(conn: sa.Connection, key: str) -> str | None:
    """The ``meta`` table's value under ``key`` (None: none)."""
    value = conn.execute(sa.select(s.meta.c.value).where(s.meta.c.key == key)).scalar_one_or_none()
    return None if value is None else str(value)


def _json_loads(stored: Any) -> Any:
    """A JSON column's value as read.  SQLite's ``JSON`` columns have
    numeric affinity: a value that is a bare number (a task's ``result`` of
    ``0``) is kept as an INTEGER or a REAL, not as its text, and comes back
    as that number."""
    if type(stored) is int or type(stored) is float:
        return stored
    return orjson.loads(stored)


def _check_json(value: Any, what: str) -> str:
    """``value`` as JSON text (what the engine's ``json_serializer``
    makes of it); refuses a value that cannot be stored as JSON before any
    driver sees it (psycopg serializes inside the driver, where a failure is
    a bare ``TypeError``), and a bare integer beyond 64 bits (SQLite would
    keep it as a REAL: not the number written)."""
    if type(value) is int and value not in INT64:
        raise StoreIntegrityError(f"{what} is an integer beyond 64 bits")
    try:
        return orjson.dumps(value).decode("utf-8")
    except TypeError as exc:
        raise StoreIntegrityError(f"{what} is not JSON: {exc}") from exc


def _plain(values: Mapping[str, Any]) -> dict[str, Any]:
    """Values for an INSERT: an :class:`Append` inserts its text."""
    return {k: (v.text if isinstance(v, Append) else v) for k, v in values.items()}


def _at_key(table: sa.Table, key: Iterable[str]) -> list[sa.ColumnElement[bool]]:
    """The WHERE of a compiled statement on one row: each column of ``key``
    equal to the parameter ``k_<name>``."""
    return [table.c[name] == sa.bindparam(f"k_{name}") for name in key]


def _shape_of(
    table: sa.Table, op: Op, key: Mapping[str, Any], values: Mapping[str, Any]
) -> tuple[_Shape, dict[str, Any]] | None:
    """``(shape, parameters)`` of an ``insert``, an ``update`` or a
    ``delete`` of one row, its key and values checked already; None if the
    write needs more than one plain statement (a parted column compacted or
    set outright) or an insert has a default that is not Python's."""
    params = {f"k_{name}": value for name, value in key.items()}
    columns = []
    parted = _parted(table)
    for name, value in values.items():
        if parted and name in parted and isinstance(value, Compact):
            return None  # folded (or refused, in an insert): _mutate
        if parted and op == "update" and name in parted and not isinstance(value, Append):
            return None  # its parts go too: _mutate
        if isinstance(value, Append):
            params[f"v_{name}"] = value.text
            columns.append((name, op == "update"))
        else:
            params[f"v_{name}"] = value
            columns.append((name, False))
    if op == "insert":
        defaults = _python_defaults(table)
        if defaults is None:
            return None
        for name, make in defaults.items():
            if name not in values:
                params[f"v_{name}"] = make()
                columns.append((name, False))
    return (op, table.name, tuple(key), tuple(columns)), params


def _misplaced(
    table_name: str, key: dict[str, Any], column: str, expect: int, current: int
) -> StoreConflict:
    """An :class:`Append` with ``expect`` refused: the column is ``current``
    characters long, not ``expect``."""
    return StoreConflict(table_name, key, column, expect, current)


def _appended(column: sa.Column[Any], text: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """``column || text`` (an :class:`Append`), a NULL column counting as empty."""
    # the empty string as SQL, not a bound value: a prepared statement binds
    # only the parameters its rows carry
    return sa.func.coalesce(column, sa.literal_column("''", sa.Text)) + text


def _set_clause(table: sa.Table, values: Mapping[str, Any]) -> dict[str, Any]:
    """The SET of an update of ``values`` (a parted column's append is a
    part, written by ``_write_parts``; the key set to itself if nothing else)."""
    out: dict[str, Any] = {}
    parted = _parted(table)
    for name, value in values.items():
        if isinstance(value, Append):
            if name not in parted:
                out[name] = _appended(table.c[name], sa.literal(value.text, sa.Text))
        elif not isinstance(value, Compact):
            out[name] = value
    if not out:
        key = _owner_key(table)
        out[key] = table.c[key]
    return out


def _same(current: Any, expected: Any) -> bool:
    """Whether a loaded column value equals an expected one: JSON containers
    compare as JSON (tuples as lists), booleans never equal numbers."""
    if isinstance(expected, list | tuple | dict):
        try:
            expected = orjson.loads(orjson.dumps(expected))
        except TypeError:
            return False
    if isinstance(current, bool) or isinstance(expected, bool):
        return current is expected
    return bool(current == expected)


# --------------------------------------------------------------------------- the store


class SqlStore:
    """The store over one SQLAlchemy engine (use :func:`open_store`).

    Thread-safe: writes are serialized by a lock (there is one writer); reads
    may run in other threads on their own connections, except for an
    in-memory database, where every call takes the same lock.

    ``shared``: other stores (other daemons) write the same database; the
    heads are locked and read in each commit instead of remembered.
    """

    def __init__(
        self, engine: sa.Engine, *, new_epoch: Callable[[], str], shared: bool = False
    ) -> None:
        self._engine = engine
        self._new_epoch = new_epoch
        self._shared = shared
        self._heads: dict[str, tuple[str, int]] = {}
        """Single writer: each room's head as this store committed it.
        Shared: the heads locked for the group being committed."""
        compiled = _COMPILED.get(engine)
        if compiled is None:
            compiled = _COMPILED[engine] = _Compiled(engine.dialect)
        self._plain_statements = compiled.plain
        self._landing_statements = compiled.landing
        self._parts_statements = compiled.parts
        self._parts_reads = compiled.parts_reads
        self._get_statements = compiled.gets
        self._check_statements = compiled.checks
        self._write_lock = threading.Lock()
        self._single_connection = isinstance(engine.pool, StaticPool)
        self._writer: sa.Connection | None = None
        """A local file's writer connection, kept open between commits (a
        checkout and a check-in, with its rollback, per commit were a tenth
        of the commit path); only under ``_write_lock``."""
        self._upsert_insert = _upsert_insert_for(engine.dialect)
        self._insert_events = compiled.insert_events
        self._select_head = compiled.select_head
        self._move_heads = compiled.move_heads
        self._select_members = compiled.select_members
        self._claim_key, self._key_taken_by = compiled.claim_key, compiled.key_taken_by
        self._ensure_schema()

    @property
    def engine(self) -> sa.Engine:
        return self._engine

    @property
    def shared(self) -> bool:
        """Whether other stores write this database too (see the module)."""
        return self._shared

    @property
    def dialect(self) -> str:
        return self._engine.dialect.name

    @property
    def local(self) -> bool:
        """Whether the database is this machine's own SQLite (a commit is a
        short local append: ``Blocking.run(local=True)``), not a server
        across a network."""
        return self.dialect == "sqlite"

    @property
    def checkpoints(self) -> bool:
        """Whether :meth:`checkpoint` does anything: a local SQLite file
        (write-ahead logged), not a server nor an in-memory database."""
        return self.local and not self._single_connection

    def checkpoint(self) -> tuple[int, int] | None:
        """Copy what the write-ahead log holds back into the database file
        (SQLite's PASSIVE checkpoint: the writer is not blocked, and it
        starts the log over once all of it is copied), on a connection of
        its own, so that no commit pays for the copy and its fsync: call it
        from a worker thread.  ``(frames in the log, frames copied)``; None
        if the store does not checkpoint (see :attr:`checkpoints`)."""
        if not self.checkpoints:
            return None
        sql = "PRAGMA wal_checkpoint(PASSIVE)"
        try:
            # the driver's connection, outside any transaction (a checkpoint
            # cannot run inside one; SQLAlchemy's connection would begin one)
            raw = self._engine.raw_connection()
            try:
                cursor = raw.cursor()
                with driver_errors(self._engine.dialect, sql):
                    cursor.execute(sql)
                    row = cursor.fetchone()
                cursor.close()
            finally:
                raw.close()
        except sa.exc.SQLAlchemyError as exc:
            raise _group_error(exc) from exc
        if row is None:  # pragma: no cover - the pragma always answers a row
            raise StoreUnavailable("the checkpoint answered nothing")
        return int(row[1]), int(row[2])

    def close(self) -> None:
        """Close every pooled connection.  The store is unusable afterwards."""
        with self._write_lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        self._engine.dispose()

    def __enter__(self) -> SqlStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----------------------------------------------------------------- plumbing

    def _read_guard(self) -> AbstractContextManager[Any]:
        return self._write_lock if self._single_connection else nullcontext()

    @contextmanager
    def _reading(self) -> Iterator[sa.Connection]:
        try:
            with self._read_guard(), self._engine.connect() as conn:
                yield conn
        except sa.exc.DataError as exc:
            raise StoreQueryError(f"a value cannot be compared: {exc.orig}") from exc
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            raise unavailable(str(exc.orig), exc) from exc

    @contextmanager
    def _writing(self) -> Iterator[sa.Connection]:
        """A write transaction (under ``_write_lock``): on a local file, on
        the writer's own connection, kept open; else on one from the pool.
        (A server's connection can break between commits, which the pool's
        pre-ping finds; an in-memory database has one connection for all.)"""
        if not self.local or self._single_connection:
            with self._engine.connect().execution_options(**{_WRITE: True}) as conn, conn.begin():
                yield conn
            return
        writer = self._writer
        if writer is None or writer.closed or writer.invalidated:
            writer = self._writer = self._engine.connect().execution_options(**{_WRITE: True})
        try:
            with writer.begin():
                yield writer
        except BaseException:
            # whatever state a failed commit left, the pool's check-in
            # rolls back; the next write takes a fresh connection
            self._writer = None
            writer.close()
            raise

    @contextmanager
    def _meta_writing(self) -> Iterator[sa.Connection]:
        """A write transaction of the ``meta`` table, one daemon at a time
        (on PostgreSQL under an advisory lock: every daemon of a cluster
        may start at once)."""
        with self._write_lock, self._writing() as conn:
            if self.dialect == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK_KEY)))
            yield conn

    def _ensure_schema(self) -> None:
        with self._meta_writing() as conn:
            version: int | None = None
            if sa.inspect(conn).has_table(s.meta.name):
                raw = _meta_value(conn, "schema_version")
                if raw is not None:
                    try:
                        version = int(raw)
                    except ValueError:
                        raise StoreSchemaError(f"schema_version {raw!r} is not a number") from None
            if version is not None and version > SCHEMA_VERSION:
                raise StoreSchemaError(
                    f"the database has schema version {version}, newer than this "
                    f"agor-actors understands ({SCHEMA_VERSION}); upgrade agor-actors"
                )
            if version is not None and version < SCHEMA_VERSION:
                # in this transaction: all the steps, or none
                for step in range(version, SCHEMA_VERSION):
                    migrate = _MIGRATIONS.get(step)
                    if migrate is None:
                        raise StoreSchemaError(
                            f"the database has schema version {version}; no migration "
                            f"from {step} to {step + 1} exists"
                        )
                    migrate(conn)
                    log.info("store: schema migrated from version %d to %d", step, step + 1)
                conn.execute(
                    s.meta.update()
                    .where(s.meta.c.key == "schema_version")
                    .values(value=str(SCHEMA_VERSION))
                )
            s.metadata.create_all(conn)
            if version is None:
                conn.execute(
                    s.meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION))
                )

    def schema_version(self) -> int:
        with self._reading() as conn:
            raw = conn.execute(
                sa.select(s.meta.c.value).where(s.meta.c.key == "schema_version")
            ).scalar_one()
        return int(raw)

    # ----------------------------------------------------------------- writes

    def commit(self, requests: Sequence[WriteRequest]) -> list[WriteResult | StoreError]:
        """Commit ``requests`` in one transaction, each isolated as if in
        its own savepoint (see :meth:`_commit_group` for how plain writes
        avoid one): a request that fails gets its :class:`StoreError` and
        changes nothing, the others commit.  Events get their room's next
        seqs, gap-free.  If the transaction fails as a whole, every request
        gets the same :class:`StoreUnavailable` (or other
        :class:`StoreError`) and nothing is written.  The results are in the
        order of ``requests``."""
        if not requests:
            return []
        with self._write_lock:
            try:
                try:
                    results, heads = self._commit_group(requests, isolate_events=False)
                except _RetryIsolated:
                    mark("store.isolated_retry")
                    results, heads = self._commit_group(requests, isolate_events=True)
            except (sa.exc.SQLAlchemyError, StoreError, _GroupFailed) as exc:
                self._heads.clear()
                if isinstance(exc, _GroupFailed):
                    error = exc.error
                elif isinstance(exc, StoreError):
                    error = exc
                else:
                    error = _group_error(exc)
                return [error] * len(requests)
            if self._shared:
                self._heads.clear()
                return results
            for room, head in heads.items():
                self._remember(room, head.epoch, head.head)
            return results

    def _remember(self, room: str, epoch: str, head_seq: int) -> None:
        heads = self._heads
        if room not in heads and len(heads) >= _HEAD_CACHE_MAX:
            del heads[next(iter(heads))]
        heads[room] = (epoch, head_seq)

    def _commit_group(
        self, requests: Sequence[WriteRequest], *, isolate_events: bool
    ) -> tuple[list[WriteResult | StoreError], dict[str, _Head]]:
        """One transaction for ``requests``.  A request that is one plain
        write of a row (an insert, an update or a delete; no preconditions,
        no history: a streamed chunk, a status change, a new task) needs no
        savepoint: it is checked here, and its write joins a run of writes
        of the same shape that goes to the database as one ``executemany``
        (a run ends at a request of another kind, so rows change in request
        order).  If a run fails or misses a row, the group is redone with
        every request isolated, which finds whose it was.  Other requests
        each run in a savepoint.  The group's events go in as one
        ``executemany``, its rooms' heads as another."""
        results: list[WriteResult | StoreError] = []
        group: dict[str, _Head] = {}
        pending: list[dict[str, Any]] = []
        run: _Run | None = None
        with self._writing() as conn, _raw_cursor(conn) as cursor:
            lengths: dict[_Landed, int] = {}
            # a shared store's landings, each found once (a refused one: its error)
            landings: list[_Landing | StoreError | None] = [None] * len(requests)
            if self._shared:
                self._lock_heads(conn, requests)
                landings = [self._landing_or_error(request) for request in requests]
            elif any(request.land for request in requests):
                landings = [
                    self._landing_or_error(request) if request.land else None
                    for request in requests
                ]
            if not isolate_events and any(found is not None for found in landings):
                lengths = self._lock_lengths(conn, landings)
            for request, found in zip(requests, landings, strict=True):
                # rooms this request moved: the head before it, None if it
                # brought the room into the group (undone if it fails)
                touched: dict[str, int | None] = {}
                rows: list[dict[str, Any]] = []
                try:
                    if isinstance(found, StoreError):
                        raise found
                    landing = found
                    plain = (
                        None
                        if isolate_events or landing or request.once
                        else self._plain_write(request)
                    )
                    if request.once is not None:
                        # its key first, then the rest, all in one savepoint
                        if run is not None:
                            self._flush_run(cursor, run)
                            run = None
                        with _savepoint(cursor):
                            if landing is not None:  # where it lands, the answer's seq after
                                self._claim(cursor, request.once)
                                drafts = self._land(cursor, request, *landing, isolated=True)
                                stored = self._allocate(cursor, drafts, group, touched, rows)
                                self._answered_at(conn, request.once, stored)
                            else:  # its events' seqs first: its answer names the first
                                stored = self._allocate(
                                    cursor, request.events, group, touched, rows
                                )
                                self._claim(cursor, request.once, stored)
                                self._apply(conn, cursor, request)
                            if isolate_events and rows:
                                self._insert_events.executemany(cursor, rows)
                    elif landing is not None and not isolate_events and len(landing[0][2]) == 1:
                        # planned on the lengths locked for the group, then
                        # written as a plain update (in a run, as alone)
                        landed, at, drafts = self._planned(request, *landing, lengths)
                        stored = self._allocate(cursor, drafts, group, touched, rows)
                        lengths[landed] = at + len(landing[3].text)
                        run = self._join_run(cursor, run, landing[0], landing[1])
                    elif landing is not None:
                        if run is not None:
                            self._flush_run(cursor, run)
                            run = None
                        with _savepoint(cursor):
                            drafts = self._land(cursor, request, *landing, isolated=True)
                            stored = self._allocate(cursor, drafts, group, touched, rows)
                            if rows:
                                self._insert_events.executemany(cursor, rows)
                    elif plain is not None:
                        stored = self._allocate(cursor, request.events, group, touched, rows)
                        run = self._join_run(cursor, run, *plain)
                    elif request.expect or request.mutations or request.history or isolate_events:
                        if run is not None:
                            self._flush_run(cursor, run)
                            run = None
                        with _savepoint(cursor):
                            self._apply(conn, cursor, request)
                            stored = self._allocate(cursor, request.events, group, touched, rows)
                            if isolate_events and rows:
                                self._insert_events.executemany(cursor, rows)
                    else:
                        stored = self._allocate(cursor, request.events, group, touched, rows)
                except (StoreError, sa.exc.StatementError) as exc:
                    results.append(_request_error(exc))
                    mark("store.request_failed")
                    for room, before in touched.items():
                        if before is None:
                            del group[room]
                        else:
                            group[room].head = before
                        # Forget what this store believed about the room: if
                        # the failure was a seq already taken (another
                        # writer), the next write re-reads the head.  (A
                        # shared store's locked head is still right.)
                        if not self._shared:
                            self._heads.pop(room, None)
                    continue
                results.append(WriteResult(tuple(stored)))
                if not isolate_events:
                    pending += rows
            if run is not None:
                self._flush_run(cursor, run)
            if pending:
                try:
                    self._insert_events.executemany(cursor, pending)
                except sa.exc.StatementError as exc:
                    raise _RetryIsolated() from exc
            self._write_heads(cursor, group)
        return results, group

    def _join_run(
        self, cursor: DBAPICursor, run: _Run | None, shape: _Shape, params: dict[str, Any]
    ) -> _Run:
        """``params`` added to the run of plain writes of ``shape`` (the run
        before, of another shape, written first)."""
        if run is not None and run.shape != shape:
            self._flush_run(cursor, run)
            run = None
        if run is None:
            run = _Run(shape, self._plain_statement(shape), self._run_parts(shape))
        run.rows.append(params)
        return run

    def _run_parts(self, shape: _Shape) -> tuple[tuple[str, str, Prepared], ...]:
        """The parts a plain write of ``shape`` appends: ``(value
        parameter, key parameter, insert)`` per parted column it appends to."""
        op, table_name, key, columns = shape
        if op != "update":
            return ()
        out = []
        for name, append in columns:
            parted = s.PARTS.get((table_name, name)) if append else None
            if parted is not None:
                (key_name,) = key
                out.append((f"v_{name}", f"k_{key_name}", self._parts_insert(*parted)))
        return tuple(out)

    def _parts_insert(self, parts: sa.Table, owner: str) -> Prepared:
        """The insert of one part (parameters ``owner`` and ``text``)."""
        stmt = self._parts_statements.get(parts.name)
        if stmt is None:
            insert = sa.insert(parts).values(
                {
                    owner: sa.bindparam("owner", type_=parts.c[owner].type),
                    "text": sa.bindparam("text", type_=parts.c.text.type),
                }
            )
            stmt = self._parts_statements[parts.name] = Prepared(insert, self._engine.dialect)
        return stmt

    def _landing_or_error(self, request: WriteRequest) -> _Landing | StoreError | None:
        try:
            return self._landing(request)
        except StoreError as exc:
            return exc  # refused: the commit loop answers it

    def _lock_lengths(
        self, conn: sa.Connection, landings: Sequence[_Landing | StoreError | None]
    ) -> dict[_Landed, int]:
        """Shared store, a group not isolated: the length now of every
        column the group's landings append to (see :class:`Append`), read
        with the rows locked (in key order, after the rooms' heads) until
        the transaction ends, so the landings are planned here in memory
        and written as plain runs: one statement per group and table, not
        one round trip per chunk.  A row missing is absent."""
        wanted: dict[tuple[str, str, str], set[Any]] = {}
        for landing in landings:
            if landing is None or isinstance(landing, StoreError):
                continue
            shape, params, column, _ = landing
            _, table_name, key, _ = shape
            if len(key) != 1:
                continue  # (every streamed table has one key column)
            wanted.setdefault((table_name, key[0], column), set()).add(params[f"k_{key[0]}"])
        lengths: dict[_Landed, int] = {}
        for (table_name, key_name, column), keys in wanted.items():
            table = ENTITY_TABLES[table_name]
            length = _length_of(table, column)
            found = conn.execute(
                sa.select(table.c[key_name], length)
                .where(table.c[key_name].in_(sorted(keys)))
                .order_by(table.c[key_name])
                .with_for_update()
            ).all()
            for key_value, current in found:
                lengths[(table_name, column, (key_value,))] = int(current)
        return lengths

    def _planned(
        self,
        request: WriteRequest,
        shape: _Shape,
        params: dict[str, Any],
        column: str,
        append: Append,
        lengths: Mapping[_Landed, int],
    ) -> tuple[_Landed, int, tuple[EventDraft, ...]]:
        """A landing planned on the group's locked lengths: ``(which,
        offset, events)``, the events' ``append.at`` set to where the text
        lands.  Raises as :meth:`_land` would: no row, or past the limit."""
        _, table_name, key, _ = shape
        landed: _Landed = (table_name, column, tuple(params[f"k_{name}"] for name in key))
        current = lengths.get(landed)
        mutation = request.mutations[0]
        if current is None:
            raise StoreNotFound(table_name, dict(mutation.key))
        if append.expect is not None and current != append.expect:
            raise _misplaced(table_name, dict(mutation.key), column, append.expect, current)
        if append.limit is not None and current + len(append.text) > append.limit:
            raise StoreConflict(
                table_name,
                dict(mutation.key),
                column,
                f"at most {append.limit} characters",
                current + len(append.text),
            )
        at = append.at
        assert at is not None  # _landing takes only such an Append
        drafts = tuple(
            attrs.evolve(draft, data={**draft.data, at: current})
            if isinstance(draft.data, dict) and at in draft.data
            else draft
            for draft in request.events
        )
        return landed, current, drafts

    def _plain_write(self, request: WriteRequest) -> tuple[_Shape, dict[str, Any]] | None:
        """``(shape, parameters)`` if ``request`` is one plain write of a
        row (an ``insert``, an ``update`` with values or a ``delete``, and
        nothing but events besides), checked; None if it is anything else.
        Raises the request's error if the write is not valid."""
        if request.expect or request.history or len(request.mutations) != 1:
            return None
        mutation = request.mutations[0]
        op = mutation.op
        values = mutation.values
        if op == "update":
            if not values:
                return None
        elif op == "delete":
            if values:
                return None  # refused by _mutate, with its message
        elif op != "insert":
            return None
        table = _entity_table(mutation.table)
        key = mutation.key
        _check_key(table, key)
        _check_columns(table, values, allow_key=False)
        _check_values(table, values)
        return _shape_of(table, op, key, values)

    def _landing(self, request: WriteRequest) -> _Landing | None:
        """Shared store: ``(shape, parameters, column, append)`` if
        ``request`` is one plain update whose one :class:`Append` with
        ``at`` lands where the row says (see :class:`Append`); else None."""
        mutations = request.mutations
        if len(mutations) != 1 or mutations[0].op != "update":
            return None
        stamped = [
            (name, value)
            for name, value in mutations[0].values.items()
            if isinstance(value, Append) and value.at is not None
        ]
        if len(stamped) != 1:
            return None
        plain = self._plain_write(request)
        if plain is None:
            return None
        return (*plain, *stamped[0])

    def _land(
        self,
        cursor: DBAPICursor,
        request: WriteRequest,
        shape: _Shape,
        params: dict[str, Any],
        column: str,
        append: Append,
        *,
        isolated: bool,
    ) -> tuple[EventDraft, ...]:
        """Run ``request``'s update of one row, appending ``append`` where
        the row's column ends now (the update locks the row until the
        transaction ends), and answer its events with that offset under
        ``append.at``.  Not isolated: a driver error redoes the group with
        each request isolated (nothing else can have changed the row)."""
        statement = self._landing_statement(shape, column)
        room = _NO_LIMIT if append.limit is None else append.limit - len(append.text)
        floor = 0
        if append.expect is not None:  # the column's length exactly that
            floor, room = append.expect, min(room, append.expect)
        try:
            found = statement.execute(cursor, {**params, "room": room, "floor": floor}).fetchone()
        except sa.exc.StatementError as exc:
            if isolated:
                raise
            raise _RetryIsolated() from exc
        if found is None:
            mutation = request.mutations[0]
            current = self._length(cursor, shape, params, column)
            if current is None:
                raise StoreNotFound(shape[1], dict(mutation.key))
            if append.expect is not None and current != append.expect:
                raise _misplaced(shape[1], dict(mutation.key), column, append.expect, current)
            raise StoreConflict(
                shape[1],
                dict(mutation.key),
                column,
                f"at most {append.limit} characters",
                current + len(append.text),
            )
        parted = s.PARTS.get((shape[1], column))
        if parted is None:
            offset = int(found[0]) - len(append.text)
        else:
            # the update left the column and its parts alone: its length
            # before this append, which goes in as the last part
            offset = int(found[0])
            (key_name,) = shape[2]
            self._parts_insert(parted[0], parted[1]).execute(
                cursor, {"owner": params[f"k_{key_name}"], "text": append.text}
            )
        key = append.at
        assert key is not None  # _landing takes only such an Append
        return tuple(
            attrs.evolve(draft, data={**draft.data, key: offset})
            if isinstance(draft.data, dict) and key in draft.data
            else draft
            for draft in request.events
        )

    def _length(
        self, cursor: DBAPICursor, shape: _Shape, params: Mapping[str, Any], column: str
    ) -> int | None:
        """A refused landing: the row's ``column`` length now, None if no
        row (a rare path: compiled here each time)."""
        _, table_name, key, _ = shape
        table = ENTITY_TABLES[table_name]
        select = sa.select(_length_of(table, column).label("length")).where(*_at_key(table, key))
        found = Prepared(select, self._engine.dialect).one_or_none(
            cursor, {f"k_{name}": params[f"k_{name}"] for name in key}
        )
        return None if found is None else int(found["length"])

    def _landing_statement(self, shape: _Shape, column: str) -> Prepared:
        """The plain update of ``shape``, only where the row's ``column``
        has at least ``floor`` and at most ``room`` characters, returning
        its length after."""
        stmt = self._landing_statements.get((shape, column))
        if stmt is not None:
            return stmt
        _, table_name, key, columns = shape
        table = ENTITY_TABLES[table_name]
        where = _at_key(table, key)
        length = _length_of(table, column)
        where.append(length <= sa.bindparam("room", type_=sa.BigInteger))
        where.append(length >= sa.bindparam("floor", type_=sa.BigInteger))
        statement = (
            sa.update(table).where(*where).values(_update_values(table, columns)).returning(length)
        )
        stmt = Prepared(statement, self._engine.dialect)
        if len(self._landing_statements) < _SHAPES_MAX:
            self._landing_statements[(shape, column)] = stmt
        return stmt

    def _plain_statement(self, shape: _Shape) -> Prepared:
        stmt = self._plain_statements.get(shape)
        if stmt is not None:
            return stmt
        op, table_name, key, columns = shape
        table = ENTITY_TABLES[table_name]
        statement: sa.ClauseElement
        if op == "insert":
            statement = sa.insert(table).values(
                {
                    **{name: sa.bindparam(f"k_{name}", type_=table.c[name].type) for name in key},
                    **{
                        name: sa.bindparam(f"v_{name}", type_=table.c[name].type)
                        for name, _ in columns
                    },
                }
            )
        else:
            where = _at_key(table, key)
            if op == "delete":
                statement = sa.delete(table).where(*where)
            else:
                statement = sa.update(table).where(*where).values(_update_values(table, columns))
        stmt = Prepared(statement, self._engine.dialect)
        if len(self._plain_statements) < _SHAPES_MAX:
            self._plain_statements[shape] = stmt
        return stmt

    @staticmethod
    def _flush_run(cursor: DBAPICursor, run: _Run) -> None:
        """Run the writes; a failure or a missing row redoes the group
        with each request isolated (the transaction is rolled back first)."""
        try:
            changed = run.statement.executemany(cursor, run.rows)
        except sa.exc.StatementError as exc:
            raise _RetryIsolated() from exc
        if changed != len(run.rows):
            raise _RetryIsolated()
        for value, key, insert in run.parts:
            try:
                insert.executemany(cursor, [{"owner": r[key], "text": r[value]} for r in run.rows])
            except sa.exc.StatementError as exc:
                raise _RetryIsolated() from exc

    def _apply(self, conn: sa.Connection, cursor: DBAPICursor, request: WriteRequest) -> None:
        """``request`` in its savepoint: its preconditions, then its
        mutations (a plain insert, update or delete by a statement compiled
        once, on the group's cursor; anything else through SQLAlchemy)."""
        for expect in request.expect:
            self._check(conn, cursor, expect)
        for mutation in request.mutations:
            self._mutate(conn, cursor, mutation)
        if request.history:
            for h in request.history:
                _check_json(h.value, f"history of {h.entity}.{h.field}")
            conn.execute(
                s.field_history.insert(),
                [attrs.asdict(h, recurse=False) for h in request.history],
            )

    def _claim(self, cursor: DBAPICursor, once: Once, stored: Sequence[StoredEvent] = ()) -> None:
        """Take ``once``'s key (its answer with the seq of the first of the
        ``stored`` events, as its caller answers it), or raise
        :class:`StoreRepeated` with the write that took it.  On PostgreSQL a
        concurrent transaction taking the same key makes this wait for its
        outcome (then it is taken, or free again)."""
        row = {
            "user_id": once.user_id,
            "key": once.key,
            "call": once.call,
            "digest": once.digest,
            "answer": _with_seq(once.answer, stored),
            "created_at": once.ts,
        }
        if self._claim_key.execute(cursor, row).fetchone() is not None:
            return
        taken = self._key_taken_by.one_or_none(cursor, {"user_id": once.user_id, "key": once.key})
        if taken is None:  # pragma: no cover - the key's row went between the two
            raise StoreUnavailable("an idempotency key was dropped while it was claimed")
        mark("store.repeated")
        raise StoreRepeated(once.user_id, once.key, taken["call"], taken["digest"], taken["answer"])

    @staticmethod
    def _answered_at(conn: sa.Connection, once: Once, stored: Sequence[StoredEvent]) -> None:
        """A landed write's answer gains the seq of its first event."""
        answer = _with_seq(once.answer, stored)
        if answer is once.answer:
            return
        k = s.idempotency_keys.c
        conn.execute(
            s.idempotency_keys.update()
            .where(k.user_id == once.user_id, k.key == once.key)
            .values(answer=answer)
        )

    def forget_keys(self, before_ms: int, limit: int = 10_000) -> int:
        """Drop the idempotency keys taken before ``before_ms``, about
        ``limit`` at most (the oldest first; all those of the last time
        dropped); returns how many were dropped."""
        return self._forget_before(s.idempotency_keys.c.created_at, before_ms, limit)

    def forget_refresh_tokens(self, before_ms: int, limit: int = 10_000) -> int:
        """Drop the refresh tokens that expired before ``before_ms`` (used,
        revoked or not: an expired one is refused whatever it was), about
        ``limit`` at most; returns how many were dropped."""
        return self._forget_before(s.refresh_tokens.c.expires_at, before_ms, limit)

    def put_sign_in_code(
        self,
        digest: str,
        user_id: str,
        next_path: str,
        *,
        now_ms: int,
        expires_ms: int,
        pending_max: int,
        user_pending_max: int,
    ) -> str | None:
        """Keep a one-time sign-in code's digest for ``user_id`` until
        ``expires_ms``.  Expired codes are dropped first.  Nothing is kept
        while ``pending_max`` codes are pending, or ``user_pending_max`` of
        ``user_id``'s: then the answer says which ('' or ' for this user';
        None: kept)."""
        c = s.sign_in_codes
        with self._write_lock, self._writing() as conn:
            conn.execute(c.delete().where(c.c.expires_at <= now_ms))
            count = sa.select(sa.func.count()).select_from(c)
            if conn.execute(count).scalar_one() >= pending_max:
                return ""
            if conn.execute(count.where(c.c.user_id == user_id)).scalar_one() >= user_pending_max:
                return " for this user"
            conn.execute(
                c.insert().values(
                    digest=digest, user_id=user_id, next_path=next_path, expires_at=expires_ms
                )
            )
            return None

    def take_sign_in_code(self, digest: str, *, now_ms: int) -> tuple[str, str] | None:
        """``(user_id, next_path)`` of the code whose digest this is, once:
        it is dropped; None if unknown, taken already or expired."""
        c = s.sign_in_codes
        with self._write_lock, self._writing() as conn:
            row = conn.execute(
                sa.select(c.c.user_id, c.c.next_path, c.c.expires_at).where(c.c.digest == digest)
            ).one_or_none()
            if row is None:
                return None
            # another daemon taking it at the same time deletes nothing
            if conn.execute(c.delete().where(c.c.digest == digest)).rowcount != 1:
                return None
        return None if row.expires_at <= now_ms else (str(row.user_id), str(row.next_path))

    def open_web_session(self, digest: str, user_id: str, *, now_ms: int, expires_ms: int) -> None:
        """Keep a browser sign-in (its id's digest) of ``user_id`` until
        ``expires_ms``."""
        w = s.web_sessions
        with self._write_lock, self._writing() as conn:
            conn.execute(
                w.insert().values(
                    digest=digest, user_id=user_id, created_at=now_ms, expires_at=expires_ms
                )
            )

    def web_session_user(self, digest: str, *, now_ms: int) -> str | None:
        """The user of the browser sign-in whose id has this digest; None if
        there is none (closed) or it expired."""
        w = s.web_sessions
        with self._reading() as conn:
            row = conn.execute(
                sa.select(w.c.user_id).where(w.c.digest == digest, w.c.expires_at > now_ms)
            ).one_or_none()
        return None if row is None else str(row.user_id)

    def open_web_sessions(self, digests: Collection[str], *, now_ms: int) -> set[str]:
        """Those of ``digests`` whose browser sign-ins are open (neither
        closed nor expired)."""
        w = s.web_sessions
        found = set[str]()
        with self._reading() as conn:
            for part in _in_parts(digests):
                found.update(
                    str(digest)
                    for (digest,) in conn.execute(
                        sa.select(w.c.digest).where(w.c.digest.in_(part), w.c.expires_at > now_ms)
                    )
                )
        return found

    def close_web_sessions(self, *, digest: str | None = None, user_id: str | None = None) -> int:
        """Close the browser sign-in whose id has ``digest``, or every one of
        ``user_id``; returns how many."""
        w = s.web_sessions
        where = w.c.digest == digest if digest is not None else w.c.user_id == user_id
        with self._write_lock, self._writing() as conn:
            return int(conn.execute(w.delete().where(where)).rowcount)

    def forget_web_sessions(self, before_ms: int, limit: int = 10_000) -> int:
        """Drop the browser sign-ins that expired before ``before_ms``."""
        return self._forget_before(s.web_sessions.c.expires_at, before_ms, limit)

    def _forget_before(self, column: sa.Column[Any], before_ms: int, limit: int) -> int:
        """Delete the rows of ``column``'s table whose ``column`` is before
        ``before_ms``, the oldest first, about ``limit`` (all those of the
        last value dropped)."""
        table = column.table
        with self._write_lock, self._writing() as conn:
            last = conn.execute(
                sa.select(column).where(column < before_ms).order_by(column).offset(limit).limit(1)
            ).scalar_one_or_none()
            old = column < before_ms if last is None else column <= last
            return int(conn.execute(table.delete().where(old)).rowcount)

    def check_key(self, user_id: str, key: str) -> tuple[str, str, Any] | None:
        """``(call, digest, answer)`` of the write that took ``user_id``'s
        idempotency ``key``; None if none did (or it was forgotten)."""
        k = s.idempotency_keys.c
        with self._reading() as conn:
            row = conn.execute(
                sa.select(k.call, k.digest, k.answer).where(k.user_id == user_id, k.key == key)
            ).one_or_none()
        return None if row is None else (row.call, row.digest, row.answer)

    def _check(self, conn: sa.Connection, cursor: DBAPICursor, expect: Expect) -> None:
        table = _entity_table(expect.table)
        _check_key(table, expect.key)
        if expect.column not in table.c:
            raise StoreQueryError(f"unknown column {expect.column!r} in {table.name}")
        row = self._check_statement(table, expect.column, tuple(expect.key)).one_or_none(
            cursor, {f"k_{name}": value for name, value in expect.key.items()}
        )
        if row is None:
            raise StoreNotFound(table.name, dict(expect.key))
        current = row[expect.column]
        if expect.column in _parted(table):
            found = {expect.column: current, **expect.key}
            self._fold_parts(conn, table, [found])
            current = found[expect.column]
        if not _same(current, expect.expected):
            raise StoreConflict(
                table.name, dict(expect.key), expect.column, expect.expected, current
            )

    def _check_statement(self, table: sa.Table, column: str, key: tuple[str, ...]) -> Prepared:
        """A precondition's read: ``column`` of the row at ``key``, locked
        for the transaction (``FOR UPDATE``: a no-op on SQLite, which
        writes one transaction at a time)."""
        shape = (table.name, column, key)
        stmt = self._check_statements.get(shape)
        if stmt is not None:
            return stmt
        select = sa.select(table.c[column]).where(*_at_key(table, key)).with_for_update()
        stmt = Prepared(select, self._engine.dialect)
        if len(self._check_statements) < _SHAPES_MAX:
            self._check_statements[shape] = stmt
        return stmt

    def _mutate(self, conn: sa.Connection, cursor: DBAPICursor, mutation: Mutation) -> None:
        table = _entity_table(mutation.table)
        op = mutation.op
        if op == "insert" or op == "upsert":
            _check_key(table, mutation.key)
            _check_columns(table, mutation.values, allow_key=False)
            _check_values(table, {**mutation.key, **mutation.values})
            if any(isinstance(v, Compact) for v in mutation.values.values()):
                raise StoreQueryError(f"Compact applies to an update, not an {op}")
            if op == "insert":
                plain = _shape_of(table, op, mutation.key, mutation.values)
                if plain is not None:
                    self._plain_statement(plain[0]).execute(cursor, plain[1])
                else:
                    conn.execute(table.insert(), {**mutation.key, **_plain(mutation.values)})
                return
            row = {**mutation.key, **_plain(mutation.values)}
            if any(name in _parted(table) for name in mutation.values):
                # an existing row's parts: as an update; else an insert
                where = _key_clause(table, mutation.key)
                if conn.execute(sa.select(sa.literal(1)).where(*where)).first() is None:
                    conn.execute(table.insert(), row)
                else:
                    self._mutate(conn, cursor, attrs.evolve(mutation, op="update"))
                return
            stmt = self._upsert_insert(table).values(row)
            index = [c.name for c in table.primary_key.columns]
            if mutation.values:
                conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=index, set_=_set_clause(table, mutation.values)
                    )
                )
            else:
                conn.execute(stmt.on_conflict_do_nothing(index_elements=index))
        elif op == "update":
            _check_key(table, mutation.key)
            _check_columns(table, mutation.values, allow_key=False)
            _check_values(table, mutation.values)
            plain = _shape_of(table, op, mutation.key, mutation.values)
            if mutation.values and plain is not None:
                found = self._plain_statement(plain[0]).execute(cursor, plain[1]).rowcount == 1
            elif mutation.values:
                result = conn.execute(
                    sa.update(table)
                    .where(*_key_clause(table, mutation.key))
                    .values(_set_clause(table, mutation.values))
                )
                found = result.rowcount == 1
            else:
                where = _key_clause(table, mutation.key)
                found = conn.execute(sa.select(sa.literal(1)).where(*where)).first() is not None
            if not found:
                raise StoreNotFound(table.name, dict(mutation.key))
            self._write_parts(conn, table, mutation)
        elif op == "delete":
            _check_key(table, mutation.key)
            if mutation.values:
                raise StoreQueryError("a delete takes no values")
            plain = _shape_of(table, op, mutation.key, {})
            assert plain is not None  # a delete is always one plain statement
            if self._plain_statement(plain[0]).execute(cursor, plain[1]).rowcount != 1:
                raise StoreNotFound(table.name, dict(mutation.key))
        else:
            raise StoreQueryError(f"unknown mutation op {op!r}")

    def _write_parts(self, conn: sa.Connection, table: sa.Table, mutation: Mutation) -> None:
        """After ``mutation`` updated its row: each parted column's append
        goes in as its last part, a compacted one takes its parts in, one
        set outright loses them."""
        for name in _parted(table):
            if name not in mutation.values:
                continue
            parts, owner = s.PARTS[(table.name, name)]
            (ident,) = mutation.key.values()
            value = mutation.values[name]
            if isinstance(value, Append):
                conn.execute(sa.insert(parts).values({owner: ident, "text": value.text}))
                continue
            if isinstance(value, Compact):
                texts = conn.execute(
                    sa.select(parts.c.text).where(parts.c[owner] == ident).order_by(parts.c.n)
                ).scalars()
                folded = "".join(texts)
                if not folded:
                    continue
                conn.execute(
                    sa.update(table)
                    .where(table.c[_owner_key(table)] == ident)
                    .values({name: _appended(table.c[name], sa.literal(folded, sa.Text))})
                )
            conn.execute(sa.delete(parts).where(parts.c[owner] == ident))

    def _allocate(
        self,
        cursor: DBAPICursor,
        drafts: Sequence[EventDraft],
        group: dict[str, _Head],
        touched: dict[str, int | None],
        rows: list[dict[str, Any]],
    ) -> list[StoredEvent]:
        """Give ``drafts`` their rooms' next seqs, advancing ``group``'s
        heads (what they were before goes into ``touched``, for the caller
        to undo if the request fails); their rows for the events insert go
        into ``rows``."""
        stored: list[StoredEvent] = []
        for draft in drafts:
            payload = _check_json(draft.data, f"data of event {draft.event!r}")
            room = draft.room
            head = group.get(room)
            if head is None:
                head = group[room] = self._load_head(cursor, room)
                touched[room] = None
            elif room not in touched:
                touched[room] = head.head
            event = draft.stored(head.epoch, head.head + 1)
            head.head = event.end_seq
            stored.append(event)
            rows.append(
                {
                    "room": room,
                    "seq": event.seq,
                    "last_seq": event.last_seq,
                    "epoch": head.epoch,
                    "event": draft.event,
                    "payload": payload,
                    "ts": draft.ts,
                    "user_id": draft.user_id,
                    "origin": draft.origin,
                    "temp_id": draft.temp_id,
                }
            )
        return stored

    def _lock_heads(self, conn: sa.Connection, requests: Sequence[WriteRequest]) -> None:
        """Shared store: make sure every room the group writes has its head
        row, lock those rows in room order, and hold what they say in
        ``_heads`` for :meth:`_load_head` (the group's own, forgotten
        after it).  The rows stay locked until the transaction ends, so no
        other store allocates in these rooms meanwhile."""
        self._heads.clear()
        rooms = sorted({draft.room for request in requests for draft in request.events})
        if not rooms:
            return
        r = s.rooms.c
        # a new room: whoever inserts its row first draws its epoch; a
        # concurrent insert of the same room waits for that one's outcome
        conn.execute(
            self._upsert_insert(s.rooms)
            .values([{"room": room, "epoch": self._new_epoch(), "head_seq": 0} for room in rooms])
            .on_conflict_do_nothing(index_elements=[r.room])
        )
        locked = conn.execute(
            sa.select(r.room, r.epoch, r.head_seq)
            .where(r.room.in_(rooms))
            .order_by(r.room)
            .with_for_update()
        ).all()
        for row in locked:
            self._heads[row.room] = (row.epoch, row.head_seq)

    def _load_head(self, cursor: DBAPICursor, room: str) -> _Head:
        """``room``'s head as committed: remembered, else read."""
        cached = self._heads.get(room)
        if cached is not None:
            return _Head(epoch=cached[0], base=cached[1], head=cached[1])
        row = self._select_head.execute(cursor, {"room": room}).fetchone()
        if row is None:
            return _Head(epoch=self._new_epoch(), base=0, head=0)
        return _Head(epoch=row[0], base=row[1], head=row[1])

    def _write_heads(self, cursor: DBAPICursor, group: Mapping[str, _Head]) -> None:
        """One upsert for the group's rooms: a new room's row is inserted,
        a known room's head moves from its ``base``; if another writer
        changed a room in between, its row is not written and the group
        fails."""
        if not group:
            return
        rows = [
            {"room": room, "epoch": h.epoch, "head": h.head, "base": h.base}
            for room, h in group.items()
        ]
        if self._move_heads.executemany(cursor, rows) != len(rows):
            raise StoreUnavailable(
                "a room's head moved under this store: is another writer using the database?"
            )

    def reset_room(self, room: str, new_epoch: str) -> None:
        """Reset ``room``'s log: its events are deleted, its epoch becomes
        ``new_epoch`` and its seqs start again at 1."""
        with self._write_lock:
            try:
                with self._writing() as conn:
                    conn.execute(sa.delete(s.events).where(s.events.c.room == room))
                    stmt = self._upsert_insert(s.rooms).values(
                        room=room, epoch=new_epoch, head_seq=0
                    )
                    conn.execute(
                        stmt.on_conflict_do_update(
                            index_elements=["room"], set_={"epoch": new_epoch, "head_seq": 0}
                        )
                    )
            except sa.exc.SQLAlchemyError as exc:
                self._heads.pop(room, None)
                raise _group_error(exc) from exc
            if not self._shared:
                self._remember(room, new_epoch, 0)
            mark("store.epoch_reset")

    # ----------------------------------------------------------------- reads: rooms

    def cached_head(self, room: str) -> tuple[str, int] | None:
        """``(epoch, head_seq)`` of ``room`` as this store (the single
        writer) last committed it, or None if it does not know (always, for
        a shared store: others write too); no I/O, so callable from any
        thread without the blocking seam."""
        if self._shared:
            return None
        return self._heads.get(room)

    def room_head(self, room: str) -> tuple[str, int] | None:
        """``(epoch, head_seq)`` of ``room``, or None if nothing was ever
        written to it (callers treat that as epoch-less, head 0)."""
        cached = self.cached_head(room)
        if cached is not None:
            return cached
        with self._reading() as conn, _raw_cursor(conn) as cursor:
            row = self._select_head.execute(cursor, {"room": room}).fetchone()
        return None if row is None else (row[0], row[1])

    def events_since(self, room: str, after_seq: int, limit: int = 1000) -> list[StoredEvent]:
        """Events of ``room`` after ``after_seq`` in seq order, at most
        ``limit``.  A merged event that covers ``after_seq + 1`` is included
        even though its first seq is not after ``after_seq``."""
        if limit < 1:
            return []
        e = s.events.c
        with self._reading() as conn:
            start = after_seq + 1
            straddle = conn.execute(
                sa.select(e.seq, e.last_seq)
                .where(e.room == room, e.seq <= after_seq)
                .order_by(e.seq.desc())
                .limit(1)
            ).one_or_none()
            if (
                straddle is not None
                and straddle.last_seq is not None
                and straddle.last_seq > after_seq
            ):
                start = straddle.seq
            rows = conn.execute(
                sa.select(s.events)
                .where(e.room == room, e.seq >= start)
                .order_by(e.seq)
                .limit(limit)
            ).all()
        return [_stored(row) for row in rows]

    def events_page(
        self,
        room: str,
        *,
        events: Sequence[str] | None = None,
        user_id: str | None = None,
        before_seq: int | None = None,
        limit: int = 50,
    ) -> EventPage:
        """A page of ``room``'s log newest first (the activity log),
        optionally only the named ``events`` and/or those of ``user_id``."""
        if not 1 <= limit <= MAX_LIMIT:
            raise StoreQueryError(f"limit must be from 1 to {MAX_LIMIT}, got {limit!r}")
        if before_seq is not None and before_seq not in INT64:  # (the driver overflows)
            raise StoreQueryError(f"before_seq must be a 64-bit integer, got {before_seq!r}")
        e = s.events.c
        where: list[sa.ColumnElement[bool] | sa.TextClause] = [e.room == room]
        if room.startswith("board:"):
            # in the partial index's words, so that the planner uses it
            where.append(sa.text(s.BOARD_ROOMS_SQL))
        if events is not None:
            where.append(e.event.in_(list(events)))
        if user_id is not None:
            where.append(e.user_id == user_id)
        if before_seq is not None:
            where.append(e.seq < before_seq)
        with self._reading() as conn:
            rows = conn.execute(
                sa.select(s.events).where(*where).order_by(e.seq.desc()).limit(limit + 1)
            ).all()
        items = [_stored(row) for row in rows[:limit]]
        more = len(rows) > limit
        return EventPage(items=items, next_before_seq=items[-1].seq if more else None)

    # ----------------------------------------------------------------- reads: entities

    def get(self, table: str, id: str | int | Mapping[str, Any]) -> dict[str, Any] | None:
        """The row of ``table`` with primary key ``id`` (a mapping for a
        composite key such as ``board_members``), or None."""
        t = table_for(table)
        pk = [c.name for c in t.primary_key.columns]
        key: Mapping[str, Any]
        if isinstance(id, Mapping):
            key = id
        elif len(pk) == 1:
            key = {pk[0]: id}
        else:
            raise StoreQueryError(f"{t.name} has a composite key {pk}: pass a mapping")
        _check_key(t, key)
        statement = self._get_statement(t, tuple(key))
        with self._reading() as conn, _raw_cursor(conn) as cursor:
            row = statement.one_or_none(cursor, dict(key))
            if row is not None and _parted(t):
                self._fold_one(cursor, t, row)
            return row

    def _fold_one(self, cursor: DBAPICursor, table: sa.Table, row: dict[str, Any]) -> None:
        """``row``'s parted columns with their parts appended (one row: a
        statement compiled once)."""
        ident = row[_owner_key(table)]
        for column in _parted(table):
            parts, owner = s.PARTS[(table.name, column)]
            read = self._parts_reads.get(parts.name)
            if read is None:
                select = (
                    sa.select(parts.c.text)
                    .where(parts.c[owner] == sa.bindparam("owner", type_=parts.c[owner].type))
                    .order_by(parts.c.n)
                )
                read = self._parts_reads[parts.name] = Prepared(select, self._engine.dialect)
            texts = read.all(cursor, {"owner": ident})
            if texts:
                row[column] = (row[column] or "") + "".join(t["text"] for t in texts)

    @staticmethod
    def _fold_parts(conn: sa.Connection, table: sa.Table, rows: Sequence[dict[str, Any]]) -> None:
        """``rows``' parted columns (those they hold) with their parts appended."""
        key = _owner_key(table)
        for column in _parted(table):
            holding = {row[key]: row for row in rows if column in row}
            if not holding:
                continue
            parts, owner = s.PARTS[(table.name, column)]
            appended: dict[Any, list[str]] = {}
            found = conn.execute(
                sa.select(parts.c[owner], parts.c.text)
                .where(parts.c[owner].in_(sorted(holding)))
                .order_by(parts.c[owner], parts.c.n)
            )
            for ident, text in found:
                appended.setdefault(ident, []).append(text)
            for ident, texts in appended.items():
                row = holding[ident]
                row[column] = (row[column] or "") + "".join(texts)

    def _get_statement(self, table: sa.Table, key: tuple[str, ...]) -> Prepared:
        """The visible columns of ``table`` where the columns of ``key``
        equal the parameters of their names, compiled once (a read per
        permission check or access load: SQLAlchemy's building, caching and
        result objects cost more than SQLite's own work)."""
        shape = (table.name, key)
        statement = self._get_statements.get(shape)
        if statement is None:
            select = sa.select(*visible_columns(table)).where(
                *(table.c[name] == sa.bindparam(name, type_=table.c[name].type) for name in key)
            )
            statement = self._get_statements[shape] = Prepared(select, self._engine.dialect)
        return statement

    def find(
        self, table: str, query: Mapping[str, Any] | None = None, *, cursors: bool = False
    ) -> Page:
        """Rows of ``table`` matching a Feathers-like ``query`` (see
        ``agor_actors.store._query``), one page at a time; with ``cursors``,
        the cursor after each row too."""
        t = table_for(table)
        compiled = compile_find(t, query)
        limit = compiled.limit
        with self._reading() as conn:
            total = None
            if compiled.count_stmt is not None:
                total = conn.execute(compiled.count_stmt).scalar_one()
            if limit == 0:
                return Page(items=[], next_cursor=None, total=total, limit=0, cursors=[])
            rows = conn.execute(compiled.stmt).all()
            page = rows[:limit]
            items = [compiled.item(row) for row in page]
            if _parted(t) and items:
                self._fold_parts(conn, t, items)
        more = len(rows) > limit
        return Page(
            items=items,
            next_cursor=compiled.cursor_for(page[-1]) if more else None,
            total=total,
            limit=limit,
            cursors=[compiled.cursor_for(row) for row in page] if cursors else None,
        )

    def meta_secret(self, name: str, candidate: str, *, replace: bool = False) -> str:
        """The secret kept in the database under ``name``, the same for
        every daemon on it: ``candidate`` if none was kept (it is then), or
        with ``replace`` (it replaces the one kept)."""
        with self._meta_writing() as conn:
            kept = _meta_value(conn, name)
            if kept is None:
                conn.execute(s.meta.insert().values(key=name, value=candidate))
                return candidate
            if replace and kept != candidate:
                conn.execute(s.meta.update().where(s.meta.c.key == name).values(value=candidate))
                return candidate
            return str(kept)

    def user_by_token_hash(self, token_hash: str) -> dict[str, Any] | None:
        """The user whose token hashes to ``token_hash`` (see :func:`hash_token`)."""
        u = s.users
        with self._reading() as conn:
            row = conn.execute(
                sa.select(*visible_columns(u)).where(
                    u.c.token_hash == token_hash, u.c.removed_at.is_(None)
                )
            ).one_or_none()
        return None if row is None else _plain_row(row)

    def token_hashes(self, user_ids: Collection[str]) -> dict[str, str]:
        """The token hash of each of ``user_ids`` that is not removed (a
        secret column: for the hub's sweep only, never a client)."""
        u = s.users
        found = dict[str, str]()
        with self._reading() as conn:
            for part in _in_parts(user_ids):
                query = sa.select(u.c.id, u.c.token_hash).where(
                    u.c.id.in_(part), u.c.removed_at.is_(None)
                )
                found.update((str(id), str(token_hash)) for id, token_hash in conn.execute(query))
        return found

    def credential(
        self, *, login: str | None = None, user_id: str | None = None
    ) -> dict[str, Any] | None:
        """The ``credentials`` row (with its password hash) of ``login`` or
        of ``user_id``: for the identity package only, never a client."""
        c = s.credentials
        where = c.c.login == login if login is not None else c.c.user_id == user_id
        with self._reading() as conn:
            row = conn.execute(sa.select(c).where(where)).one_or_none()
        return None if row is None else _plain_row(row)

    def refresh_token(self, token_hash: str) -> dict[str, Any] | None:
        """The ``refresh_tokens`` row whose token hashes to ``token_hash``."""
        r = s.refresh_tokens
        with self._reading() as conn:
            row = conn.execute(sa.select(r).where(r.c.token_hash == token_hash)).one_or_none()
        return None if row is None else _plain_row(row)

    def live_refresh_tokens(
        self, *, family_id: str | None = None, user_id: str | None = None
    ) -> list[str]:
        """The ids of the refresh tokens not revoked yet, of ``family_id`` or
        of ``user_id``."""
        r = s.refresh_tokens
        where = r.c.family_id == family_id if family_id is not None else r.c.user_id == user_id
        with self._reading() as conn:
            rows = conn.execute(sa.select(r.c.id).where(where, r.c.revoked_at.is_(None))).all()
        return [str(row[0]) for row in rows]

    def board_members(self, board_id: str) -> list[dict[str, Any]]:
        """The members of ``board_id`` (board_id, user_id, role), by user id."""
        with self._reading() as conn, _raw_cursor(conn) as cursor:
            return self._select_members.all(cursor, {"board_id": board_id})


def _migrate_1_to_2(conn: sa.Connection) -> None:
    """Board members may be ``admin``s: the role's CHECK constraint is
    replaced.  PostgreSQL alters it in place; SQLite cannot, so the table is
    rebuilt (renamed, created anew with its index, copied, dropped)."""
    table = s.board_members
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(
            "ALTER TABLE board_members DROP CONSTRAINT IF EXISTS ck_board_members_role"
        )
        allowed = ", ".join(f"'{role}'" for role in s.BOARD_ROLES)
        conn.exec_driver_sql(
            f"ALTER TABLE board_members ADD CONSTRAINT ck_board_members_role "
            f"CHECK (role IN ({allowed}))"
        )
        return
    conn.exec_driver_sql("ALTER TABLE board_members RENAME TO board_members_v1")
    for index in table.indexes:
        conn.exec_driver_sql(f'DROP INDEX IF EXISTS "{index.name}"')
    table.create(conn)
    conn.exec_driver_sql(
        "INSERT INTO board_members (board_id, user_id, role) "
        "SELECT board_id, user_id, role FROM board_members_v1"
    )
    conn.exec_driver_sql("DROP TABLE board_members_v1")


def _migrate_2_to_3(conn: sa.Connection) -> None:
    """A streamed message's appends go to ``message_parts``, which
    ``create_all`` adds; the messages as they are stay whole in ``content``
    (no parts yet).  The version moves so that an older daemon, which would
    read the messages without their parts, refuses the database.  The
    events' index by user covers board rooms only (``create_all`` makes
    indexes only with their tables)."""
    conn.exec_driver_sql("DROP INDEX IF EXISTS ix_events_room_user_seq")
    for index in s.events.indexes:
        index.create(conn, checkfirst=True)


def _migrate_3_to_4(conn: sa.Connection) -> None:
    """Writes' idempotency keys go to ``idempotency_keys``, which
    ``create_all`` adds.  The version moves so that an older daemon, which
    would run a write sent again under its key, refuses the database."""


def _migrate_4_to_5(conn: sa.Connection) -> None:
    """Users may be removed (``users.removed_at``, empty for those there
    are).  The version moves so that an older daemon, which would let a
    removed user in, refuses the database.  (A database made by this
    version and stamped older, as tests do, has the column already.)"""
    if "removed_at" not in {c["name"] for c in sa.inspect(conn).get_columns("users")}:
        conn.exec_driver_sql("ALTER TABLE users ADD COLUMN removed_at BIGINT")


_MIGRATIONS: Final[dict[int, Callable[[sa.Connection], None]]] = {
    1: _migrate_1_to_2,
    2: _migrate_2_to_3,
    3: _migrate_3_to_4,
    4: _migrate_4_to_5,
}
"""From each schema version to the next, run in the opening transaction."""


def _plain_row(row: sa.Row[Any]) -> dict[str, Any]:
    """A row as a dict with plain ``str`` keys (SQLAlchemy's are
    ``quoted_name``, which strict encoders refuse)."""
    return {str(key): value for key, value in row._mapping.items()}


def _group_error(exc: sa.exc.SQLAlchemyError) -> StoreError:
    if isinstance(exc, sa.exc.IntegrityError | sa.exc.DataError):
        return StoreIntegrityError(str(exc.orig))
    if isinstance(exc, sa.exc.DBAPIError):
        return unavailable(str(exc.orig), exc)
    return StoreUnavailable(str(exc))


# --------------------------------------------------------------------------- opening


def open_store(
    url: str,
    *,
    new_epoch: Callable[[], str],
    echo: bool = False,
    shared: bool = False,
    connect_timeout_s: int = PG_CONNECT_TIMEOUT_S,
) -> SqlStore:
    """Open (and on first use create) the store at ``url``:

    - ``sqlite:///path/to/agor.db``: a file, in WAL mode, synchronous=NORMAL,
      foreign keys on, a busy timeout;
    - ``sqlite://``: in memory, one shared connection (the simulator);
    - ``postgresql+psycopg://user@host/db``.

    ``new_epoch`` draws the epoch of a room written for the first time (the
    store reads no randomness itself).  ``shared``: other daemons write the
    same database (a cluster; see :class:`SqlStore`).  Raises :class:`StoreSchemaError` for
    a database of a newer schema version, :class:`StoreUnavailable` if the
    database cannot be reached (a PostgreSQL server that does not answer:
    within ``connect_timeout_s``, at least 2 s, libpq's floor).
    """
    parsed = sa.make_url(url)
    kwargs: dict[str, Any] = {
        "echo": echo,
        "json_serializer": _dumps,
        "json_deserializer": _json_loads,
    }
    if parsed.get_backend_name() == "sqlite":
        in_memory = parsed.database in (None, "", ":memory:")
        if in_memory:
            kwargs["poolclass"] = StaticPool
        else:
            _private_sqlite_files(str(parsed.database))
        kwargs["connect_args"] = {"check_same_thread": False}
        engine = sa.create_engine(parsed, **kwargs)
        _configure_sqlite(engine, wal=not in_memory)
    elif parsed.get_backend_name() == "postgresql":
        kwargs["connect_args"] = pg_connect_args(parsed, connect_timeout_s)
        engine = sa.create_engine(parsed, pool_pre_ping=True, **kwargs)
    else:
        raise StoreQueryError(f"unsupported database URL {parsed.render_as_string()!r}")
    try:
        return SqlStore(engine, new_epoch=new_epoch, shared=shared)
    except sa.exc.SQLAlchemyError as exc:
        engine.dispose()
        raise _group_error(exc) from exc
    except BaseException:
        engine.dispose()
        raise


def pg_connect_args(url: sa.URL, connect_timeout_s: int) -> dict[str, int]:
    """The connection timeouts a PostgreSQL store uses, those the URL
    names itself left as it says (``?connect_timeout=2`` overrides
    ``connect_timeout_s``)."""
    wanted = {"connect_timeout": connect_timeout_s, **_PG_CONNECT_DEFAULTS}
    return {k: v for k, v in wanted.items() if k not in url.query}


def _private_sqlite_files(database: str) -> None:
    """Create the database file 0600 (SQLite gives its -wal and -shm the
    database's mode) and narrow those already there, whatever the umask."""
    with contextlib.suppress(OSError):  # exists, or SQLite says why not
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    for path in (database, database + "-wal", database + "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path, 0o600)


def _configure_sqlite(engine: sa.Engine, *, wal: bool) -> None:
    @sa_event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        # Take BEGIN away from the sqlite3 module (its legacy transaction
        # control breaks SAVEPOINT); SQLAlchemy's "begin" event below emits it.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            if wal:
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
            if wal:
                cursor.execute(f"PRAGMA wal_autocheckpoint={_SQLITE_AUTOCHECKPOINT_PAGES}")
        finally:
            cursor.close()

    @sa_event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        # The writer takes the write lock up front: no deadlock-prone upgrade
        # from a read lock, and busy_timeout applies.  Readers stay deferred.
        # On the driver's connection: SQLAlchemy's statement machinery is
        # a fair share of a small group commit.
        sql = "BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN"
        with driver_errors(conn.dialect, sql):
            conn.connection.driver_connection.execute(sql)  # type: ignore[union-attr]
