"""Hypothesis strategies for every protocol message (shared by the tests)."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from protocols import (
    MAX_REF,
    Auth,
    Call,
    Cursor,
    Error,
    ErrorInfo,
    Event,
    Hello,
    Join,
    Joined,
    Lagged,
    Leave,
    Left,
    Message,
    Ping,
    Pong,
    Presence,
    PresenceUpdate,
    Result,
    Since,
    Viewport,
    Welcome,
)

INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
FLOATS = st.floats(allow_nan=False, allow_infinity=False)
TEXT = st.text(max_size=20)
ROOMS = st.sampled_from(["session:", "board:", "user:"]).flatmap(
    lambda kind: st.text(min_size=1, max_size=12).map(lambda rest: kind + rest)
)
REFS = st.integers(min_value=0, max_value=MAX_REF)
SEQS = st.integers(min_value=0, max_value=2**53)
SCALARS = st.none() | st.booleans() | INT64 | FLOATS | TEXT


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Values of the JSON data model, at most 4 levels deep."""

    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4)

    return st.recursive(SCALARS, extend, max_leaves=max_leaves).filter(
        lambda value: _depth(value) <= 4
    )


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


MAPS = st.dictionaries(TEXT, json_values(6), max_size=4)
CURSORS = st.builds(Cursor, FLOATS, FLOATS)
VIEWPORTS = st.builds(Viewport, FLOATS, FLOATS, FLOATS, FLOATS, FLOATS)
SINCES = st.builds(Since, TEXT, SEQS)
ERROR_INFOS = st.builds(ErrorInfo, TEXT, TEXT, json_values(6))


def _event(room: str, seq: int, span: int | None, **rest: Any) -> Event:
    return Event(room, seq, last_seq=None if span is None else seq + span, **rest)


CLIENT_MESSAGES: dict[type, st.SearchStrategy[Any]] = {
    Hello: st.builds(Hello, st.integers(0, 10), optional(TEXT), optional(TEXT)),
    Call: st.builds(
        Call,
        REFS,
        TEXT,
        st.sampled_from(["find", "get", "create", "update", "patch", "remove", "stream"]),
        optional(TEXT),
        json_values(),
        optional(MAPS),
        optional(TEXT),
        optional(SEQS),
    ),
    Auth: st.builds(Auth, REFS, TEXT),
    Join: st.builds(Join, ROOMS, optional(SINCES)),
    Leave: st.builds(Leave, ROOMS),
    PresenceUpdate: st.builds(
        PresenceUpdate,
        optional(TEXT),
        optional(CURSORS),
        optional(VIEWPORTS),
        optional(TEXT),
        optional(st.booleans()),
        optional(st.booleans()),
        optional(TEXT),
    ),
    Ping: st.builds(Ping, INT64),
}

SERVER_MESSAGES: dict[type, st.SearchStrategy[Any]] = {
    Welcome: st.builds(
        Welcome, TEXT, TEXT, st.integers(1, 10**6), MAPS, optional(st.integers(0, 2**53))
    ),
    Result: st.one_of(
        st.builds(Result, REFS, st.just(True), json_values()),
        st.builds(Result, REFS, st.just(False), json_values(), ERROR_INFOS),
    ),
    Joined: st.builds(Joined, ROOMS, TEXT, SEQS, st.booleans()),
    Event: st.builds(
        _event,
        ROOMS,
        SEQS,
        optional(st.integers(0, 50)),
        event=st.sampled_from(["task:created", "task:message", "session:updated"]),
        data=json_values(),
        ts=optional(st.integers(0, 2**53)),
        user_id=optional(TEXT),
        origin=optional(TEXT),
        temp_id=optional(TEXT),
    ),
    Presence: st.builds(
        Presence,
        TEXT,
        optional(st.lists(MAPS, max_size=3)),
        optional(st.lists(MAPS, max_size=3)),
        optional(VIEWPORTS),
    ),
    Lagged: st.builds(Lagged, ROOMS, SEQS),
    Left: st.builds(Left, ROOMS, TEXT),
    Error: st.builds(Error, TEXT, TEXT),
    Pong: st.builds(Pong, INT64),
}

client_messages: st.SearchStrategy[Message] = st.one_of(*CLIENT_MESSAGES.values())
server_messages: st.SearchStrategy[Message] = st.one_of(*SERVER_MESSAGES.values())
