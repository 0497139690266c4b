"""The store's vocabulary: the tables (SQLAlchemy Core, one ``MetaData``), the
schema version and the typed errors every store call may return or raise.

Timestamps are integer milliseconds since the Unix epoch, passed in by the
caller; nothing here reads the clock.  JSON columns are ``JSON`` on SQLite and
``JSONB`` on PostgreSQL (``JSONB`` compares by value, which the preconditions
and ``upsert`` rely on less than one might think: comparisons happen in Python
after loading, see ``_backend``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Final

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

__all__ = [
    "BOARD_ROLES",
    "BOARD_ROOMS_SQL",
    "ENTITY_TABLES",
    "IDENTITY_TABLES",
    "INTERNAL_COLUMNS",
    "PARTS",
    "READABLE_TABLES",
    "SCHEMA_VERSION",
    "SECRET_COLUMNS",
    "SESSION_STATUSES",
    "TASK_STATUSES",
    "StoreConflict",
    "StoreError",
    "StoreFindError",
    "StoreFull",
    "StoreIntegrityError",
    "StoreNotFound",
    "StoreQueryError",
    "StoreRepeated",
    "StoreSchemaError",
    "StoreUnavailable",
    "board_members",
    "boards",
    "credentials",
    "events",
    "field_history",
    "idempotency_keys",
    "message_parts",
    "messages",
    "meta",
    "metadata",
    "refresh_tokens",
    "rooms",
    "sessions",
    "sign_in_codes",
    "tasks",
    "tool_calls",
    "users",
    "web_sessions",
]

#: Bumped whenever the tables change; a database stamped with a newer version
#: is refused (an older daemon must not write into a newer schema), an older
#: one is migrated (``store._backend``'s migrations).  2: board members may
#: be ``admin``s (the role's CHECK constraint).  3: a streamed message's
#: appended text is kept in ``message_parts`` (an older daemon would read
#: the messages without it).  4: writes' idempotency keys
#: (``idempotency_keys``; an older daemon would run a write sent again).
#: 5: a removed user (``users.removed_at``; an older daemon would let it in).
SCHEMA_VERSION: Final = 5

SESSION_STATUSES: Final = ("idle", "running", "awaiting_permission", "completed", "failed")
TASK_STATUSES: Final = ("created", "running", "completed", "failed", "stopped")
# the board's creator is its ``owner``; ``admin``s manage it too (members,
# ownership, deletion), ``editor``s write, ``viewer``s read
BOARD_ROLES: Final = ("owner", "admin", "editor", "viewer")


# --------------------------------------------------------------------------- errors


class StoreError(Exception):
    """Base of every error the store returns (from ``commit``) or raises.
    ``told``: what a client is told when the error fails its call as
    ``unavailable`` (the detail is for the log)."""

    told: ClassVar[str] = "the store is unavailable"


class StoreConflict(StoreError):
    """A precondition (``Expect``) did not hold: ``current`` is the value the
    column has now, for the caller's ``conflict`` error."""

    def __init__(
        self, table: str, key: dict[str, Any], column: str, expected: Any, current: Any
    ) -> None:
        super().__init__(
            f"conflict on {table} {key!r}: {column} is {current!r}, expected {expected!r}"
        )
        self.table = table
        self.key = key
        self.column = column
        self.expected = expected
        self.current = current


class StoreNotFound(StoreError):
    """The row a mutation or precondition names does not exist."""

    def __init__(self, table: str, key: dict[str, Any]) -> None:
        super().__init__(f"no row in {table} with {key!r}")
        self.table = table
        self.key = key


class StoreIntegrityError(StoreError):
    """The database refused the data: a duplicate key, a missing referenced
    row, a value outside a column's allowed set, a value it cannot store."""


class StoreRepeated(StoreError):
    """A request's :class:`~agor_actors.store.Once` key was taken by an
    earlier write: nothing of this request was written.  ``call`` and
    ``digest`` are the earlier write's (the caller compares them with its
    own), ``answer`` what it answered."""

    def __init__(self, user_id: str, key: str, call: str, digest: str, answer: Any) -> None:
        super().__init__(f"idempotency key {key!r} of {user_id!r} was used by {call}")
        self.user_id = user_id
        self.key = key
        self.call = call
        self.digest = digest
        self.answer = answer


class StoreQueryError(StoreError):
    """A query or mutation names an unknown table, column or operator, or has
    a malformed value; callers answer it as a bad request."""


class StoreFindError(StoreQueryError):
    """A ``find`` query the query language refuses.  Its message says what
    is wrong in the language's own terms (an operator, a value's type, a
    column and the ones a query may name: never SQL, a secret or an
    internal column), so a service may show it to the client as is."""


