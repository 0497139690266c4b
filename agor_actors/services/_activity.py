"""The activity service's query: a board's log, newest first, filtered by
user and by action."""

from __future__ import annotations

from typing import Any

import attrs

from ..domain import ServiceError

__all__ = ["ActivityFilter", "parse_activity"]


@attrs.frozen
class ActivityFilter:
    board_id: str
    user_id: str | None
    actions: list[str] | None
    before_seq: int | None
    limit: int


def parse_activity(method: str, query: dict[str, Any] | None) -> ActivityFilter:
    """Check an ``activity.find`` query."""
    if method != "find":
        raise ServiceError("unknown_method", "activity has only find")
    q = dict(query or {})
    board = q.pop("board_id", None)
    if not isinstance(board, str) or not board:
        raise ServiceError("invalid_field", "query.board_id is required")
    user = q.pop("user_id", None)
    action = q.pop("action", None)
    actions = [action] if isinstance(action, str) else action
    cursor = q.pop("$cursor", None)
    limit = q.pop("$limit", 50)
    if q:
        raise ServiceError("invalid_field", f"unknown filter(s): {', '.join(sorted(q))}")
    if user is not None and not isinstance(user, str):
        raise ServiceError("invalid_field", "user_id must be a string")
    if actions is not None and not (
        isinstance(actions, list) and all(isinstance(a, str) for a in actions)
    ):
        raise ServiceError("invalid_field", "action must be a string or a list of strings")
    if not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit <= 500:
        raise ServiceError("invalid_field", "$limit must be 1..500")
    before: int | None = None
    if cursor is not None:
        try:
            before = int(cursor)
        except (TypeError, ValueError):
            raise ServiceError("invalid_field", "bad $cursor") from None
    return ActivityFilter(board, user, actions, before, limit)
