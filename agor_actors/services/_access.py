"""Who may do what: the seed's ``SessionPermissions`` and board membership,
as pure rules over the records (no I/O: :mod:`._gate` loads the records).

Levels, each including the ones below it:

* ``ADMIN``: the local owner principal; a session's ``owner_id``; a board's
  ``owner_id`` and its members with role ``owner`` or ``admin`` (for the
  board and every session on it).  Only an admin changes ownership,
  permissions, membership, or deletes.
* ``WRITE``: a session's ``collaborators``; a board's ``editor`` members.
* ``READ``: a session's ``viewers``, any user when it is ``public``; a
  board's ``viewer`` members.

A session's writes are narrowed further by its ownership ``mode``
(``"owner"``: the owner edits, the others spectate) and by its lock
(``locked_by``: only that user writes until it is released).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs

from ..domain import Principal, ServiceError
from ..domain.fields import ID_CHARS_MAX, check_text

__all__ = [
    "ACCESS_FIELDS",
    "AccessChange",
    "BoardAccess",
    "Level",
    "SessionAccess",
    "access_change",
    "board_level",
    "check_permissions",
    "forbidden",
    "narrower_role",
    "session_level",
    "session_write_refusal",
]

MODES: Final = ("shared", "owner")
PERMISSION_KEYS: Final = ("collaborators", "viewers", "public", "mode")
ACCESS_FIELDS: Final = frozenset({"owner_id", "permissions", "board_id", "locked_by"})
"""Session fields that change who may do what: only an admin changes them
(``locked_by``: also a writer taking or releasing the lock for itself)."""
USERS_MAX: Final = 1000
"""Users named in one of a session's ``collaborators`` / ``viewers``."""


class Level(enum.IntEnum):
    NONE = 0
    READ = 1
    WRITE = 2
    ADMIN = 3


_BOARD_ROLE_LEVEL: Final = {
    "owner": Level.ADMIN,
    "admin": Level.ADMIN,
    "editor": Level.WRITE,
    "viewer": Level.READ,
}


@attrs.frozen
class BoardAccess:
    """What of a board decides access: its owner and members' roles."""

    board_id: str
    owner_id: str | None
    members: Mapping[str, str]

    @classmethod
    def of(cls, board: Mapping[str, Any], members: Sequence[Mapping[str, Any]]) -> BoardAccess:
        return cls(
            board_id=str(board["id"]),
            owner_id=board.get("owner_id"),
            members={str(m["user_id"]): str(m["role"]) for m in members},
        )

    def with_role(self, user_id: str, role: str | None) -> BoardAccess:
        """This access once ``user_id`` has ``role`` (None: no membership)."""
        members = {u: r for u, r in self.members.items() if u != user_id}
        if role is not None:
            members[user_id] = role
        return attrs.evolve(self, members=members)


@attrs.frozen
class SessionAccess:
    """What of a session decides access: the seed's ``SessionPermissions``
    {owner, collaborators, viewers, public}, its board, mode and lock."""

    session_id: str
    owner_id: str | None
    board_id: str | None
    locked_by: str | None = None
    collaborators: frozenset[str] = frozenset()
    viewers: frozenset[str] = frozenset()
    public: bool = False
    mode: str = "shared"

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> SessionAccess:
        perms = row.get("permissions") or {}
        if not isinstance(perms, Mapping):
            perms = {}
        return cls(
            session_id=str(row["id"]),
            owner_id=row.get("owner_id"),
            board_id=row.get("board_id"),
            locked_by=row.get("locked_by"),
            collaborators=frozenset(_users(perms.get("collaborators"))),
            viewers=frozenset(_users(perms.get("viewers"))),
            public=perms.get("public") is True,
            mode=str(perms["mode"]) if perms.get("mode") in MODES else "shared",
        )

    def patched(self, values: Mapping[str, Any]) -> SessionAccess:
        """This access after a patch of ``values`` (the fields it names)."""
        row = {
            "id": self.session_id,
            "owner_id": self.owner_id,
            "board_id": self.board_id,
            "locked_by": self.locked_by,
            "permissions": {
                "collaborators": sorted(self.collaborators),
                "viewers": sorted(self.viewers),
                "public": self.public,
                "mode": self.mode,
            },
        }
        row.update({k: v for k, v in values.items() if k in ACCESS_FIELDS})
        return SessionAccess.of(row)


@attrs.frozen
class AccessChange:
    """What a committed event changes of access, for a daemon that did not
    write it (a cluster node: see :func:`access_change`): the records its
    gate forgets, and whose subscriptions it checks again (``users``' in
    every room, every one in ``rooms``; neither: none)."""

    session_id: str | None = None
    board_id: str | None = None
    users: frozenset[str] = frozenset()
    rooms: frozenset[str] = frozenset()


