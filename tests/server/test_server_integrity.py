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
    # a session's title merges (by clock) with no If-Match; with one, the
    # whole write holds only at that rev (RFC 9110), a merged field's too
    url = f"{base}/sessions/{session['id']}"
    stale = await http("PATCH", url, token=token, json={"title": "x"}, headers={"If-Match": '"99"'})
    assert stale.status == 412 and stale.body["code"] == "conflict", stale
    assert stale.body["data"] == {"current": {"title": "t"}, "rev": session["rev"]}
    assert (await http("GET", url, token=token)).body["title"] == "t"  # nothing changed
    rev = session["rev"]
    fresh = await http(
        "PATCH", url, token=token, json={"title": "x"}, headers={"If-Match": f'"{rev}"'}
    )
    assert fresh.status == 200 and fresh.body["title"] == "x" and fresh.body["rev"] == rev + 1
    assert fresh.headers["etag"] == f'"{rev + 1}"'
    anyone = await http("PATCH", url, token=token, json={"title": "y"}, headers={"If-Match": "*"})
    assert anyone.status == 200 and anyone.body["title"] == "y", anyone
    merged = await http("PATCH", url, token=token, json={"title": "z"})
    assert merged.status == 200 and merged.body["title"] == "z", merged
    # a session's remove too (as a task's, a message's or a board's)
    kept = await http("DELETE", url, token=token, headers={"If-Match": f'"{rev}"'})
    assert kept.status == 412 and kept.body["data"]["rev"] == merged.body["rev"], kept
    assert (await http("GET", url, token=token)).status == 200
    removed = await http(
        "DELETE", url, token=token, headers={"If-Match": f'"{merged.body["rev"]}"'}
    )
    assert removed.status == 200, removed
    assert (await http("GET", url, token=token)).status == 404
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


async def test_if_match_on_a_user_which_has_no_revision_is_412(running: Daemon) -> None:
    """Users carry no rev (their answers no ETag), so no If-Match but ``*``
    can hold for them (RFC 9110): 412 and nothing changes (it was ignored:
    the user was removed)."""
    base, token = running.http_url, running.token
    user = (await http("POST", f"{base}/users", token=token, json={"name": "zed"})).body
    url = f"{base}/users/{user['id']}"
    assert "etag" not in (await http("GET", url, token=token)).headers
    refused = await http("DELETE", url, token=token, headers={"If-Match": '"1"'})
    assert refused.status == 412 and refused.body["code"] == "conflict", refused
    assert "no revision" in refused.body["message"]
    assert (await http("GET", url, token=token)).body["removed_at"] is None
    removed = await http("DELETE", url, token=token, headers={"If-Match": "*"})
    assert removed.status == 200, removed
    assert (await http("GET", url, token=token)).body["removed_at"] is not None
