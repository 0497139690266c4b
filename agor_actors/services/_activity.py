"""The activity service's query: a board's log, newest first, filtered by
user and by action."""

from __future__ import annotations

from typing import Any, Final

import attrs

from ..domain import ServiceError
from ..domain.fields import ID_CHARS_MAX, NAME_CHARS_MAX, check_text

__all__ = ["ACTIONS_MAX", "ActivityFilter", "parse_activity"]

ACTIONS_MAX: Final = 100
"""The most action names one query filters by (there are a few dozen
kinds of event; a longer list is a mistake, and past 65,535 names
PostgreSQL refuses the statement)."""

_SEQ_MAX: Final = 2**63 - 1


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
    check_text("query.board_id", board, ID_CHARS_MAX)
    user = q.pop("user_id", None)
    action = q.pop("action", None)
    actions = [action] if isinstance(action, str) else action
    cursor = q.pop("$cursor", None)
    limit = q.pop("$limit", 50)
    if q:
        raise ServiceError("invalid_field", f"unknown filter(s): {', '.join(sorted(q))}")
    if user is not None:
        if not isinstance(user, str):
            raise ServiceError("invalid_field", "user_id must be a string")
        check_text("query.user_id", user, ID_CHARS_MAX)
    if actions is not None:
        if not (isinstance(actions, list) and all(isinstance(a, str) for a in actions)):
            raise ServiceError("invalid_field", "action must be a string or a list of strings")
        if len(actions) > ACTIONS_MAX:
            raise ServiceError(
                "invalid_field", f"action names at most {ACTIONS_MAX} actions, got {len(actions)}"
            )
        for name in actions:
            check_text("query.action", name, NAME_CHARS_MAX)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit <= 500:
        raise ServiceError("invalid_field", "$limit must be 1..500")
    return ActivityFilter(board, user, actions, _before(cursor), limit)


def _before(cursor: Any) -> int | None:
    """The seq a ``$cursor`` names (the ``next_cursor`` of a page: a decimal
    string), or None for none."""
    if cursor is None:
        return None
    if isinstance(cursor, str) and cursor.isascii() and cursor.isdigit() and len(cursor) <= 19:
        before = int(cursor)
    elif isinstance(cursor, int) and not isinstance(cursor, bool):
        before = cursor
    else:
        raise ServiceError("invalid_field", "bad $cursor: give a page's next_cursor")
    if not 0 <= before <= _SEQ_MAX:
        raise ServiceError("invalid_field", "bad $cursor: give a page's next_cursor")
    return before
