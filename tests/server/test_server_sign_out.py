"""Signing out closes what it signed out of.  A password change: the
user's access tokens are refused (not only its refresh tokens), and the
connections they or a browser sign-in opened are closed (``unauthorized``,
4001), the caller's after its answer; a connection opened with the user's
own token stays.  A browser's logout: the connections its cookie opened are
closed, another browser's stay.  Against a real daemon."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import trio
import trio_websocket
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
from test_server_user_removal import _cookie

from agor_actors.client import connect, open_websocket
from agor_actors.identity import IdentityConfig
from agor_actors.store import Mutation, WriteRequest, hash_token
from protocols import Ping, Pong, Welcome

CHEAP = IdentityConfig(password_params=profiles.CHEAPEST)
CHANGED = "unauthorized: the password was changed: sign in again"


@pytest.fixture
async def running(tmp_path: pathlib.Path) -> AsyncIterator[Daemon]:
    async with daemon(tmp_path, identity=CHEAP) as d:
        yield d


async def _ada(d: Daemon) -> tuple[dict[str, Any], dict[str, Any]]:
    """ada (with a password and her own token) and a sign-in of hers."""
    url = d.http_url
    user = await http(
        "POST", f"{url}/users", token=d.token, json={"name": "ada", "password": "pw-ada-123"}
    )
    assert user.status == 201, user.body
    return user.body, await _sign_in(d, "pw-ada-123")


async def _sign_in(d: Daemon, password: str) -> dict[str, Any]:
    reply = await http(
        "POST",
        f"{d.http_url}/authentication",
        json={"strategy": "local", "name": "ada", "password": password},
    )
    assert reply.status == 201, reply.body
    return reply.body


@asynccontextmanager
async def _browser(d: Daemon, cookie: str) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A browser's connection, opened with its cookie, once welcomed."""
    async with open_websocket(
        d.ws_url, subprotocols=["agor.v1.json"], extra_headers=[(b"Cookie", cookie.encode())]
    ) as ws:
        await ws.send_message(orjson.dumps({"type": "hello", "protocol": 1}).decode())
        with trio.fail_after(10):
            while orjson.loads(await ws.get_message()).get("type") != "welcome":
                pass
        yield ws


async def _answers_ping(ws: trio_websocket.WebSocketConnection, t: int) -> None:
    """A browser's connection still open: its ping answered."""
    await ws.send_message(orjson.dumps({"type": "ping", "t": t}).decode())
    with trio.fail_after(10):
        assert orjson.loads(await ws.get_message()) == {"type": "pong", "t": t}


async def _closed(ws: trio_websocket.WebSocketConnection) -> tuple[int | None, str | None]:
    with trio.fail_after(10):
        try:
            while True:
                await ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            assert exc.reason is not None
            return exc.reason.code, exc.reason.reason


async def test_a_password_change_closes_what_the_old_password_opened(running: Daemon) -> None:
    url = running.http_url
    ada, signed = await _ada(running)
    other = await _sign_in(running, "pw-ada-123")  # another window
    cookie = await _cookie(running, ada["token"])
    async with (
        raw_client(running.ws_url, token=ada["token"]) as own,
        raw_client(running.ws_url, token=other["accessToken"]) as window,
        _browser(running, cookie) as browser,
        connect(running.ws_url, token=signed["accessToken"]) as caller,
    ):
        await own.expect(Welcome)
        await window.expect(Welcome)

        # the caller changes its password over its connection: answered first
        changed = await caller.service("users").patch(
            ada["id"], {"password": "pw-new-4567", "current_password": "pw-ada-123"}
        )
        assert changed["id"] == ada["id"] and "password" not in str(changed)
        _, reason = await until_closed(window)
        assert (reason.code, reason.reason) == (4001, CHANGED)
        assert await _closed(browser) == (4001, CHANGED)
        # then the caller's is closed for good: each call waits for the close
        codes = await calls_until_unauthorized(caller)
        assert set(codes[:-1]) <= {"connection_lost"} and len(codes) <= 3, codes
        assert not caller.connected

        # the connection opened with her own token stays
        await own.send(Ping(7))
        assert (await own.expect(Pong)).t == 7

    # what the old password opened is refused; the new one signs in
    for token in (signed["accessToken"], other["accessToken"]):
        assert (await http("GET", f"{url}/sessions", token=token)).status == 401
        async with raw_client(running.ws_url, token=token) as raw:
            messages, reason = await until_closed(raw)
        assert reason.code == 4001 and not any(isinstance(m, Welcome) for m in messages)
    assert (await http("GET", f"{url}/auth/me", headers={"Cookie": cookie})).status == 401
    again = await _sign_in(running, "pw-new-4567")
    assert (await http("GET", f"{url}/sessions", token=again["accessToken"])).status == 200
    async with raw_client(running.ws_url, token=again["accessToken"]) as raw:
        await raw.expect(Welcome)


