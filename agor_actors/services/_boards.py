"""The boards service: validation, the write of each call and the events it
produces.  Pure: :func:`plan_board` returns what to write and what to answer;
the hub runs it."""

from __future__ import annotations

from typing import Any, Final

import attrs

from ..domain import Principal, ServiceError
from ..domain.fields import DESCRIPTION_CHARS_MAX, ID_CHARS_MAX, NAME_CHARS_MAX, check_text
from ..store import EventDraft, Expect, Mutation, WriteRequest

__all__ = ["BOARD_FIELDS", "MEMBER_METHODS", "MEMBER_ROLES", "BoardCall", "BoardPlan", "plan_board"]

BOARD_FIELDS: Final = ("name", "description", "owner_id")
MEMBER_ROLES: Final = ("admin", "editor", "viewer")
"""The roles a member is given (the board's creator holds ``owner``):
admins manage the board and its members, editors write, viewers read."""
MEMBER_METHODS: Final = ("add_member", "remove_member")
"""``data: {user_id, role}`` / ``data: {user_id}``: a board admin's."""


@attrs.frozen
class BoardCall:
    principal: Principal
    connection_id: str | None
    method: str
    id: str | None
    data: Any
    now_ms: int
    new_id: str
    temp_id: str | None
    base_rev: int | None


@attrs.frozen
class BoardPlan:
    """What a board call writes; ``answer`` once durable (None: the board as
    it is then).  ``revoked``: a user whose membership this write ends or
    narrows (their subscriptions are checked again once it is durable)."""

    request: WriteRequest
    answer: dict[str, Any] | None = None
    revoked: str | None = None
    role: str | None = None
    """``revoked``'s role once the write is durable (None: no membership)."""


def _values(data: Any) -> dict[str, Any]:
    values = data if isinstance(data, dict) else {}
    unknown = sorted(set(values) - set(BOARD_FIELDS))
    if unknown:
        raise ServiceError("invalid_field", f"unknown field(s): {', '.join(unknown)}")
    for k, v in values.items():
        if v is not None and not isinstance(v, str):
            raise ServiceError("invalid_field", f"{k} must be a string")
    check_text("name", values.get("name"), NAME_CHARS_MAX)
    check_text("description", values.get("description"), DESCRIPTION_CHARS_MAX)
    check_text("owner_id", values.get("owner_id"), ID_CHARS_MAX)
    if "name" in values and not values["name"]:
        raise ServiceError("invalid_field", "name must not be empty")
    if "owner_id" in values and not values["owner_id"]:
        raise ServiceError("invalid_field", "owner_id must be a user id")
    return dict(values)


def _event(call: BoardCall, board_id: str, name: str, payload: Any) -> EventDraft:
    return EventDraft(
        f"board:{board_id}",
        name,
        payload,
        call.now_ms,
        call.principal.user_id,
        call.connection_id,
        call.temp_id,
    )


def plan_board(call: BoardCall, current: dict[str, Any] | None) -> BoardPlan:
    """The write of one board call.  ``current`` is the board as stored
    (None for ``create``, or when it does not exist)."""
    if call.method == "create":
        return _create(call)
    if call.id is None:
        raise ServiceError("invalid_field", "id is required")
    if current is None:
        raise ServiceError("not_found", f"no board {call.id}")
    rev = int(current["rev"])
    if call.base_rev is not None and call.base_rev != rev:
        raise ServiceError(
            "conflict",
            f"stale base_rev {call.base_rev}; the board is at rev {rev}",
            {"current": current, "rev": rev},
        )
    # the write holds only at the revision it was planned on
    expect = (Expect("boards", {"id": call.id}, "rev", rev),)
    if call.method in ("patch", "update"):
        values = _values(call.data)
        if not values:
            raise ServiceError("invalid_field", "nothing to change")
        return _touch(call, rev, expect, values, "board:updated", {"updates": values})
    if call.method == "remove":
        return BoardPlan(
            WriteRequest(
                mutations=(Mutation("delete", "boards", {"id": call.id}),),
                events=(_event(call, call.id, "board:deleted", {"board_id": call.id}),),
                expect=expect,
            ),
            {"id": call.id},
        )
    if call.method in MEMBER_METHODS:
        return _member(call, rev, expect)
    raise ServiceError("unknown_method", f"boards.{call.method} does not exist")


def _create(call: BoardCall) -> BoardPlan:
    values = _values(call.data)
    if not values.get("name"):
        raise ServiceError("invalid_field", "data.name is required")
    if values.get("owner_id", call.principal.user_id) != call.principal.user_id:
        raise ServiceError("invalid_field", "a new board is owned by its creator")
    row = {
        "id": call.new_id,
        "name": values["name"],
        "description": values.get("description"),
        "owner_id": call.principal.user_id,
        "created_at": call.now_ms,
        "updated_at": call.now_ms,
        "rev": 1,
    }
    member = Mutation(
        "insert",
        "board_members",
        {"board_id": call.new_id, "user_id": call.principal.user_id},
        {"role": "owner"},
    )
    board = Mutation(
        "insert", "boards", {"id": call.new_id}, {k: v for k, v in row.items() if k != "id"}
    )
    event = _event(
        call, call.new_id, "board:created", {"board_id": call.new_id, "board": row, "rev": 1}
    )
    return BoardPlan(WriteRequest(mutations=(board, member), events=(event,)), row)


def _touch(
    call: BoardCall,
    rev: int,
    expect: tuple[Expect, ...],
    values: dict[str, Any],
    event: str,
    payload: dict[str, Any],
    *more: Mutation,
) -> BoardPlan:
    """An update of the board itself (its fields, or its members) at the
    next revision, announced with that revision."""
    assert call.id is not None
    new_rev = rev + 1
    update = Mutation(
        "update", "boards", {"id": call.id}, {**values, "updated_at": call.now_ms, "rev": new_rev}
    )
    draft = _event(call, call.id, event, {"board_id": call.id, **payload, "rev": new_rev})
    return BoardPlan(WriteRequest(mutations=(update, *more), events=(draft,), expect=expect))


def _member(call: BoardCall, rev: int, expect: tuple[Expect, ...]) -> BoardPlan:
    assert call.id is not None
    data = call.data if isinstance(call.data, dict) else {}
    user = data.get("user_id")
    if not isinstance(user, str) or not user:
        raise ServiceError("invalid_field", "data.user_id is required")
    check_text("user_id", user, ID_CHARS_MAX)
    key = {"board_id": call.id, "user_id": user}
    if call.method == "add_member":
        role = data.get("role", "editor")
        if role not in MEMBER_ROLES:
            raise ServiceError("invalid_field", f"role must be one of {', '.join(MEMBER_ROLES)}")
        fields, event, after = {"user_id", "role"}, "board:member_added", role
        payload: dict[str, Any] = {"user_id": user, "role": role}
        change = Mutation("upsert", "board_members", key, {"role": role})
    else:
        fields, event, after = {"user_id"}, "board:member_removed", None
        payload = {"user_id": user}
        change = Mutation("delete", "board_members", key)
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ServiceError("invalid_field", f"unknown field(s): {', '.join(unknown)}")
    plan = _touch(call, rev, expect, {}, event, payload, change)
    # a membership ended or a role narrowed (an editor made a viewer): the
    # user's subscriptions are checked again
    return attrs.evolve(plan, revoked=user, role=after)