class StoreSchemaError(StoreError):
    """The database's schema cannot be used by this version of the code."""


class StoreUnavailable(StoreError):
    """The database failed as a whole (I/O error, lost connection, disk full):
    the transaction was rolled back and nothing of it is visible."""


class StoreFull(StoreUnavailable):
    """The database's disk (or its size limit) is full: writes fail until
    there is room; reads go on."""

    told: ClassVar[str] = "the store's disk is full: writes fail until there is room"


def unavailable(message: str, *causes: BaseException | None) -> StoreUnavailable:
    """:class:`StoreFull` if one of ``causes`` (a driver's error, or
    SQLAlchemy's around it) says the disk is full, else
    :class:`StoreUnavailable`; with ``message``."""
    for cause in causes:
        orig = getattr(cause, "orig", None) or cause
        if getattr(orig, "sqlite_errorcode", None) == _SQLITE_FULL or (
            getattr(orig, "sqlstate", None) == _PG_DISK_FULL
        ):
            return StoreFull(message)
    return StoreUnavailable(message)


_SQLITE_FULL: Final = 13
_PG_DISK_FULL: Final = "53100"


# --------------------------------------------------------------------------- tables

metadata: Final = sa.MetaData()

JSONType: Final = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Ms = sa.BigInteger  # integer milliseconds since the Unix epoch


def _in(column: str, values: tuple[str, ...], name: str) -> sa.CheckConstraint:
    allowed = ", ".join(f"'{v}'" for v in values)
    return sa.CheckConstraint(f"{column} IN ({allowed})", name=name)


def _empty_clocks() -> dict[str, Any]:
    return {}


def _revisioned() -> list[sa.Column[Any]]:
    return [
        sa.Column("created_at", Ms, nullable=False),
        sa.Column("updated_at", Ms, nullable=False),
        sa.Column("rev", sa.BigInteger, nullable=False, server_default="0"),
        # per-field hybrid logical clock stamps: {field: stamp}
        sa.Column("clocks", JSONType, nullable=False, default=_empty_clocks),
    ]


meta: Final = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.String, primary_key=True),
    sa.Column("value", sa.String, nullable=False),
)

users: Final = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column("name", sa.String, nullable=False),
    # sha256 hex of the user's token; never returned by get/find
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("is_owner", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", Ms, nullable=False),
    # set by ``users.remove``: the user signs in no more, by any means
    sa.Column("removed_at", Ms, nullable=True),
)

boards: Final = sa.Table(
    "boards",
    metadata,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column("name", sa.String, nullable=False),
    sa.Column("description", sa.Text, nullable=True),
    sa.Column("owner_id", sa.String, sa.ForeignKey("users.id"), nullable=True, index=True),
    *_revisioned(),
)

