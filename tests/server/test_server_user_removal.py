"""``users.remove``: a removed user is let in no more, by any of the ways it
had (its own token, a password, an access token, a refresh token, a browser
cookie), and its open connections are closed; ``users.rotate_token``: a
user's token renewed, the old one refused.  Against a real daemon."""

from __future__ import annotations

import http.client as http_client
import logging
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import trio
from argon2 import profiles
from server_support import (
    Daemon,
    calls_until_unauthorized,
    commit_behind,
    daemon,
    http,
    raw_client,
    until_closed,
)

from agor_actors.client import open_websocket
from agor_actors.daemon import open_hub
from agor_actors.identity import IdentityConfig
from protocols import Ping, Pong, Welcome

CHEAP = IdentityConfig(password_params=profiles.CHEAPEST)


@pytest.fixture
async def running(tmp_path: pathlib.Path) -> AsyncIterator[Daemon]:
    async with daemon(tmp_path, identity=CHEAP) as d:
        yield d


async def _cookie(d: Daemon, token: str) -> str:
    """A browser's sign-in for ``token``'s user: the ``Cookie`` header."""
    reply = await http("POST", f"{d.http_url}/auth/codes", token=token, json={})
    assert reply.status == 201, reply.body

    def exchange() -> str:  # no redirect followed: the cookie is on the 303
        conn = http_client.HTTPConnection("127.0.0.1", d.port, timeout=10)
        try:
            conn.request("GET", reply.body["path"])
            response = conn.getresponse()
            assert response.status == 303
            return response.getheader("Set-Cookie", "").split(";")[0]
        finally:
            conn.close()

    return await trio.to_thread.run_sync(exchange)


async def _cookie_hello(d: Daemon, cookie: str) -> tuple[int | None, list[Any]]:
    """A WebSocket with the cookie and a hello without a token: how it
    closed and what came before."""
    messages: list[Any] = []
    async with open_websocket(
        d.ws_url, subprotocols=["agor.v1.json"], extra_headers=[(b"Cookie", cookie.encode())]
    ) as ws:
        await ws.send_message(orjson.dumps({"type": "hello", "protocol": 1}).decode())
        with trio.fail_after(5):
            try:
                while True:
                    messages.append(orjson.loads(await ws.get_message()))
                    if messages[-1].get("type") == "welcome":
                        return None, messages
            except Exception:
                pass
        return ws.closed.code if ws.closed else None, messages


