"""Bounds on the strings a client writes (in characters), each refused past
its bound with ``invalid_field``: a record's name cannot be 900 KB, nor a
streamed message grow without end.  The frame limit bounds the JSON fields
(``git_state``, ``result``, a tool's ``input``) already."""

from __future__ import annotations

from typing import Any, Final

from ._api import ServiceError

__all__ = [
    "CHUNK_CHARS_MAX",
    "CONTENT_CHARS_MAX",
    "DESCRIPTION_CHARS_MAX",
    "ID_CHARS_MAX",
    "MESSAGE_CHARS_MAX",
    "NAME_CHARS_MAX",
    "PROMPT_CHARS_MAX",
    "check_json",
    "check_text",
]

NAME_CHARS_MAX: Final = 1_000
"""A board's or user's name, a session's title or agent, a tool's name."""
ID_CHARS_MAX: Final = 128
"""An id a client names (ids the daemon draws are far shorter)."""
DESCRIPTION_CHARS_MAX: Final = 64 * 1024
"""A board's description."""
PROMPT_CHARS_MAX: Final = 256 * 1024
"""A task's prompt."""
CONTENT_CHARS_MAX: Final = 256 * 1024
"""A message's content as created."""
CHUNK_CHARS_MAX: Final = 64 * 1024
"""One streamed chunk of a message."""
MESSAGE_CHARS_MAX: Final = 4 * 1024 * 1024
"""A streamed message's content in all."""


def check_text(field: str, value: Any, chars_max: int) -> None:
    """Refuse (``invalid_field``) a string ``value`` of more than ``chars_max``
    characters, or holding a NUL; other types are the caller's to check."""
    if isinstance(value, str):
        if len(value) > chars_max:
            raise ServiceError(
                "invalid_field",
                f"{field} is longer than {chars_max} characters",
                {"field": field, "chars_max": chars_max},
            )
        if "\x00" in value:
            raise _nul(field)


def check_json(field: str, value: Any) -> None:
    """Refuse (``invalid_field``) a JSON value with a NUL in any of its
    strings or keys.  (PostgreSQL keeps no NUL in a text or a JSON value; it
    is refused on every store alike, before it is written.)"""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if "\x00" in node:
                raise _nul(field)
        elif isinstance(node, dict):
            for key, item in node.items():
                if isinstance(key, str) and "\x00" in key:
                    raise _nul(field)
                stack.append(item)
        elif isinstance(node, list):
            stack.extend(node)


def _nul(field: str) -> ServiceError:
    return ServiceError(
        "invalid_field",
        f"{field} holds a NUL character (\\u0000), which the store does not keep",
        {"field": field},
    )
