"""The mirror's rules, without a server: ``apply_event`` on plain dicts."""

from __future__ import annotations

from typing import Any

import pytest

from agor_actors.client import Mirror, Resources, apply_event
from protocols import Event


def _task(tid: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": tid,
        "session_id": "s",
        "prompt": "",
        "status": "created",
        "updated_at": 1,
        **fields,
    }


def _base() -> Resources:
    return {
        "sessions": {
            "s": {
                "id": "s",
                "status": "idle",
                "title": "t",
                "rev": 1,
                "updated_at": 1,
                "git_state": None,
            }
        },
        "tasks": {"t1": _task("t1")},
        "messages": {
            "m1": {
                "id": "m1",
                "session_id": "s",
                "task_id": "t1",
                "content": "he",
                "streaming": True,
                "updated_at": 1,
            }
        },
        "tool_calls": {"c1": {"id": "c1", "session_id": "s", "task_id": "t1", "status": "started"}},
    }


def test_created_resources_are_added_and_replace_their_optimistic_copy() -> None:
    resources = _base()
    resources["tasks"]["temp-1"] = {"id": "temp-1", "_pending": True}
    apply_event(resources, "task:created", {"task_id": "t2", "task": _task("t2", _seq=9)}, "temp-1")
    assert "temp-1" not in resources["tasks"]
    assert resources["tasks"]["t2"] == _task("t2")  # server extras (_seq) are not kept


@pytest.mark.parametrize(
    ("name", "data", "path", "value"),
    [
        (
            "session:updated",
            {"session_id": "s", "updates": {"title": "new"}, "rev": 2},
            ("sessions", "s", "title"),
            "new",
        ),
        (
            "session:updated",
            {"session_id": "s", "updates": {"title": "new"}, "rev": 2},
            ("sessions", "s", "rev"),
            2,
        ),
        (
            "session:status_changed",
            {"session_id": "s", "status": "running"},
            ("sessions", "s", "status"),
            "running",
        ),
        (
            "git:state_changed",
            {"session_id": "s", "git_state": {"ref": "main"}},
            ("sessions", "s", "git_state"),
            {"ref": "main"},
        ),
        (
            "task:started",
            {"task_id": "t1", "status": "running"},
            ("tasks", "t1", "status"),
            "running",
        ),
        (
            "task:completed",
            {"task_id": "t1", "status": "completed", "result": 3},
            ("tasks", "t1", "result"),
            3,
        ),
        (
            "task:updated",
            {"task_id": "t1", "updates": {"prompt": "p"}},
            ("tasks", "t1", "prompt"),
            "p",
        ),
        (
            "task:message",
            {"task_id": "t1", "message_id": "m1", "chunk": "llo"},
            ("messages", "m1", "content"),
            "hello",
        ),
        (
            "task:message",
            {"message_id": "m1", "streaming": False},
            ("messages", "m1", "streaming"),
            False,
        ),
        (
            "task:tool_call",
            {"task_id": "t1", "tool_call": {"id": "c1", "status": "completed"}},
            ("tool_calls", "c1", "status"),
            "completed",
        ),
    ],
)
def test_changes_merge_into_what_the_mirror_has(
    name: str, data: dict[str, Any], path: tuple[str, str, str], value: Any
) -> None:
    resources = _base()
    apply_event(resources, name, data, ts=50)
    service, ident, field = path
    assert resources[service][ident][field] == value
    if name != "task:tool_call":
        assert resources[service][ident]["updated_at"] == 50


def test_deletes_cascade_like_the_store() -> None:
    resources = _base()
    apply_event(resources, "task:deleted", {"task_id": "t1"})
    assert (
        resources["tasks"] == {} and resources["messages"] == {} and resources["tool_calls"] == {}
    )
    resources = _base()
    apply_event(resources, "session:deleted", {"session_id": "s"})
    assert all(not rows for rows in resources.values())
    resources = _base()
    apply_event(resources, "task:message", {"task_id": "t1", "message_id": "m1", "deleted": True})
    assert resources["messages"] == {} and "t1" in resources["tasks"]


def test_chunks_with_an_offset_are_applied_once() -> None:
    resources = _base()
    apply_event(resources, "task:message", {"message_id": "m1", "chunk": "llo", "offset": 2})
    apply_event(resources, "task:message", {"message_id": "m1", "chunk": "llo", "offset": 2})
    assert resources["messages"]["m1"]["content"] == "hello"


def test_unknown_or_foreign_events_change_nothing() -> None:
    resources = _base()
    for name, data in [
        ("presence:cursor", {"x": 1}),
        ("task:started", {"task_id": "elsewhere", "status": "running"}),
        ("task:message", {"message_id": "elsewhere", "chunk": "x"}),
        ("activity:new", "not a map"),
        ("board:updated", {"board_id": "b", "updates": {"name": "n"}}),
    ]:
        apply_event(resources, name, data)
    assert resources == _base()


async def test_a_mirror_buffers_events_while_it_reloads() -> None:
    mirror = Mirror("session:s")
    mirror._begin_reload("e1", 4)
    mirror._apply(
        Event("session:s", 5, "task:started", {"task_id": "t1", "status": "running"}, ts=9)
    )
    assert mirror.seq == 5 and mirror.snapshot() == {}
    mirror._finish_reload(_base())
    assert mirror.ready.is_set() and mirror.reloads == 1
    assert mirror.get("tasks", "t1") == _task("t1", status="running", updated_at=9)


async def test_optimistic_copies_survive_a_reload_until_settled() -> None:
    mirror = Mirror("session:s")
    mirror._put_optimistic("tasks", "temp-9", {"session_id": "s", "prompt": "soon"})
    mirror._begin_reload("e1", 0)
    mirror._finish_reload({"tasks": {}})
    assert mirror.get("tasks", "temp-9") == {
        "id": "temp-9",
        "session_id": "s",
        "prompt": "soon",
        "_pending": True,
    }
    mirror._settle("tasks", "temp-9", _task("t9", _seq=3))
    assert mirror.items("tasks") == {"t9": _task("t9")}