async def test_a_removed_user_is_let_in_no_more(
    running: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    url = running.http_url
    owner = running.token
    user = (
        await http(
            "POST", f"{url}/users", token=owner, json={"name": "ada", "password": "pw-ada-123"}
        )
    ).body
    signed = (
        await http(
            "POST",
            f"{url}/authentication",
            json={"strategy": "local", "name": "ada", "password": "pw-ada-123"},
        )
    ).body
    cookie = await _cookie(running, user["token"])
    assert (await http("GET", f"{url}/auth/me", headers={"Cookie": cookie})).status == 200
    assert (await _cookie_hello(running, cookie))[0] is None  # welcomed
    caplog.set_level(logging.INFO, logger="agor_actors.security")

    async with (
        raw_client(running.ws_url, token=user["token"]) as own,
        raw_client(running.ws_url, token=signed["accessToken"]) as signed_in,
    ):
        for raw in (own, signed_in):
            await raw.expect(Welcome)
        reply = await http("DELETE", f"{url}/users/{user['id']}", token=owner)
        assert reply.status == 200, reply.body
        assert reply.body["id"] == user["id"] and isinstance(reply.body["removed_at"], int)
        assert "token" not in reply.body and "token_hash" not in reply.body
        # its open connections are closed, saying why
        for raw in (own, signed_in):
            _, reason = await until_closed(raw)
            assert reason.code == 4001 and reason.reason == "unauthorized: this user was removed"
    assert any(r.getMessage() == "user removed" for r in caplog.records)

    # every way in is refused now
    for token in (user["token"], signed["accessToken"]):
        assert (await http("GET", f"{url}/sessions", token=token)).status == 401
        async with raw_client(running.ws_url, token=token) as raw:
            messages, reason = await until_closed(raw)
        assert reason.code == 4001 and not any(isinstance(m, Welcome) for m in messages)
    me = await http("GET", f"{url}/auth/me", headers={"Cookie": cookie})
    assert me.status == 401 and me.body["message"] == "this sign-in is no longer valid"
    assert (await _cookie_hello(running, cookie))[0] == 4001
    for attempt in (
        {"strategy": "local", "name": "ada", "password": "pw-ada-123"},
        {"strategy": "refresh", "refreshToken": signed["refreshToken"]},
    ):
        assert (await http("POST", f"{url}/authentication", json=attempt)).status == 401

    # the record stays, marked; removing again answers the same
    got = await http("GET", f"{url}/users/{user['id']}", token=owner)
    assert got.status == 200 and got.body["removed_at"] == reply.body["removed_at"]
    again = await http("DELETE", f"{url}/users/{user['id']}", token=owner)
    assert again.status == 200 and again.body == reply.body
    # it gets no password back, and joins no board
    patched = await http(
        "PATCH", f"{url}/users/{user['id']}", token=owner, json={"password": "pw-back-123"}
    )
    assert patched.status == 400 and "was removed" in patched.body["message"]
    board = (await http("POST", f"{url}/boards", token=owner, json={"name": "B"})).body
    added = await http(
        "POST",
        f"{url}/boards/{board['id']}/add_member",
        token=owner,
        json={"user_id": user["id"]},
    )
    assert added.status == 400 and "was removed" in added.body["message"]
    # its name is free for a new user with a password
    assert (
        await http(
            "POST", f"{url}/users", token=owner, json={"name": "ada", "password": "pw-new-123"}
        )
    ).status == 201


async def test_only_the_owner_removes_users_and_not_itself(running: Daemon) -> None:
    url, owner = running.http_url, running.token
    ada = (await http("POST", f"{url}/users", token=owner, json={"name": "ada"})).body
    bob = (await http("POST", f"{url}/users", token=owner, json={"name": "bob"})).body
    for victim in (bob["id"], ada["id"]):  # not another, not even itself
        refused = await http("DELETE", f"{url}/users/{victim}", token=ada["token"])
        assert refused.status == 403
    assert (await http("GET", f"{url}/sessions", token=bob["token"])).status == 200
    owner_row = await http("DELETE", f"{url}/users/owner", token=owner)
    assert owner_row.status == 403 and owner_row.body["message"] == "the owner cannot be removed"
    missing = await http("DELETE", f"{url}/users/nobody", token=owner)
    assert missing.status == 404
    assert (await http("GET", f"{url}/sessions", token=owner)).status == 200


async def test_a_user_removed_by_another_daemon_is_found_by_the_sweep(running: Daemon) -> None:
    """A cluster node learns of a removal made elsewhere from the store, in
    its access sweep: its cached tokens are dropped and the user's
    connections closed.  Here the removal is written to the store behind
    the hub's back, as another daemon's would be."""
    from agor_actors.services import plan_user_removal

    url, hub = running.http_url, running.hub
    ada = (await http("POST", f"{url}/users", token=running.token, json={"name": "ada"})).body
    async with raw_client(running.ws_url, token=ada["token"]) as raw:
        await raw.expect(Welcome)
        await commit_behind(hub, plan_user_removal(ada["id"], 5, "another-daemons-token", False))
        # the hub still knows the token (cached) until its sweep
        assert await hub.authenticate(ada["token"]) is not None
        await hub._find_removed()
        assert await hub.authenticate(ada["token"]) is None
        _, reason = await until_closed(raw)
        assert reason.code == 4001


async def test_a_client_whose_user_is_removed_ends_with_unauthorized(running: Daemon) -> None:
    """The real client, welcomed on its first connection, then closed for
    good (4001): it ends with ``unauthorized`` and ``connect``'s block ends
    cleanly.  (It raised "called 'started' twice" from the
    block's exit.)"""
    from agor_actors.client import connect

    url = running.http_url
    ada = (await http("POST", f"{url}/users", token=running.token, json={"name": "ada"})).body
    async with connect(running.ws_url, token=ada["token"]) as client:
        await client.service("boards").create({"name": "mine"})
        removed = await http("DELETE", f"{url}/users/{ada['id']}", token=running.token)
        assert removed.status == 200
        # the server stopped reading before it answered the removal: a call
        # is never read, and fails with the close: connection_lost while the
        # connection was open when it was sent, unauthorized once the client
        # is closed for good (each call waits for the close; a few at most)
        codes = await calls_until_unauthorized(client)
        assert set(codes[:-1]) <= {"connection_lost"} and len(codes) <= 3, codes
        assert not client.connected


_RENEWED = "unauthorized: this user's token was renewed: connect with the new one"


async def test_a_user_renews_its_token_and_the_old_one_is_refused(running: Daemon) -> None:
    """``users.rotate_token``: the user itself or the owner gets a new
    token, once; the old one is refused at once (also where it was cached)
    and the connections it opened are closed (4001: a leaked token's holder
    keeps no open connection; another user's stays); the user keeps its
    id, boards and sign-in."""
    url, owner = running.http_url, running.token
    ada = (await http("POST", f"{url}/users", token=owner, json={"name": "ada"})).body
    bob = (await http("POST", f"{url}/users", token=owner, json={"name": "bob"})).body
    board = (await http("POST", f"{url}/boards", token=ada["token"], json={"name": "B"})).body
    assert (await http("GET", f"{url}/boards/{board['id']}", token=ada["token"])).status == 200

    async with (
        raw_client(running.ws_url, token=ada["token"]) as leaked,
        raw_client(running.ws_url, token=bob["token"]) as other,
    ):
        await leaked.expect(Welcome)
        await other.expect(Welcome)
        renewed = await http("POST", f"{url}/users/{ada['id']}/rotate_token", token=ada["token"])
        assert renewed.status == 200, renewed.body
        assert set(renewed.body) == {"id", "name", "token"} and renewed.body["id"] == ada["id"]
        _, closed = await until_closed(leaked)
        assert (closed.code, closed.reason) == (4001, _RENEWED)
        await other.send(Ping(1))
        assert (await other.expect(Pong)).t == 1
    new = renewed.body["token"]
    assert new != ada["token"]
    assert (await http("GET", f"{url}/sessions", token=ada["token"])).status == 401
    async with raw_client(running.ws_url, token=ada["token"]) as raw:
        _, reason = await until_closed(raw)
    assert reason.code == 4001
    mine = await http("GET", f"{url}/boards/{board['id']}", token=new)
    assert mine.status == 200 and mine.body["owner_id"] == ada["id"]

    # the owner renews anyone's; another user renews none
    async with raw_client(running.ws_url, token=new) as opened:
        await opened.expect(Welcome)
        again = await http("POST", f"{url}/users/{ada['id']}/rotate_token", token=owner)
        assert again.status == 200 and again.body["token"] != new
        _, closed = await until_closed(opened)
        assert (closed.code, closed.reason) == (4001, _RENEWED)
    assert (await http("GET", f"{url}/sessions", token=new)).status == 401
    refused = await http("POST", f"{url}/users/{ada['id']}/rotate_token", token=bob["token"])
    assert refused.status == 403
    await http("DELETE", f"{url}/users/{bob['id']}", token=owner)
    gone = await http("POST", f"{url}/users/{bob['id']}/rotate_token", token=owner)
    assert gone.status == 400 and "was removed" in gone.body["message"]


async def test_a_user_renewing_its_token_on_a_connection_gets_it_then_the_close(
    running: Daemon,
) -> None:
    """The caller's own connection, opened with the old token, is answered
    the new token first, then closed; the real client ends ``unauthorized``
    and the new token connects."""
    from agor_actors.client import connect

    url = running.http_url
    ada = (await http("POST", f"{url}/users", token=running.token, json={"name": "ada"})).body
    async with connect(running.ws_url, token=ada["token"]) as client:
        renewed = await client.service("users").call("rotate_token", ada["id"])
        assert renewed["id"] == ada["id"] and renewed["token"] != ada["token"]
        codes = await calls_until_unauthorized(client)
        assert set(codes[:-1]) <= {"connection_lost"} and len(codes) <= 3, codes
    async with connect(running.ws_url, token=renewed["token"]) as client:
        assert (await client.service("users").get(ada["id"]))["name"] == "ada"


async def test_the_owner_renews_its_token_and_the_token_file_follows(
    tmp_path: pathlib.Path,
) -> None:
    """The owner's token, renewed through the API, is written to
    ``<data-dir>/token`` (nothing left beside it): the old one is refused,
    the connections it opened are closed, and the daemon started again on
    the data dir takes the new one."""
    from agor_actors.cli import read_token
    from agor_actors.world import real_world

    async with daemon(tmp_path, identity=CHEAP) as running:
        old = running.token
        async with raw_client(running.ws_url, token=old) as raw:
            await raw.expect(Welcome)
            renewed = await http("POST", f"{running.http_url}/users/owner/rotate_token", token=old)
            assert renewed.status == 200, renewed.body
            new = renewed.body["token"]
            assert new != old and read_token(tmp_path) == new
            assert sorted(p.name for p in tmp_path.glob("token*")) == ["token"]
            assert (tmp_path / "token").stat().st_mode & 0o777 == 0o600
            assert (await http("GET", f"{running.http_url}/sessions", token=old)).status == 401
            assert (await http("GET", f"{running.http_url}/sessions", token=new)).status == 200
            _, closed = await until_closed(raw)  # the connection the old one opened
            assert (closed.code, closed.reason) == (4001, _RENEWED)
    async with open_hub(real_world(), data_dir=tmp_path) as hub:
        assert await hub.authenticate(new) is not None
        assert await hub.authenticate(old) is None


async def test_an_embedded_daemons_owner_token_is_its_programs(tmp_path: pathlib.Path) -> None:
    from agor_actors.domain import ServiceError
    from agor_actors.world import real_world

    async with open_hub(real_world(), data_dir=tmp_path, owner_token="the program's") as hub:
        owner = await hub.authenticate("the program's")
        assert owner is not None
        with pytest.raises(ServiceError) as refused:
            await hub.call(
                owner, connection_id=None, service="users", method="rotate_token", id="owner"
            )
        assert refused.value.code == "invalid_field" and "embeds" in refused.value.message
        assert await hub.authenticate("the program's") is not None
        assert not (tmp_path / "token").exists()
