"""The permission checks of every call, join and read: :mod:`._access`'s
rules over the records, loaded from the store and kept in a bounded cache
that every write changing access forgets (or, while such a write is in
flight, holds the narrower state it will make: :meth:`Gate.assume_session`).

The local owner principal passes every check without a lookup."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final, TypeVar

from ..domain import Principal, ServiceError
from ..store import SqlStore, StoreError, StoreUnavailable
from ..world import World
from ._access import (
    ACCESS_FIELDS,
    BoardAccess,
    Level,
    SessionAccess,
    board_level,
    check_lock_change,
    check_permissions,
    forbidden,
    session_level,
    session_write_refusal,
)
from ._errors import store_error

__all__ = ["Gate"]

_A = TypeVar("_A", BoardAccess, SessionAccess)

CACHE_MAX: Final = 16_384
"""Boards and sessions whose access is kept (each; LRU)."""

_ACCESS_COLUMNS: Final = {
    "boards": ("id", "owner_id"),
    "sessions": ("id", "owner_id", "board_id", "locked_by", "permissions"),
    "tasks": ("id", "session_id"),
    "messages": ("id", "session_id"),
    "tool_calls": ("id", "session_id"),
}


class Gate:
    """Checks for one hub.  Raises ``ServiceError("forbidden", ...)``."""

    def __init__(self, world: World, store: SqlStore, *, cache_max: int = CACHE_MAX) -> None:
        self.world = world
        self.store = store
        self.cache_max = cache_max
        self._boards: OrderedDict[str, BoardAccess] = OrderedDict()
        self._sessions: OrderedDict[str, SessionAccess] = OrderedDict()
        self._assumed: set[tuple[str, str]] = set()
        """``("board" | "session", id)`` held by an ``assume_*`` until forgotten."""
        self._changes = 0
        """Bumped by every forget and assume: a load that began before one
        is not kept (what it read may be what the change made stale, and it
        would land over a newer load's, or over what is assumed)."""
        self.denials = 0

    # ------------------------------------------------------------- records

    async def board(self, board_id: str, *, fresh: bool = False) -> BoardAccess | None:
        store = self.store

        def load() -> BoardAccess | None:
            row = store.get("boards", board_id)
            return None if row is None else BoardAccess.of(row, store.board_members(board_id))

        fresh = fresh and ("board", board_id) not in self._assumed
        return await self._cached(self._boards, board_id, load, fresh)

    async def session(self, session_id: str, *, fresh: bool = False) -> SessionAccess | None:
        store = self.store

        def load() -> SessionAccess | None:
            row = store.get("sessions", session_id)
            return None if row is None else SessionAccess.of(row)

        fresh = fresh and ("session", session_id) not in self._assumed
        return await self._cached(self._sessions, session_id, load, fresh)

    async def _cached(
        self,
        cache: OrderedDict[str, _A],
        key: str,
        load: Callable[[], _A | None],
        fresh: bool = False,
    ) -> _A | None:
        """From ``cache``, or loaded (in a worker thread) and kept if found.
        ``fresh``: loaded whatever the cache holds, unless the store is
        unavailable: then as last read (a cluster node serves joins from
        its rooms' memory while PostgreSQL is away)."""
        cached = cache.get(key)
        if cached is not None and not fresh:
            cache.move_to_end(key)
            return cached
        changes = self._changes
        try:
            access = await self.world.blocking.run(load)
        except StoreUnavailable as exc:
            if cached is not None:
                return cached
            raise store_error(exc) from None
        except StoreError as exc:
            raise store_error(exc) from None
        if self._changes != changes:
            return access  # the caller's answer, not kept (see ``_changes``)
        if access is not None:
            _put(cache, key, access, self.cache_max)
        else:
            cache.pop(key, None)
        return access

    def forget_board(self, board_id: str) -> None:
        self._changes += 1
        self._boards.pop(board_id, None)
        self._assumed.discard(("board", board_id))

    def forget_session(self, session_id: str) -> None:
        self._changes += 1
        self._sessions.pop(session_id, None)
        self._assumed.discard(("session", session_id))

    def forget_loaded(self) -> None:
        """Every record read from the store (what is assumed stays: its
        write forgets it once answered)."""
        self._changes += 1
        for cache, kind in ((self._boards, "board"), (self._sessions, "session")):
            for key in [k for k in cache if (kind, k) not in self._assumed]:
                del cache[key]

    def assume_board(self, access: BoardAccess) -> None:
        """Check against ``access`` until the board is forgotten (a write
        that narrows it is in flight)."""
        self._changes += 1
        _put(self._boards, access.board_id, access, self.cache_max)
        self._assumed.add(("board", access.board_id))

    def assume_session(self, access: SessionAccess) -> None:
        self._changes += 1
        _put(self._sessions, access.session_id, access, self.cache_max)
        self._assumed.add(("session", access.session_id))

    async def _session_board(
        self, session: SessionAccess, *, fresh: bool = False
    ) -> BoardAccess | None:
        if session.board_id is None:
            return None
        return await self.board(session.board_id, fresh=fresh)

    # ------------------------------------------------------------- levels

    async def session_level(self, principal: Principal, session_id: str) -> Level:
        if principal.is_owner:
            return Level.ADMIN
        session = await self.session(session_id)
        if session is None:
            return Level.NONE
        return session_level(principal, session, await self._session_board(session))

    async def board_level(self, principal: Principal, board_id: str) -> Level:
        if principal.is_owner:
            return Level.ADMIN
        return board_level(principal, await self.board(board_id))

    async def may_see_room(self, principal: Principal, room: str, *, fresh: bool = False) -> bool:
        """Whether the room exists and the principal may read it.  ``fresh``:
        as the store has it now (a cluster node's join: another daemon may
        have changed it unseen), or as assumed while a write is in flight."""
        kind, _, ident = room.partition(":")
        if kind == "session":
            session = await self.session(ident, fresh=fresh)
            if session is None or principal.is_owner:
                return session is not None
            board = await self._session_board(session, fresh=fresh)
            return session_level(principal, session, board) >= Level.READ
        board = await self.board(ident, fresh=fresh)
        if principal.is_owner:
            return board is not None
        return board_level(principal, board) >= Level.READ

    # ------------------------------------------------------------- calls

    def refuse(self, message: str) -> ServiceError:
        self.denials += 1
        return forbidden(message)

    async def check_session_write(
        self, principal: Principal, service: str, method: str, session_id: str, data: Any
    ) -> SessionAccess | None:
        """A write to a session or to its tasks and messages.  Returns the
        session's access as it will be if this write changes it (None
        otherwise)."""
        values = data if isinstance(data, dict) else {}
        if service == "sessions" and method == "create":
            await self._check_create(principal, values)
            return None
        patch = service == "sessions" and method in ("patch", "update")
        if patch and "permissions" in values:
            check_permissions(values["permissions"])
        fields = frozenset(values) & ACCESS_FIELDS if patch else frozenset()
        if principal.is_owner and not fields:
            return None  # no lookup on the owner's hot path
        session = await self.session(session_id)
        if session is None:
            if service == "sessions":
                return None  # the session actor answers not_found
            raise self.refuse(f"no session {session_id} that this user may see")
        if principal.is_owner:
            if "board_id" in fields:
                await self._board_exists(values["board_id"])
            return session.patched(values) if fields else None
        board = await self._session_board(session)
        refusal = session_write_refusal(
            principal, session, board, fields, remove=service == "sessions" and method == "remove"
        )
        if refusal is None and "locked_by" in fields:
            level = session_level(principal, session, board)
            refusal = check_lock_change(principal, level, values["locked_by"])
        moved_to = values.get("board_id") if "board_id" in fields else None
        if (
            refusal is None
            and moved_to is not None
            and await self.board_level(principal, str(moved_to)) < Level.WRITE
        ):
            refusal = "the session can move only to a board this user writes to"
        if refusal is not None:
            raise self.refuse(refusal)
        return session.patched(values) if fields else None

    async def _check_create(self, principal: Principal, values: dict[str, Any]) -> None:
        check_permissions(values.get("permissions"))
        if principal.is_owner:
            await self._board_exists(values.get("board_id"))
            return
        owner = values.get("owner_id", principal.user_id)
        if owner != principal.user_id:
            raise self.refuse("a new session is owned by its creator")
        board = values.get("board_id")
        if isinstance(board, str) and await self.board_level(principal, board) < Level.WRITE:
            raise self.refuse(f"no board {board} that this user writes to")

    async def _board_exists(self, board_id: Any) -> None:
        """A session placed on a board that does not exist is refused by its
        name (the store's refusal says only that the data does not fit).
        Only for the owner, who may write to any board: another user is
        refused a board it cannot write to, whether it exists or not."""
        if isinstance(board_id, str) and await self.board(board_id) is None:
            raise ServiceError("invalid_field", f"data.board_id: no board {board_id}")

    async def check_board_call(
        self, principal: Principal, method: str, board_id: str | None, data: Any
    ) -> None:
        if principal.is_owner or method == "create" or board_id is None:
            return
        level = await self.board_level(principal, board_id)
        if level < Level.READ:
            raise self.refuse(f"no board {board_id} that this user may see")
        if method in ("get", "find"):
            return
        values = data if isinstance(data, dict) else {}
        admin = method not in ("patch", "update") or "owner_id" in values
        if admin and level < Level.ADMIN:
            raise self.refuse(
                "only the board's owner or an admin manages its members, ownership and deletion"
            )
        if level < Level.WRITE:
            raise self.refuse("a viewer of this board reads and never writes")

    def check_users_call(self, principal: Principal, method: str, id: str | None) -> None:
        own = ("get", "patch", "rotate_token")
        if principal.is_owner or (method in own and id == principal.user_id):
            return  # a user reads its own record, sets its own password, renews its token
        raise self.refuse("only the owner manages users")

    # ------------------------------------------------------------- reads

    @staticmethod
    def access_query(service: str, query: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """A ``find`` query that returns what the check needs, and the
        columns to strip from its rows afterwards (not asked for)."""
        select = query.get("$select")
        needed = _ACCESS_COLUMNS.get(service, ())
        if not isinstance(select, list) or not needed:
            return query, []
        extra = [c for c in needed if c not in select and c != "id"]  # the key is always there
        return {**query, "$select": [*select, *extra]}, extra

    @staticmethod
    def access_columns(service: str) -> tuple[str, ...] | None:
        """The columns :meth:`visible` reads of a ``service`` record (None:
        none listed: read the record whole)."""
        return _ACCESS_COLUMNS.get(service)

    async def visible(self, principal: Principal, service: str, row: dict[str, Any]) -> bool:
        """Whether the principal may read this record."""
        if principal.is_owner:
            return True
        if service == "boards":
            return await self.board_level(principal, str(row["id"])) >= Level.READ
        if service == "sessions":
            session = SessionAccess.of(row)
            board = await self._session_board(session)
            return session_level(principal, session, board) >= Level.READ
        if service == "users":
            return row.get("id") == principal.user_id
        session_id = row.get("session_id")
        if not isinstance(session_id, str):
            return False
        return await self.session_level(principal, session_id) >= Level.READ


def _put(cache: OrderedDict[str, Any], key: str, value: Any, bound: int) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > bound:
        cache.popitem(last=False)
