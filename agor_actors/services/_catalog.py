"""The services a call may name, and what kind of call each method is."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from ..domain import ServiceError
from ..domain.fields import ID_CHARS_MAX, check_text

__all__ = [
    "METHODS",
    "MINTS_ID",
    "READ_METHODS",
    "SERVICES",
    "SESSION_SCOPED",
    "check_call",
    "public",
]

SESSION_SCOPED: Final = ("tasks", "messages")
"""Services whose records belong to a session (written by its actor)."""
READ_METHODS: Final = ("find", "get")
MINTS_ID: Final = ("create", "tool_call")
"""The methods that need a new id (drawn from the entropy seam only for them:
a streamed chunk needs none, and drawing one cost ~5% of its CPU)."""


_WRITES: Final = ("create", "patch", "update", "remove")
METHODS: Final[Mapping[str, tuple[str, ...]]] = {
    "boards": (*READ_METHODS, *_WRITES, "add_member", "remove_member"),
    "sessions": (*READ_METHODS, *_WRITES, "set_status", "set_git_state"),
    "tasks": (
        *READ_METHODS,
        *_WRITES,
        "start",
        "complete",
        "fail",
        "stop",
        "tool_call",
        "tool_result",
    ),
    "messages": (*READ_METHODS, "create", "stream", "finish", "remove"),
    "tool_calls": READ_METHODS,  # written through tasks.tool_call / tasks.tool_result
    "users": (*READ_METHODS, "create", "patch", "remove", "rotate_token"),
    "activity": ("find",),
}
"""Every service's methods: a call to another is refused (``unknown_method``)
before anything reads its id (so a misspelt method is not answered
``not_found`` or ``id is required``)."""
SERVICES: Final = tuple(METHODS)


def check_call(service: str, method: str, id: Any) -> None:
    """Refuse a call to no service, to a method its service does not have,
    or with a malformed id."""
    methods = METHODS.get(service)
    if methods is None:
        raise ServiceError("unknown_service", f"no service {service!r}")
    if method not in methods:
        raise ServiceError(
            "unknown_method",
            f"{service}.{method:.64} does not exist; {service} has {', '.join(methods)}",
        )
    if id is not None and not isinstance(id, str):
        raise ServiceError("invalid_field", "id must be a string")
    check_text("id", id, ID_CHARS_MAX)


def public(row: dict[str, Any]) -> dict[str, Any]:
    """A record as clients see it: no merge clocks, no token hash."""
    return {k: v for k, v in row.items() if k not in ("clocks", "token_hash")}
