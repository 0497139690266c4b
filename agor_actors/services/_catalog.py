"""The services a call may name, and what kind of call each method is."""

from __future__ import annotations

from typing import Any, Final

from ..domain import ServiceError
from ..domain.fields import ID_CHARS_MAX, check_text

__all__ = [
    "MINTS_ID",
    "READ_METHODS",
    "READ_ONLY",
    "SERVICES",
    "SESSION_SCOPED",
    "check_call",
    "public",
]

SERVICES: Final = ("boards", "sessions", "tasks", "messages", "tool_calls", "users", "activity")
READ_ONLY: Final = ("tool_calls",)  # written through tasks.tool_call / tasks.tool_result
SESSION_SCOPED: Final = ("tasks", "messages")
"""Services whose records belong to a session (written by its actor)."""
READ_METHODS: Final = ("find", "get")
MINTS_ID: Final = ("create", "tool_call")
"""The methods that need a new id (drawn from the entropy seam only for them:
a streamed chunk needs none, and drawing one cost ~5% of its CPU)."""


def check_call(service: str, id: Any) -> None:
    """Refuse a call to no service or with a malformed id."""
    if service not in SERVICES:
        raise ServiceError("unknown_service", f"no service {service!r}")
    if id is not None and not isinstance(id, str):
        raise ServiceError("invalid_field", "id must be a string")
    check_text("id", id, ID_CHARS_MAX)


def public(row: dict[str, Any]) -> dict[str, Any]:
    """A record as clients see it: no merge clocks, no token hash."""
    return {k: v for k, v in row.items() if k not in ("clocks", "token_hash")}
