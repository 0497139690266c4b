"""The users service: the owner creates users, each with a token of its own
(shown once) and renews it (``rotate_token``: the old one is refused from
then on), and removes them (they sign in no more, by any means)."""

from __future__ import annotations

from typing import Any

import attrs

from ..domain import ServiceError
from ..domain.fields import NAME_CHARS_MAX, check_text
from ..store import Mutation, WriteRequest, hash_token

__all__ = ["UserPlan", "plan_token_rotation", "plan_user", "plan_user_removal"]


@attrs.frozen
class UserPlan:
    """The write, and the answer once it is durable."""

    request: WriteRequest
    answer: dict[str, Any]


def plan_user(method: str, data: Any, now_ms: int, new_id: str, token: str) -> UserPlan:
    """``users.create``: ``token`` is the new user's (its hash is stored)."""
    if method != "create":
        raise ServiceError("unknown_method", f"users.{method} is not supported")
    name = data.get("name") if isinstance(data, dict) else None
    if not isinstance(name, str) or not name:
        raise ServiceError("invalid_field", "data.name is required")
    check_text("name", name, NAME_CHARS_MAX)
    row = {"name": name, "token_hash": hash_token(token), "is_owner": False, "created_at": now_ms}
    request = WriteRequest(mutations=(Mutation("insert", "users", {"id": new_id}, row),))
    return UserPlan(request, {"id": new_id, "name": name, "token": token})


def plan_user_removal(user_id: str, now_ms: int, token: str, has_password: bool) -> WriteRequest:
    """``users.remove``: the user is marked removed and its token replaced
    by ``token`` (never shown: the old one stops working); its password,
    if it has one, is deleted.  The row stays: records and history name
    it."""
    mutations = [
        Mutation(
            "update",
            "users",
            {"id": user_id},
            {"removed_at": now_ms, "token_hash": hash_token(token)},
        )
    ]
    if has_password:
        mutations.append(Mutation("delete", "credentials", {"user_id": user_id}))
    return WriteRequest(mutations=tuple(mutations))


def plan_token_rotation(user_id: str, token: str) -> WriteRequest:
    """``users.rotate_token``: the user's token becomes ``token`` (its hash
    is stored; the old one finds no one)."""
    return WriteRequest(
        mutations=(Mutation("update", "users", {"id": user_id}, {"token_hash": hash_token(token)}),)
    )
