"""What a client mirrors of a room, built two ways: by applying the room's
events one by one (the mirror), and from rows (a reload through ``get`` and
``find``, or the store itself at the end of a run).  The two must agree.

A session room (``session:<id>``) mirrors the session's fields, its tasks
and its messages; a board room (``board:<id>``) the board's fields and the
board-visible fields of the sessions on it.  Timestamps and revisions are
not mirrored (they change without events).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from agor_actors.store import SqlStore
from protocols import Event

__all__ = [
    "BOARD_FIELDS",
    "BOARD_VISIBLE",
    "MESSAGE_FIELDS",
    "SESSION_FIELDS",
    "TASK_FIELDS",
    "ModelError",
    "View",
    "activity_view",
    "apply_event",
    "board_view",
    "empty_view",
    "log_room",
    "room_kind",
    "server_view",
    "session_view",
]

View = dict[str, Any]

SESSION_FIELDS: Final = (
    "title",
    "status",
    "agent",
    "git_state",
    "board_id",
    "owner_id",
    "locked_by",
    "permissions",
)
BOARD_VISIBLE: Final = ("title", "status", "agent", "board_id", "owner_id")
TASK_FIELDS: Final = ("prompt", "status", "result", "error")
MESSAGE_FIELDS: Final = ("task_id", "role", "content", "streaming")
BOARD_FIELDS: Final = ("name", "description")

_TASK_STATUS_EVENTS: Final = {
    "task:started": "running",
    "task:completed": "completed",
    "task:failed": "failed",
    "task:stopped": "stopped",
}


class ModelError(Exception):
    """An event that a mirror cannot apply."""


def _pick(row: Mapping[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    return {f: row.get(f) for f in fields}


def room_kind(room: str) -> tuple[str, str]:
    kind, _, ident = room.partition(":")
    if kind not in ("session", "board", "activity") or not ident:
        raise ModelError(f"not a room the simulator mirrors: {room!r}")
    return kind, ident


def log_room(room: str) -> str:
    """The room whose log ``room`` shows: ``activity:<board>`` is the
    board room's log, projected (same seqs)."""
    kind, ident = room_kind(room)
    return f"board:{ident}" if kind == "activity" else room


def empty_view(room: str) -> View:
    kind, _ = room_kind(room)
    if kind == "session":
        return {"session": None, "tasks": {}, "messages": {}}
    if kind == "activity":
        return {"head": 0}
    return {"board": None, "sessions": {}}


def activity_view(newest: Mapping[str, Any] | None) -> View:
    """An activity stream's mirror: the seq of its newest entry (the
    ``activity`` service's newest entry on a reload; 0 for none)."""
    return {"head": 0 if newest is None else int(newest["id"])}


def session_view(
    session: Mapping[str, Any] | None,
    tasks: Iterable[Mapping[str, Any]],
    messages: Iterable[Mapping[str, Any]],
) -> View:
    return {
        "session": None if session is None else _pick(session, SESSION_FIELDS),
        "tasks": {t["id"]: _pick(t, TASK_FIELDS) for t in tasks},
        "messages": {m["id"]: _pick(m, MESSAGE_FIELDS) for m in messages},
    }


def board_view(board: Mapping[str, Any] | None, sessions: Iterable[Mapping[str, Any]]) -> View:
    return {
        "board": None if board is None else _pick(board, BOARD_FIELDS),
        "sessions": {s["id"]: _pick(s, BOARD_VISIBLE) for s in sessions},
    }


def _data(event: Event) -> dict[str, Any]:
    if not isinstance(event.data, dict):
        raise ModelError(f"{event.event} seq {event.seq}: data is not a map")
    return event.data


def apply_event(view: View, room: str, event: Event) -> None:
    """Apply one event of ``room`` to ``view`` in place."""
    kind, ident = room_kind(room)
    data = _data(event)
    if kind == "session":
        _apply_session(view, ident, event, data)
    elif kind == "activity":
        if event.event != "activity:new" or data.get("id") != event.seq:
            raise ModelError(f"{event.event} seq {event.seq}: not an activity entry of its seq")
        view["head"] = max(view["head"], event.end_seq)
    else:
        _apply_board(view, event, data)


