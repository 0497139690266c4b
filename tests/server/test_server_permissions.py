"""Permissions over the real port (WebSocket and HTTP on 127.0.0.1): a
revoked member still connected gets ``left`` on every connection at once and
nothing of the room after it; a resume after revocation is refused; a
viewer's write is refused over both transports; the per-user connection cap
closes with ``too_many_connections``."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from server_support import Daemon, RawClient, daemon, http, raw_client, until_closed

from agor_actors.daemon import open_hub
from agor_actors.server import serving
from agor_actors.services import UserLimits
from agor_actors.world import real_world
from protocols import (
    Call,
    Event,
    Join,
    Joined,
    Left,
    Ping,
    Pong,
    Result,
    ServerMessage,
    Since,
    Welcome,
)


@pytest.fixture
async def running(tmp_path: pathlib.Path) -> AsyncIterator[Daemon]:
    async with daemon(tmp_path / "agor") as d:
        yield d


async def owner_call(d: Daemon, method: str, path: str, body: Any = None) -> Any:
    reply = await http(method, d.http_url + path, token=d.token, json=body)
    assert reply.status in (200, 201), reply
    return reply.body


async def answer(client: RawClient, ref: int) -> Result:
    result: Result = await client.expect(Result)
    assert result.ref == ref
    return result


async def joined(client: RawClient, room: str, since: Since | None = None) -> Joined:
    await client.send(Join(room, since))
    message: Joined = await client.expect(Joined)
    assert message.room == room
    return message


async def until_pong(client: RawClient, t: int) -> list[ServerMessage]:
    """Everything the client gets until the pong of its ping ``t``: what the
    server queued for it before that ping was read."""
    await client.send(Ping(t))
    got: list[ServerMessage] = []
    with trio.fail_after(10):
        while not any(isinstance(m, Pong) and m.t == t for m in got):
            got += await client.receive()
    return got


async def refused_join(client: RawClient, room: str, since: Since) -> list[ServerMessage]:
    """A join that is answered ``left``: everything received until then,
    and until a ping sent after it comes back."""
    await client.send(Join(room, since))
    got: list[ServerMessage] = []
    with trio.fail_after(10):
        while not any(isinstance(m, Left) and m.room == room for m in got):
            got += await client.receive()
    return got + await until_pong(client, 99)


@asynccontextmanager
async def user_client(d: Daemon, token: str) -> AsyncIterator[RawClient]:
    async with raw_client(d.ws_url, token=token) as client:
        await client.expect(Welcome)
        yield client


async def test_a_revoked_member_gets_left_everywhere_and_nothing_after(running: Daemon) -> None:
    d = running
    user = await owner_call(d, "POST", "/users", {"name": "member"})
    board = await owner_call(d, "POST", "/boards", {"name": "b"})
    bid = board["id"]
    await owner_call(
        d, "POST", f"/boards/{bid}/add_member", {"user_id": user["id"], "role": "viewer"}
    )
    session = await owner_call(d, "POST", "/sessions", {"board_id": bid, "title": "s"})
    rooms = [f"board:{bid}", f"activity:{bid}", f"session:{session['id']}"]
    async with (
        user_client(d, user["token"]) as one,
        user_client(d, user["token"]) as two,
        user_client(d, d.token) as owner,
    ):
        for client in (one, two):
            for room in rooms:
                await joined(client, room)
        await joined(owner, f"board:{bid}")
        # a viewer's write is refused, over the WebSocket and over HTTP
        await one.send(Call(1, "tasks", "create", data={"session_id": session["id"]}))
        refused = await answer(one, 1)
        assert not refused.ok and refused.error is not None
        assert refused.error.code == "forbidden"
        over_http = await http(
            "POST", d.http_url + "/tasks", token=user["token"], json={"session_id": session["id"]}
        )
        assert over_http.status == 403 and over_http.body["code"] == "forbidden"

        removed = await owner_call(
            d, "POST", f"/boards/{bid}/remove_member", {"user_id": user["id"]}
        )
        assert removed["rev"] == board["rev"] + 2  # added, then removed
        # every room on both connections: left, with the reason, already sent
        for client in (one, two):
            got = await until_pong(client, 1)
            left = [(m.room, m.reason) for m in got if isinstance(m, Left)]
            assert sorted(left) == sorted((room, "forbidden") for room in rooms)
        # the owner keeps writing; the owner sees it, the revoked member nothing
        await owner_call(d, "POST", "/tasks", {"session_id": session["id"], "prompt": "after"})
        await owner_call(d, "PATCH", f"/boards/{bid}", {"name": "after"})
        with trio.fail_after(10):
            while True:
                got = await owner.receive()
                if any(isinstance(m, Event) and m.event == "board:updated" for m in got):
                    break
        for client in (one, two):
            after = await until_pong(client, 2)
            assert [m for m in after if not isinstance(m, Pong)] == []
        # a resume after revocation is checked again: refused, nothing replayed
        got = await refused_join(one, f"board:{bid}", Since("", 0))
        assert [(m.room, m.reason) for m in got if isinstance(m, Left)] == [
            (f"board:{bid}", "forbidden")
        ]
        assert not any(isinstance(m, Event | Joined) for m in got)


async def test_a_resume_after_revocation_replays_nothing(running: Daemon) -> None:
    d = running
    user = await owner_call(d, "POST", "/users", {"name": "reader"})
    session = await owner_call(
        d, "POST", "/sessions", {"title": "s", "permissions": {"viewers": [user["id"]]}}
    )
    room = f"session:{session['id']}"
    async with user_client(d, user["token"]) as client:
        first = await joined(client, room)
    # while the reader is away: its access is revoked, and the session moves on
    await owner_call(d, "POST", "/tasks", {"session_id": session["id"], "prompt": "missed"})
    current = await owner_call(d, "GET", f"/sessions/{session['id']}")
    reply = await http(
        "PATCH",
        f"{d.http_url}/sessions/{session['id']}",
        token=d.token,
        json={"permissions": {"viewers": []}},
        headers={"If-Match": str(current["rev"])},
    )
    assert reply.status == 200, reply
    async with user_client(d, user["token"]) as client:
        got = await refused_join(client, room, Since(first.epoch, first.seq))
        assert [(m.room, m.reason) for m in got if isinstance(m, Left)] == [(room, "forbidden")], (
            got
        )
        assert not any(isinstance(m, Event | Joined) for m in got)


async def test_the_per_user_connection_cap_closes_with_too_many_connections(
    tmp_path: pathlib.Path,
) -> None:
    world = real_world()
    async with (
        open_hub(world, data_dir=tmp_path / "agor", limits=UserLimits(connections=1)) as hub,
        serving(hub, world) as port,
    ):
        d = Daemon(hub, port, tmp_path / "agor")
        user = await owner_call(d, "POST", "/users", {"name": "u"})
        async with user_client(d, user["token"]):
            async with raw_client(d.ws_url, token=user["token"]) as second:
                messages, reason = await until_closed(second)
            assert reason.code == 1008
            assert [getattr(m, "code", None) for m in messages] == ["too_many_connections"]
            # the owner has no cap
            async with user_client(d, d.token), user_client(d, d.token):
                pass
        # once the first is closed, the user connects again
        async with user_client(d, user["token"]):
            pass


async def test_denials_and_revocations_are_counted(running: Daemon) -> None:
    d = running
    user = await owner_call(d, "POST", "/users", {"name": "counted"})
    board = await owner_call(d, "POST", "/boards", {"name": "b"})
    await owner_call(
        d, "POST", f"/boards/{board['id']}/add_member", {"user_id": user["id"], "role": "viewer"}
    )
    async with user_client(d, user["token"]) as client:
        await joined(client, f"board:{board['id']}")
        got = await refused_join(client, "board:made-up", Since("", 0))
        assert [m.reason for m in got if isinstance(m, Left)] == ["forbidden"]
        await owner_call(d, "POST", f"/boards/{board['id']}/remove_member", {"user_id": user["id"]})
        await until_pong(client, 5)
    text = generate_latest(d.hub.metrics.registry).decode()
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert values["agor_permission_denials_total"] >= 1
    assert values["agor_revocations_total"] == 1


async def test_a_tool_result_answers_only_its_own_tasks_tool_calls(running: Daemon) -> None:
    # a viewer of the owner's session knows its tool calls' ids; through a
    # task of a session of its own it could once overwrite their output
    d = running
    user = await owner_call(d, "POST", "/users", {"name": "viewer"})
    secret = await owner_call(
        d, "POST", "/sessions", {"title": "s", "permissions": {"viewers": [user["id"]]}}
    )
    task = await owner_call(d, "POST", "/tasks", {"session_id": secret["id"], "prompt": "p"})
    call = await owner_call(d, "POST", f"/tasks/{task['id']}/tool_call", {"name": "bash"})
    own = await http("POST", d.http_url + "/sessions", token=user["token"], json={"title": "o"})
    own_task = await http(
        "POST",
        d.http_url + "/tasks",
        token=user["token"],
        json={"session_id": own.body["id"], "prompt": "p"},
    )
    for answered_by, token in (
        (own_task.body["id"], user["token"]),
        (own_task.body["id"], d.token),
    ):
        reply = await http(
            "POST",
            f"{d.http_url}/tasks/{answered_by}/tool_result",
            token=token,
            json={"tool_call_id": call["id"], "output": "overwritten"},
        )
        assert reply.status == 404, reply
        assert reply.body == {
            "code": "not_found",
            "message": f"no tool call {call['id']} in task {answered_by}",
            "data": None,
        }
    stored = await owner_call(d, "GET", f"/tool_calls/{call['id']}")
    assert (stored["output"], stored["status"]) == (None, "started")
    # its own task answers it; a tool call that does not exist is named
    done = await owner_call(
        d, "POST", f"/tasks/{task['id']}/tool_result", {"tool_call_id": call["id"], "output": 1}
    )
    assert done["tool_call"] == {"id": call["id"], "output": 1, "status": "completed"}
    reply = await http(
        "POST",
        f"{d.http_url}/tasks/{task['id']}/tool_result",
        token=d.token,
        json={"tool_call_id": "nope", "output": 1},
    )
    assert (reply.status, reply.body["message"]) == (404, "no tool call nope"), reply


async def test_a_find_says_nothing_of_records_the_caller_may_not_see(running: Daemon) -> None:
    # paged before the permission filter, a stranger's find came back empty
    # with a cursor naming the next hidden record (its id, and the title or
    # prompt it was sorted on); whether a cursor came back told whether
    # hidden records matched a filter
    d = running
    user = await owner_call(d, "POST", "/users", {"name": "stranger"})
    board = await owner_call(d, "POST", "/boards", {"name": "hidden board"})
    hidden = await owner_call(d, "POST", "/sessions", {"title": "hidden", "board_id": board["id"]})
    shown = []
    for n in range(7):
        await owner_call(d, "POST", "/tasks", {"session_id": hidden["id"], "prompt": f"hidden {n}"})
        session = await owner_call(
            d,
            "POST",
            "/sessions",
            {"title": f"shown {n}", "permissions": {"viewers": [user["id"]]}},
        )
        shown.append(session["id"])
        await owner_call(d, "POST", "/tasks", {"session_id": session["id"], "prompt": f"t{n}"})
    token = user["token"]

    async def pages(service: str, query: str) -> list[list[str]]:
        got: list[list[str]] = []
        cursor = ""
        while True:
            reply = await http("GET", f"{d.http_url}/{service}?{query}{cursor}", token=token)
            assert reply.status == 200, reply
            got.append([row["id"] for row in reply.body["data"]])
            for row in reply.body["data"]:
                assert "hidden" not in str(row)
            after = reply.body["next_cursor"]
            if after is None:
                return got
            assert "hidden" not in str(after)
            cursor = f"&$cursor={after}"
            assert len(got) < 50

    for service, field in (("sessions", "title"), ("tasks", "prompt"), ("boards", "name")):
        for query in ("$limit=1", f"$limit=2&$sort[{field}]=-1", f"$limit=3&$sort[{field}]=1"):
            got = await pages(service, query)
            assert all(got) or got == [[]], (service, query, got)  # no empty page
            seen = [ident for page in got for ident in page]
            assert len(seen) == len(set(seen))
            if service == "sessions":
                assert sorted(seen) == sorted(shown), (query, got)
    # a filter on hidden records: nothing, and no cursor to tell they exist
    for query in ("title=hidden&$limit=1", "prompt[$lt]=i&$limit=1", "board_id=x&$limit=0"):
        service = "tasks" if "prompt" in query else "sessions"
        reply = await http("GET", f"{d.http_url}/{service}?{query}", token=token)
        assert reply.body == {"data": [], "next_cursor": None}, (query, reply)
    # the owner pages through everything; a cursor changed or of another query is refused
    first = await http("GET", f"{d.http_url}/sessions?$limit=2", token=d.token)
    after = first.body["next_cursor"]
    for bad, query in ((after[:-2] + "AA", "$limit=2"), (after, "$limit=2&$sort[title]=1")):
        reply = await http("GET", f"{d.http_url}/sessions?{query}&$cursor={bad}", token=d.token)
        assert reply.status == 400, reply
        assert reply.body["code"] == "invalid_field", reply
    owner_seen = [ident for page in await owner_pages(d, "sessions") for ident in page]
    assert len(owner_seen) == 8 and set(shown) < set(owner_seen)


async def owner_pages(d: Daemon, service: str) -> list[list[str]]:
    got: list[list[str]] = []
    cursor = ""
    while True:
        reply = await http("GET", f"{d.http_url}/{service}?$limit=3{cursor}", token=d.token)
        got.append([row["id"] for row in reply.body["data"]])
        if reply.body["next_cursor"] is None:
            return got
        cursor = f"&$cursor={reply.body['next_cursor']}"