board_members: Final = sa.Table(
    "board_members",
    metadata,
    sa.Column(
        "board_id", sa.String, sa.ForeignKey("boards.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column(
        "user_id",
        sa.String,
        sa.ForeignKey("users.id", ondelete="CASCADE"),
        primary_key=True,
        index=True,
    ),
    sa.Column("role", sa.String, nullable=False),
    _in("role", BOARD_ROLES, "ck_board_members_role"),
)

sessions: Final = sa.Table(
    "sessions",
    metadata,
    sa.Column("id", sa.String, primary_key=True),
    # a board with sessions cannot be deleted: the sessions go first (each
    # with its own event), so nothing disappears from a client silently
    sa.Column("board_id", sa.String, sa.ForeignKey("boards.id"), nullable=True, index=True),
    sa.Column("title", sa.String, nullable=False, server_default=""),
    sa.Column("status", sa.String, nullable=False, server_default="idle"),
    sa.Column("agent", sa.String, nullable=True),
    sa.Column("git_state", JSONType, nullable=True),
    sa.Column("owner_id", sa.String, sa.ForeignKey("users.id"), nullable=True),
    sa.Column(
        "locked_by", sa.String, sa.ForeignKey("users.id", ondelete="SET NULL"), nullable=True
    ),
    sa.Column("permissions", JSONType, nullable=True),
    *_revisioned(),
    _in("status", SESSION_STATUSES, "ck_sessions_status"),
)

tasks: Final = sa.Table(
    "tasks",
    metadata,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column(
        "session_id", sa.String, sa.ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("prompt", sa.Text, nullable=False, server_default=""),
    sa.Column("status", sa.String, nullable=False, server_default="created"),
    sa.Column("result", JSONType, nullable=True),
    sa.Column("error", JSONType, nullable=True),
    *_revisioned(),
    _in("status", TASK_STATUSES, "ck_tasks_status"),
    sa.Index("ix_tasks_session_created", "session_id", "created_at"),
)

messages: Final = sa.Table(
    "messages",
    metadata,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column(
        "session_id", sa.String, sa.ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column(
        "task_id",
        sa.String,
        sa.ForeignKey("tasks.id", ondelete="CASCADE"),
        nullable=True,
        index=True,
    ),
    sa.Column("role", sa.String, nullable=False),
    sa.Column("content", sa.Text, nullable=False, server_default=""),
    sa.Column("streaming", sa.Boolean, nullable=False, default=False),
    *_revisioned(),
    sa.Index("ix_messages_session_created", "session_id", "created_at"),
)

# A streamed text's appends, one row each, in the order ``n`` (a message's
# ``content`` is its column followed by its parts): appending to the column
# itself made SQLite rewrite the whole, growing row (and its overflow pages)
# per chunk.  ``n`` rises with each insert; appends to one message are
# serialized by its row (the writer, or its row lock on a shared store).
message_parts: Final = sa.Table(
    "message_parts",
    metadata,
    sa.Column("n", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column(
        "message_id",
        sa.String,
        sa.ForeignKey("messages.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("text", sa.Text, nullable=False),
    sa.Index("ix_message_parts_message_n", "message_id", "n"),
)

tool_calls: Final = sa.Table(
    "tool_calls",
    metadata,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column(
        "session_id", sa.String, sa.ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column(
        "task_id",
        sa.String,
        sa.ForeignKey("tasks.id", ondelete="CASCADE"),
        nullable=True,
        index=True,
    ),
    sa.Column("name", sa.String, nullable=False),
    sa.Column("input", JSONType, nullable=True),
    sa.Column("output", JSONType, nullable=True),
    sa.Column("status", sa.String, nullable=False),
    sa.Column("created_at", Ms, nullable=False),
    sa.Column("updated_at", Ms, nullable=False),
    sa.Index("ix_tool_calls_session_created", "session_id", "created_at"),
)

# One row per room: the epoch of its log and the last seq handed out.
rooms: Final = sa.Table(
    "rooms",
    metadata,
    sa.Column("room", sa.String, primary_key=True),
    sa.Column("epoch", sa.String, nullable=False),
    sa.Column("head_seq", sa.BigInteger, nullable=False),
)

#: The condition of the partial index of board rooms' events; a query
#: that means to use it says it in the same words.
BOARD_ROOMS_SQL: Final = "room LIKE 'board:%'"

# The per-room event log (and the activity log, read newest first).  An event
# merged from several (``last_seq`` not null) covers seq..last_seq; the seqs
# after the first have no row of their own.
events: Final = sa.Table(
    "events",
    metadata,
    sa.Column("room", sa.String, primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("last_seq", sa.BigInteger, nullable=True),
    sa.Column("epoch", sa.String, nullable=False),
    sa.Column("event", sa.String, nullable=False),
    sa.Column("payload", JSONType, nullable=True),
    sa.Column("ts", Ms, nullable=False),
    sa.Column("user_id", sa.String, nullable=True),
    sa.Column("origin", sa.String, nullable=True),
    sa.Column("temp_id", sa.String, nullable=True),
    # a board's activity by user (``events_page``); a session room's log is
    # never read so: indexed only for boards, not one more B-tree page per
    # room written on every commit of streamed chunks
    sa.Index(
        "ix_events_board_user_seq",
        "room",
        "user_id",
        "seq",
        sqlite_where=sa.text(BOARD_ROOMS_SQL),
        postgresql_where=sa.text(BOARD_ROOMS_SQL),
    ),
)

# Every value a per-field merge overwrote, with both clocks, so nothing is
# silently lost.  ``hlc`` stamps are sortable strings chosen by the caller.
field_history: Final = sa.Table(
    "field_history",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("entity", sa.String, nullable=False),
    sa.Column("entity_id", sa.String, nullable=False),
    sa.Column("field", sa.String, nullable=False),
    sa.Column("value", JSONType, nullable=True),
    sa.Column("hlc", sa.String, nullable=False),
    sa.Column("writer", sa.String, nullable=False),
    sa.Column("overwritten_by_hlc", sa.String, nullable=True),
    sa.Column("overwritten_by_writer", sa.String, nullable=True),
    sa.Column("ts", Ms, nullable=False),
    sa.Index("ix_field_history_entity", "entity", "entity_id", "field", "id"),
)

# ---------------------------------------------------------------- identity
# Sign-in (agor_actors.identity): written through the writer like any table,
# never read by get/find.  New tables only: create_all adds them to an
# existing database without a schema change.

credentials: Final = sa.Table(
    "credentials",
    metadata,
    sa.Column(
        "user_id", sa.String, sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    ),
    # the sign-in name (the user's name when the password was set); unique
    sa.Column("login", sa.String, nullable=False, unique=True),
    # argon2id (PHC string)
    sa.Column("password_hash", sa.String, nullable=False),
    sa.Column("updated_at", Ms, nullable=False),
)

refresh_tokens: Final = sa.Table(
    "refresh_tokens",
    metadata,
    sa.Column("id", sa.String, primary_key=True),
    # sha256 hex of the token; the token itself is never stored
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    # one sign-in's chain of rotations: a reused token revokes them all
    sa.Column("family_id", sa.String, nullable=False, index=True),
    sa.Column(
        "user_id",
        sa.String,
        sa.ForeignKey("users.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("created_at", Ms, nullable=False),
    sa.Column("expires_at", Ms, nullable=False),
    # set when it was exchanged for the next one (then presenting it is reuse)
    sa.Column("rotated_at", Ms, nullable=True),
    sa.Column("revoked_at", Ms, nullable=True),
)

idempotency_keys: Final = sa.Table(
    "idempotency_keys",
    metadata,
    # whose key (the same key of two users names two writes)
    sa.Column("user_id", sa.String, primary_key=True),
    sa.Column("key", sa.String(128), primary_key=True),
    # what the write was ("service.method id"), and a digest of its data: a
    # key sent again with another call is refused rather than answered
    sa.Column("call", sa.String, nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),
    # the answer of the write, as its caller got it (without ``_seq``)
    sa.Column("answer", JSONType, nullable=True),
    # when it was written: keys older than the daemon's retention are dropped
    sa.Column("created_at", Ms, nullable=False, index=True),
)

sign_in_codes: Final = sa.Table(
    "sign_in_codes",
    metadata,
    # sha256 hex of a one-time browser sign-in code (the code is never stored)
    sa.Column("digest", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.String, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    # where the browser goes once signed in (a local path)
    sa.Column("next_path", sa.String, nullable=False),
    sa.Column("expires_at", Ms, nullable=False, index=True),
)
"""Pending sign-in links (``agor-actors open``): in the store, so that any
daemon of a cluster takes a link another made; each is taken once."""

web_sessions: Final = sa.Table(
    "web_sessions",
    metadata,
    # sha256 hex of a browser sign-in's id (the id is in the signed cookie)
    sa.Column("digest", sa.String(64), primary_key=True),
    sa.Column(
        "user_id",
        sa.String,
        sa.ForeignKey("users.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("created_at", Ms, nullable=False),
    sa.Column("expires_at", Ms, nullable=False, index=True),
)
"""Browser sign-ins: a cookie is good while its row is here (logging out,
a password change and removing the user delete them)."""

IDENTITY_TABLES: Final = frozenset({"credentials", "refresh_tokens"})
"""Written through mutations; never read by ``get``/``find``."""

#: Tables that mutations, ``get`` and ``find`` may name.  ``rooms`` and
#: ``events`` belong to the store's sequence allocation; ``meta`` to the schema.
ENTITY_TABLES: Final[dict[str, sa.Table]] = {
    t.name: t
    for t in (
        users,
        boards,
        board_members,
        sessions,
        tasks,
        messages,
        tool_calls,
        credentials,
        refresh_tokens,
    )
}

#: Tables that ``get`` and ``find`` may read: the entities and the history.
READABLE_TABLES: Final[dict[str, sa.Table]] = {
    **{name: t for name, t in ENTITY_TABLES.items() if name not in IDENTITY_TABLES},
    "field_history": field_history,
}

#: Text columns whose appends (``Append``) are stored as rows of a parts
#: table, not in the column: ``(table, column)`` -> ``(parts table, the
#: parts' column naming the row)``.  The row's one key column is the owner.
PARTS: Final[dict[tuple[str, str], tuple[sa.Table, str]]] = {
    ("messages", "content"): (message_parts, "message_id"),
}

#: Columns that ``get``/``find`` never return nor filter on.
SECRET_COLUMNS: Final[dict[str, frozenset[str]]] = {"users": frozenset({"token_hash"})}

#: Columns ``get`` returns (the session actors' merge bookkeeping) but
#: ``find`` neither returns, filters, sorts on nor names: no client sees them.
INTERNAL_COLUMNS: Final[frozenset[str]] = frozenset({"clocks"})
