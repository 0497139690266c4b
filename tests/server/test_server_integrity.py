"""Integrity over HTTP: a stale If-Match is 412 with the current record, a
PATCH answers the record, and no SQL or column name reaches a client."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator

import pytest
from server_support import Daemon, daemon, http


@pytest.fixture
async def running(tmp_path: pathlib.Path) -> AsyncIterator[Daemon]:
    async with daemon(tmp_path / "agor") as d:
        yield d


async def test_a_stale_if_match_is_412_with_the_current_record(running: Daemon) -> None:
    base, token = running.http_url, running.token
    session = (await http("POST", f"{base}/sessions", token=token, json={"title": "t"})).body
    task = (
        await http("POST", f"{base}/tasks", token=token, json={"session_id": session["id"]})
    ).body
    board = (await http("POST", f"{base}/boards", token=token, json={"name": "b"})).body
    for path, rev, body in (
        (f"/tasks/{task['id']}", task["rev"], {"prompt": "x"}),
        (f"/boards/{board['id']}", board["rev"], {"name": "x"}),
    ):
        stale = await http(
            "PATCH", base + path, token=token, json=body, headers={"If-Match": f'"{rev + 5}"'}
        )
        assert stale.status == 412, (path, stale)
        assert stale.body["code"] == "conflict"
        assert stale.body["data"]["rev"] == rev
        current = stale.body["data"]["current"]
        assert isinstance(current, dict) and "x" not in current.values()
        fresh = await http(
            "PATCH", base + path, token=token, json=body, headers={"If-Match": f'"{rev}"'}
        )
        assert fresh.status == 200, (path, fresh)
        # every service answers the record, not {task_id, updates}
        assert fresh.body["id"] == path.rsplit("/", 1)[1]
        assert "x" in fresh.body.values() and "rev" in fresh.body
    # a session's title merges (by clock) whatever the base; its answer is the record
    merged = await http(
        "PATCH",
        f"{base}/sessions/{session['id']}",
        token=token,
        json={"title": "x"},
        headers={"If-Match": '"99"'},
    )
    assert merged.status == 200 and merged.body["title"] == "x", merged
    gone = await http(
        "DELETE", f"{base}/boards/{board['id']}", token=token, headers={"If-Match": '"99"'}
    )
    assert gone.status == 412
    assert (await http("GET", f"{base}/boards/{board['id']}", token=token)).status == 200


async def test_store_errors_do_not_show_sql(running: Daemon) -> None:
    base, token = running.http_url, running.token
    session = await http("POST", f"{base}/sessions", token=token, json={"title": "t"})
    # a message's task that is none: refused by name, before the store
    refused = await http(
        "POST",
        f"{base}/messages",
        token=token,
        json={"session_id": session.body["id"], "task_id": "no-such-task", "role": "user"},
    )
    assert refused.status == 400 and refused.body["code"] == "invalid_field", refused
    assert refused.body["message"].startswith("task_id: there is no task no-such-task")
    text = str(refused.body).lower()
    for leak in ("foreign key", "constraint", "sqlite", "select", "messages."):
        assert leak not in text, refused.body
    # a refused find names the client's own key, and only the columns a find may name
    query = await http("GET", f"{base}/sessions?token_hash=x", token=token)
    assert query.status == 400, query.body
    said = str(query.body["message"])
    assert "unknown column 'token_hash'" in said, said
    for hidden in ("token_hash", "clocks"):
        assert hidden not in said.partition("columns:")[2], said
