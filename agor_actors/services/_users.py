"""The users service: the owner creates users, each with a token of its own
(shown once)."""

from __future__ import annotations

from typing import Any

import attrs

from ..domain import ServiceError
from ..domain.fields import NAME_CHARS_MAX, check_text
from ..store import Mutation, WriteRequest, hash_token

__all__ = ["UserPlan", "plan_user"]


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