def _apply_session(view: View, ident: str, event: Event, data: dict[str, Any]) -> None:
    name = event.event
    session = view["session"]
    if name == "session:created":
        view["session"] = _pick(data["session"], SESSION_FIELDS)
    elif name == "session:deleted":
        view["session"] = None
    elif name in ("session:updated", "session:status_changed", "git:state_changed"):
        if session is None:
            raise ModelError(f"{name} seq {event.seq} for a session the mirror does not have")
        if name == "session:updated":
            session.update({k: v for k, v in data["updates"].items() if k in SESSION_FIELDS})
        elif name == "session:status_changed":
            session["status"] = data["status"]
        else:
            session["git_state"] = data["git_state"]
    elif name == "task:created":
        view["tasks"][data["task_id"]] = _pick(data["task"], TASK_FIELDS)
    elif name in _TASK_STATUS_EVENTS or name in ("task:updated", "task:deleted"):
        task = view["tasks"].get(data["task_id"])
        if task is None:
            raise ModelError(f"{name} seq {event.seq} for a task the mirror does not have")
        if name == "task:deleted":
            del view["tasks"][data["task_id"]]
        elif name == "task:updated":
            task.update({k: v for k, v in data["updates"].items() if k in TASK_FIELDS})
        else:
            task["status"] = _TASK_STATUS_EVENTS[name]
            for field in ("result", "error"):
                if field in data:
                    task[field] = data[field]
    elif name == "task:tool_call":
        pass  # tool calls are not mirrored
    elif name == "task:message":
        _apply_message(view, event, data)
    else:
        raise ModelError(f"unknown event {name!r} (seq {event.seq}) in a session room")


def _apply_message(view: View, event: Event, data: dict[str, Any]) -> None:
    messages = view["messages"]
    if "message" in data:
        messages[data["message"]["id"]] = _pick(data["message"], MESSAGE_FIELDS)
        return
    message = messages.get(data.get("message_id"))
    if message is None:
        raise ModelError(f"task:message seq {event.seq} for a message the mirror does not have")
    if data.get("deleted"):
        del messages[data["message_id"]]
    elif "chunk" in data:
        message["content"] = _with_chunk(
            message["content"] or "", data["chunk"], data.get("offset"), event.seq
        )
        message["streaming"] = True
    elif "streaming" in data:
        message["streaming"] = data["streaming"]
    else:
        raise ModelError(f"task:message seq {event.seq}: neither message, chunk nor streaming")


def _with_chunk(content: str, chunk: str, offset: Any, seq: int) -> str:
    """``content`` with ``chunk`` at ``offset`` (the content's length before
    the chunk, when the event says).  A chunk the content already holds (a
    reload read it) is not applied twice; a chunk past the end is a hole."""
    if offset is None:
        return content + chunk
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise ModelError(f"task:message seq {seq}: bad offset {offset!r}")
    if offset > len(content):
        raise ModelError(f"task:message seq {seq}: chunk at {offset} past the end {len(content)}")
    if offset + len(chunk) <= len(content):
        if content[offset : offset + len(chunk)] != chunk:
            raise ModelError(f"task:message seq {seq}: the content at {offset} is not the chunk")
        return content
    return content[:offset] + chunk


def _apply_board(view: View, event: Event, data: dict[str, Any]) -> None:
    name = event.event
    sessions = view["sessions"]
    if name == "board:created":
        view["board"] = _pick(data["board"], BOARD_FIELDS)
    elif name == "board:updated":
        if view["board"] is None:
            raise ModelError(f"board:updated seq {event.seq} for a board the mirror does not have")
        view["board"].update({k: v for k, v in data["updates"].items() if k in BOARD_FIELDS})
    elif name == "board:deleted":
        view["board"] = None
    elif name in ("board:member_added", "board:member_removed"):
        if view["board"] is None:
            raise ModelError(f"{name} seq {event.seq} for a board the mirror does not have")
        # membership is not mirrored (a board's rows hold no members)
    elif name == "session:created":
        session = data["session"]
        sessions[session["id"]] = _pick(session, BOARD_VISIBLE)
    elif name == "session:updated":
        updates = {k: v for k, v in data["updates"].items() if k in BOARD_VISIBLE}
        sessions.setdefault(data["session_id"], {}).update(updates)
    elif name == "session:status_changed":
        entry = sessions.get(data["session_id"])
        if entry is None:
            raise ModelError(f"{name} seq {event.seq} for a session not on the mirrored board")
        entry["status"] = data["status"]
    elif name == "session:deleted":
        sessions.pop(data["session_id"], None)
    elif name.startswith("task:"):
        pass  # task activity on a board is not mirrored (the session room has it)
    else:
        raise ModelError(f"unknown event {name!r} (seq {event.seq}) in a board room")


def _find_all(store: SqlStore, table: str, query: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        page = store.find(
            table, {**query, "$limit": 500, **({"$cursor": cursor} if cursor else {})}
        )
        rows.extend(page.items)
        cursor = page.next_cursor
        if cursor is None:
            return rows


def server_view(store: SqlStore, room: str) -> View:
    """The room as the store has it now (plain reads: call it when no write
    is in flight, or inline on the trio thread)."""
    kind, ident = room_kind(room)
    if kind == "session":
        return session_view(
            store.get("sessions", ident),
            _find_all(store, "tasks", {"session_id": ident}),
            _find_all(store, "messages", {"session_id": ident}),
        )
    if kind == "activity":
        head = store.room_head(log_room(room))
        return {"head": 0 if head is None else head[1]}
    return board_view(store.get("boards", ident), _find_all(store, "sessions", {"board_id": ident}))