async def test_a_password_changed_by_another_daemon_is_found_by_the_sweep(
    running: Daemon,
) -> None:
    """A cluster node learns of a password changed elsewhere from the store,
    in its access sweep: the access tokens issued before are refused and
    the connections they opened closed; one opened with the user's own
    token stays.  The change is written behind the hub's back, as another
    daemon's would be."""
    hub = running.hub
    ada, signed = await _ada(running)
    async with (
        raw_client(running.ws_url, token=ada["token"]) as own,
        raw_client(running.ws_url, token=signed["accessToken"]) as window,
    ):
        await own.expect(Welcome)
        await window.expect(Welcome)
        elsewhere = Mutation(
            "upsert",
            "credentials",
            {"user_id": ada["id"]},
            {"login": "ada", "password_hash": "another daemon's hash", "updated_at": 5},
        )
        await commit_behind(hub, WriteRequest(mutations=(elsewhere,)))
        # the hub knows the user as it was (cached) until its sweep
        assert await hub.authenticate(signed["accessToken"]) is not None
        await hub._find_removed()
        assert await hub.authenticate(signed["accessToken"]) is None
        _, reason = await until_closed(window)
        assert (reason.code, reason.reason) == (4001, CHANGED)
        assert await hub.authenticate(ada["token"]) is not None
        await own.send(Ping(7))  # still open: answered
        assert (await own.expect(Pong)).t == 7


async def test_a_token_renewed_by_another_daemon_is_found_by_the_sweep(running: Daemon) -> None:
    """A cluster node learns of a user's token renewed elsewhere from the
    store, in its access sweep: the connections the old token opened close
    (4001), one an access token of the same user opened stays, and so does
    another user's.  The renewal is written behind the hub's back, as
    another daemon's would be."""
    hub = running.hub
    ada, signed = await _ada(running)
    bob = (
        await http("POST", f"{running.http_url}/users", token=running.token, json={"name": "bob"})
    ).body
    async with (
        raw_client(running.ws_url, token=ada["token"]) as own,
        raw_client(running.ws_url, token=signed["accessToken"]) as window,
        raw_client(running.ws_url, token=bob["token"]) as other,
    ):
        for client in (own, window, other):
            await client.expect(Welcome)
        renewed = hash_token("ada's token from another daemon")
        elsewhere = Mutation("update", "users", {"id": ada["id"]}, {"token_hash": renewed})
        await commit_behind(hub, WriteRequest(mutations=(elsewhere,)))
        assert await hub.authenticate(ada["token"]) is not None  # cached until the sweep
        await hub._find_removed()
        assert await hub.authenticate(ada["token"]) is None
        _, reason = await until_closed(own)
        assert (reason.code, reason.reason) == (
            4001,
            "unauthorized: this user's token was renewed: connect with the new one",
        )
        for n, client in enumerate((window, other)):
            await client.send(Ping(n))  # still open: answered
            assert (await client.expect(Pong)).t == n


async def test_a_browser_that_logs_out_has_its_connections_closed(running: Daemon) -> None:
    url = running.http_url
    ada, signed = await _ada(running)
    laptop, phone = await _cookie(running, ada["token"]), await _cookie(running, ada["token"])
    async with (
        _browser(running, laptop) as on_laptop,
        _browser(running, phone) as on_phone,
        raw_client(running.ws_url, token=signed["accessToken"]) as window,
    ):
        await window.expect(Welcome)
        out = await http("POST", f"{url}/auth/logout", headers={"Cookie": laptop})
        assert out.status == 200 and out.body == {"signed_out": True}
        assert await _closed(on_laptop) == (4001, "unauthorized: signed out")
        # the other browser and the access token's connection stay
        await _answers_ping(on_phone, 3)
        await window.send(Ping(7))
        assert (await window.expect(Pong)).t == 7
    assert (await http("GET", f"{url}/auth/me", headers={"Cookie": laptop})).status == 401
    assert (await http("GET", f"{url}/auth/me", headers={"Cookie": phone})).status == 200


async def test_sign_ins_closed_by_another_daemon_are_found_by_the_sweep(
    running: Daemon,
) -> None:
    """A cluster node learns from the store, in its access sweep, that a
    browser sign-in was closed elsewhere (a logout or a password change on
    another daemon): the connections that sign-in opened here are closed.
    Another user's browser and an access token's connection stay.  The
    sign-ins are closed behind the hub's back, as another daemon would."""
    hub = running.hub
    ada, signed = await _ada(running)
    bob = await http("POST", f"{running.http_url}/users", token=running.token, json={"name": "bob"})
    laptop, phone = await _cookie(running, ada["token"]), await _cookie(running, ada["token"])
    bobs = await _cookie(running, bob.body["token"])
    async with (
        _browser(running, laptop) as on_laptop,
        _browser(running, phone) as on_phone,
        _browser(running, bobs) as on_bobs,
        raw_client(running.ws_url, token=signed["accessToken"]) as window,
    ):
        await window.expect(Welcome)
        closed = await trio.to_thread.run_sync(
            lambda: hub.store.close_web_sessions(user_id=ada["id"])
        )
        assert closed == 2
        await hub._find_removed()  # its sweep
        for ws in (on_laptop, on_phone):
            assert await _closed(ws) == (4001, "unauthorized: this sign-in is no longer valid")
        await _answers_ping(on_bobs, 3)
        await window.send(Ping(7))
        assert (await window.expect(Pong)).t == 7
