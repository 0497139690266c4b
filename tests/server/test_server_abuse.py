"""Abuse has an end: a flood is closed with ``flood``, a join to a room that
does not exist spawns nothing, and refusals are in the security log."""

from __future__ import annotations

import logging
import pathlib
from collections.abc import AsyncIterator

import pytest
import trio
import trio_websocket
from server_support import Daemon, RawClient, daemon, http, raw_client, until_closed

from agor_actors.daemon import Outbox, ServiceError, open_hub
from agor_actors.domain import Principal
from agor_actors.server import ServerSettings
from agor_actors.world import real_world
from protocols import (
    Call,
    Codec,
    Cursor,
    Error,
    Join,
    Joined,
    Left,
    Limits,
    Message,
    Ping,
    PresenceUpdate,
    Result,
    Welcome,
)

ROOMY = ServerSettings(limits=Limits(rate_per_s=1e6, rate_burst=1_000_000, max_subscriptions=4000))


@pytest.fixture
async def running(tmp_path: pathlib.Path) -> AsyncIterator[Daemon]:
    async with daemon(tmp_path / "agor") as d:
        yield d


def _rss_bytes() -> int:
    pages = int(pathlib.Path("/proc/self/statm").read_text().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")


async def _flood(client: RawClient, messages: list[Message]) -> None:
    """Send each message in a frame of its own until the server closes."""
    try:
        for message in messages:
            await client.send(message)
    except trio_websocket.ConnectionClosed:
        pass


@pytest.mark.parametrize("kind", ["ping", "call"])
async def test_a_connection_that_keeps_flooding_is_closed_with_flood(
    running: Daemon, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agor_actors.security")
    n = 20_000
    flood: list[Message] = (
        [Ping(t) for t in range(n)]
        if kind == "ping"
        else [Call(ref, "sessions", "get", id="no-such-session") for ref in range(1, n + 1)]
    )
    async with raw_client(running.ws_url, token=running.token) as client:
        welcome = await client.expect(Welcome)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_flood, client, flood)
            messages, reason = await until_closed(client, limit_s=60)
    assert reason.code == 1008
    errors = [m.code for m in messages if isinstance(m, Error)]
    refused = errors + [
        m.error.code for m in messages if hasattr(m, "error") and m.error is not None
    ]
    assert "rate_limited" in refused  # told first
    assert errors[-1] == "flood"  # then closed
    [record] = [r for r in caplog.records if r.getMessage() == "flood close"]
    assert record.name == "agor_actors.security"
    assert record.connection_id == welcome.connection_id  # type: ignore[attr-defined]
    assert record.user_id == welcome.user_id  # type: ignore[attr-defined]
    assert running.token not in caplog.text
    # the daemon is fine: a new connection is served
    async with raw_client(running.ws_url, token=running.token) as client:
        await client.expect(Welcome)
        await client.send(Ping(1))


async def test_joins_to_made_up_rooms_spawn_nothing(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agor_actors.security")
    async with (
        daemon(tmp_path / "agor", ROOMY) as d,
        raw_client(d.ws_url, Codec.CBOR, token=d.token) as client,
    ):
        welcome = await client.expect(Welcome)
        registry = d.hub.system.registry
        before_names = set(registry.names())
        before_rss = _rss_bytes()
        rooms = [
            f"{kind}:made-up-{i}" for i in range(1000) for kind in ("session", "board", "activity")
        ]
        for start in range(0, len(rooms), 100):
            await client.send([Join(room, None) for room in rooms[start : start + 100]])
        lefts: dict[str, str] = {}
        with trio.fail_after(60):
            while len(lefts) < len(rooms):
                for message in await client.receive():
                    assert not isinstance(message, Joined), message
                    if isinstance(message, Left):
                        lefts[message.room] = message.reason
        assert set(lefts) == set(rooms)
        assert set(lefts.values()) == {"forbidden"}
        # presence on a board that is not: refused, the owner's too (it
        # started a room actor per made-up board, idle for 5 minutes)
        made_up = [f"made-up-{i}" for i in range(40)]
        await client.send([PresenceUpdate(board=b, cursor=Cursor(1.0, 2.0)) for b in made_up])
        errors: list[Error] = []
        with trio.fail_after(30):
            while len(errors) < len(made_up):
                errors += [m for m in await client.receive() if isinstance(m, Error)]
        assert {(e.code, e.message) for e in errors} == {
            ("forbidden", f"no board {b} that this user may see") for b in made_up
        }
        after = set(registry.names())
        assert not any(name.startswith("room:") for name in after - before_names), sorted(after)[:5]
        assert after == before_names
        assert (_rss_bytes() - before_rss) < 30 << 20  # was ~58 MB for 3,000 actors
        refused = [r for r in caplog.records if r.getMessage() == "join refused"]
        assert len(refused) == len(rooms)
        assert {r.connection_id for r in refused} == {welcome.connection_id}  # type: ignore[attr-defined]
        # rooms that exist are still joined, an activity room through its board
        await client.send(Call(1, "boards", "create", data={"name": "b"}))
        board = await client.expect(Result)
        assert board.ok, board
        board_id = board.data["id"]
        await client.send(Call(2, "sessions", "create", data={"title": "s"}))
        session = await client.expect(Result)
        for room in (f"board:{board_id}", f"activity:{board_id}", f"session:{session.data['id']}"):
            await client.send(Join(room, None))
            joined = await client.expect(Joined)
            assert joined.room == room


class _NoJoins:
    async def authorize(self, principal: Principal, action: str, resource: str) -> None:
        if action == "join":
            raise ServiceError("forbidden", f"{principal.user_id} may not join {resource}")


async def test_a_room_not_to_be_seen_is_refused_like_one_that_does_not_exist(
    tmp_path: pathlib.Path,
) -> None:
    world = real_world()
    async with open_hub(world, data_dir=tmp_path, authorizer=_NoJoins()) as hub:
        principal = await hub.authenticate(hub.owner_token)
        assert principal is not None
        board = await hub.call(
            principal, connection_id=None, service="boards", method="create", data={"name": "b"}
        )
        answers = []
        for room in (f"board:{board['id']}", "board:made-up"):
            with pytest.raises(ServiceError) as refused:
                await hub.join(principal, "c-1", Outbox(Codec.JSON), room, None)
            answers.append((refused.value.code, str(refused.value).replace(room, "<room>")))
        assert answers[0] == answers[1]
        assert answers[0][0] == "forbidden"
        assert "room:board:made-up" not in hub.system.registry.names()


async def test_refused_tokens_are_logged_without_the_token(
    running: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agor_actors.security")
    forged = "not-the-token-" + "x" * 20
    async with raw_client(running.ws_url, token=forged) as client:
        _, reason = await until_closed(client)
    assert reason.code == 4001
    reply = await http("GET", running.http_url + "/sessions", token=forged)
    assert reply.status == 401
    refused = [r for r in caplog.records if r.getMessage() == "token refused"]
    assert [r.transport for r in refused] == ["websocket", "http"]  # type: ignore[attr-defined]
    assert forged not in caplog.text


async def test_strings_past_their_bound_are_refused_with_invalid_field(running: Daemon) -> None:
    url, token = running.http_url, running.token

    async def refused(method: str, path: str, body: dict[str, object], field: str) -> None:
        reply = await http(method, url + path, token=token, json=body)
        assert reply.status == 400, reply
        assert reply.body["code"] == "invalid_field", reply.body
        assert field in reply.body["message"]

    await refused("POST", "/boards", {"name": "b" * 900_000}, "name")  # was accepted
    await refused("POST", "/boards", {"name": "b", "description": "d" * 70_000}, "description")
    board = await http("POST", url + "/boards", token=token, json={"name": "b" * 1000})
    assert board.status in (200, 201), board
    await refused("PATCH", f"/boards/{board.body['id']}", {"name": "b" * 1001}, "name")
    await refused("POST", "/sessions", {"title": "t" * 1001}, "title")
    await refused("POST", "/users", {"name": "u" * 1001}, "name")
    session = await http("POST", url + "/sessions", token=token, json={"title": "s"})
    sid = session.body["id"]
    await refused("PATCH", f"/sessions/{sid}", {"agent": "a" * 1001}, "agent")
    await refused("POST", "/tasks", {"session_id": sid, "prompt": "p" * (256 * 1024 + 1)}, "prompt")
    task = await http("POST", url + "/tasks", token=token, json={"session_id": sid, "prompt": "p"})
    await refused(
        "PATCH", f"/tasks/{task.body['id']}", {"prompt": "p" * (256 * 1024 + 1)}, "prompt"
    )
    await refused(
        "POST", "/messages", {"session_id": sid, "content": "c" * (256 * 1024 + 1)}, "content"
    )
    await refused("GET", "/sessions/" + "i" * 129, {}, "id")
    # a streamed chunk has its own bound
    message = await http(
        "POST", url + "/messages", token=token, json={"session_id": sid, "streaming": True}
    )
    mid = message.body["id"]
    await refused("POST", f"/messages/{mid}/stream", {"chunk": "c" * (64 * 1024 + 1)}, "chunk")
    ok = await http(
        "POST", url + f"/messages/{mid}/stream", token=token, json={"chunk": "c" * 1024}
    )
    assert ok.status == 200, ok