def access_change(event: str, data: Any) -> AccessChange | None:
    """What the logged event ``event`` (its ``data``) changes of access, as
    the daemon that wrote it handled it: a session's access fields
    (:data:`ACCESS_FIELDS`) recheck its room; a member added or removed,
    that user everywhere; a session or board deleted, or a board given
    another owner, only forget the record.  None: nothing (every event of
    a cluster node's rooms is asked: the event's name first)."""
    if event == "session:updated" or event == "session:deleted":
        if not isinstance(data, Mapping) or not isinstance(data.get("session_id"), str):
            return None
        session_id = str(data["session_id"])
        if event == "session:deleted":
            return AccessChange(session_id=session_id)
        updates = data.get("updates")
        if not isinstance(updates, Mapping) or not ACCESS_FIELDS & set(updates):
            return None
        return AccessChange(session_id=session_id, rooms=frozenset({f"session:{session_id}"}))
    if event not in _BOARD_ACCESS_EVENTS:
        return None
    if not isinstance(data, Mapping) or not isinstance(data.get("board_id"), str):
        return None
    board_id = str(data["board_id"])
    if event == "board:updated":
        updates = data.get("updates")
        if not isinstance(updates, Mapping) or "owner_id" not in updates:
            return None
        return AccessChange(board_id=board_id)
    user = data.get("user_id")
    if event == "board:deleted" or not isinstance(user, str):
        return AccessChange(board_id=board_id)
    return AccessChange(board_id=board_id, users=frozenset({user}))


_BOARD_ACCESS_EVENTS: Final = frozenset(
    {"board:member_added", "board:member_removed", "board:updated", "board:deleted"}
)


def narrower_role(a: str | None, b: str | None) -> str | None:
    """The board role that allows less (None: not a member)."""
    if a is None or b is None:
        return None
    return a if _BOARD_ROLE_LEVEL.get(a, Level.NONE) <= _BOARD_ROLE_LEVEL.get(b, Level.NONE) else b


def _users(value: Any) -> list[str]:
    return [u for u in value if isinstance(u, str)] if isinstance(value, list) else []


def forbidden(message: str) -> ServiceError:
    return ServiceError("forbidden", message)


def board_level(principal: Principal, board: BoardAccess | None) -> Level:
    if principal.is_owner:
        return Level.ADMIN
    if board is None:
        return Level.NONE
    if board.owner_id == principal.user_id:
        return Level.ADMIN
    return _BOARD_ROLE_LEVEL.get(board.members.get(principal.user_id, ""), Level.NONE)


def session_level(principal: Principal, session: SessionAccess, board: BoardAccess | None) -> Level:
    """The principal's level on a session (its role; the mode and the lock
    narrow writes further: :func:`session_write_refusal`)."""
    if principal.is_owner or session.owner_id == principal.user_id:
        return Level.ADMIN
    level = board_level(principal, board) if session.board_id else Level.NONE
    if principal.user_id in session.collaborators:
        level = max(level, Level.WRITE)
    if principal.user_id in session.viewers or session.public:
        level = max(level, Level.READ)
    return level


def session_write_refusal(
    principal: Principal,
    session: SessionAccess,
    board: BoardAccess | None,
    fields: frozenset[str] = frozenset(),
    *,
    remove: bool = False,
) -> str | None:
    """Why the principal may not make this write to the session (its tasks
    and messages, or its ``fields``), or None if it may."""
    level = session_level(principal, session, board)
    if level < Level.READ:
        return "no such session that this user may see"
    if level < Level.WRITE:
        return "a viewer of this session reads and never writes"
    admin_only = (ACCESS_FIELDS - {"locked_by"}) & fields
    if (remove or admin_only) and level < Level.ADMIN:
        what = "delete the session" if remove else f"change {', '.join(sorted(admin_only))}"
        return f"only the session's owner or a board admin may {what}"
    if principal.is_owner:
        return None
    locked = session.locked_by and session.locked_by != principal.user_id
    if locked and not (fields == {"locked_by"} and level >= Level.ADMIN):
        return f"the session is locked by {session.locked_by}"
    if session.mode == "owner" and level < Level.ADMIN:
        return "the session is in owner mode: its owner edits, the others spectate"
    return None


def check_lock_change(principal: Principal, level: Level, value: Any) -> str | None:
    """A writer takes the lock for itself or releases it; an admin sets it."""
    if level >= Level.ADMIN or value in (None, principal.user_id):
        return None
    return "a writer may take the lock only for itself"


def check_permissions(value: Any) -> None:
    """A session's ``permissions``: {collaborators, viewers, public, mode}."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise ServiceError("invalid_field", "permissions must be an object")
    unknown = sorted(set(value) - set(PERMISSION_KEYS))
    if unknown:
        raise ServiceError(
            "invalid_field",
            f"unknown permission(s): {', '.join(unknown)}",
            {"allowed": list(PERMISSION_KEYS)},
        )
    for key in ("collaborators", "viewers"):
        users = value.get(key, [])
        if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
            raise ServiceError("invalid_field", f"permissions.{key} must be a list of user ids")
        if len(users) > USERS_MAX:
            raise ServiceError("invalid_field", f"permissions.{key}: at most {USERS_MAX} users")
        for user in users:
            check_text(f"permissions.{key}", user, ID_CHARS_MAX)
    if "public" in value and not isinstance(value["public"], bool):
        raise ServiceError("invalid_field", "permissions.public must be true or false")
    if "mode" in value and value["mode"] not in MODES:
        raise ServiceError("invalid_field", f"permissions.mode must be one of {', '.join(MODES)}")
