"""Access tokens expiring on an open connection: renewed in band (``auth``),
or the connection closed with ``token_expired`` (4002), after which the
Python client refreshes and resumes with nothing lost.  Real daemon, real
sockets; the tokens live 3 s (waits are on events, bounded by fail_after)."""

from __future__ import annotations

import logging
import pathlib
from collections.abc import AsyncIterator

import pytest
import trio
from argon2 import profiles
from server_support import Daemon, daemon, http, raw_client, until_closed

from agor_actors.client import Credentials, connect, sign_in
from protocols import Auth, Error, Result, Welcome

TTL_S = 3
CONFIG_KW = {"access_ttl_s": TTL_S, "password_params": profiles.CHEAPEST}


@pytest.fixture
async def running(tmp_path: pathlib.Path) -> AsyncIterator[Daemon]:
    from agor_actors.identity import IdentityConfig

    async with daemon(tmp_path, identity=IdentityConfig(**CONFIG_KW)) as d:  # type: ignore[arg-type]
        for name in ("ada", "bob"):
            reply = await http(
                "POST",
                f"{d.http_url}/users",
                token=d.token,
                json={"name": name, "password": f"{name}'s password"},
            )
            assert reply.status == 201
        yield d


async def _sign_in(d: Daemon, name: str = "ada") -> Credentials:
    return await sign_in(d.http_url, name, f"{name}'s password")


async def test_auth_in_band_renews_the_connection(running: Daemon) -> None:
    ada, bob = await _sign_in(running), await _sign_in(running, "bob")
    async with raw_client(running.ws_url, token=ada.access_token) as raw:
        welcome = await raw.expect(Welcome)
        assert welcome.expires_at == ada.expires_at
        # another user's token: refused, the connection stays
        await raw.send(Auth(1, bob.access_token))
        refused = await raw.expect(Result)
        assert refused.error.code == "forbidden"
        await raw.send(Auth(2, "eyJhbGciOiJIUzI1NiJ9.e30.forged"))
        refused = await raw.expect(Result)
        assert (refused.ref, refused.error.code) == (2, "not_authenticated")
        # the same user's refreshed token: accepted, expiry moved
        renewed = await ada.refresh()
        await raw.send(Auth(3, renewed))
        accepted = await raw.expect(Result)
        assert accepted.ok and accepted.data["user_id"] == welcome.user_id
        assert accepted.data["expires_at"] == ada.expires_at
        assert ada.expires_at is not None and welcome.expires_at is not None
        assert ada.expires_at >= welcome.expires_at


async def test_an_expired_token_closes_with_4002(
    running: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agor_actors.security")
    ada = await _sign_in(running)
    async with raw_client(running.ws_url, token=ada.access_token) as raw:
        await raw.expect(Welcome)
        messages, reason = await until_closed(raw, limit_s=TTL_S + 5)
    assert reason.code == 4002
    assert Error("token_expired", "the token expired: refresh it and reconnect") in messages
    assert any(r.getMessage() == "token expired" for r in caplog.records)
    # and the expired token opens nothing any more
    async with raw_client(running.ws_url, token=ada.access_token) as raw:
        _, reason = await until_closed(raw)
    assert reason.code == 4001
    assert any(getattr(r, "reason", None) == "expired" for r in caplog.records)


async def test_the_client_renews_in_band_before_expiry(running: Daemon) -> None:
    ada = await _sign_in(running)
    refreshed = trio.Event()
    calls = 0

    async def refresh() -> str:
        nonlocal calls
        calls += 1
        token = await ada.refresh()
        if calls == 2:
            refreshed.set()  # the first renewal went through: the renewer looped
        return token

    async with connect(
        running.ws_url, token=ada.access_token, refresh=refresh, refresh_before_s=2
    ) as client:
        connection = client.connection_id
        with trio.fail_after(3 * TTL_S + 5):
            await refreshed.wait()
        assert client.renewals >= 1
        assert client.connection_id == connection  # never reconnected
        assert (await client.service("sessions").create({"title": "still me"}))["title"]


async def test_after_4002_the_client_refreshes_and_resumes_with_nothing_lost(
    running: Daemon,
) -> None:
    ada = await _sign_in(running)
    failed_once = False

    async def refresh() -> str:
        nonlocal failed_once
        if not failed_once:  # the in-band renewal fails: the server will close
            failed_once = True
            raise OSError("the sign-in service is down")
        return await ada.refresh()

    async with (
        connect(running.ws_url, token=running.token) as writer,
        connect(running.ws_url, token=ada.access_token, refresh=refresh) as watcher,
    ):
        assert ada.user is not None
        session = await writer.service("sessions").create(
            {"title": "expiry", "permissions": {"viewers": [ada.user["id"]]}}
        )
        room = f"session:{session['id']}"
        await watcher.join(room)
        first_connection = watcher.connection_id
        async with watcher.events(room) as events:
            seqs: list[int] = []
            tasks = writer.service("tasks")
            done = trio.Event()

            async def write() -> None:
                # writes before, during and after the expiry close
                while not done.is_set():
                    await tasks.create({"session_id": session["id"], "prompt": "p"})
                    await trio.sleep(0.05)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(write)
                with trio.fail_after(TTL_S + 15):
                    async for event in events:
                        seqs.extend(range(event.seq, event.end_seq + 1))
                        if watcher.connection_id not in (None, first_connection) and len(seqs) > 5:
                            break
                done.set()
            last = await tasks.create({"session_id": session["id"], "prompt": "last"})
            with trio.fail_after(10):
                async for event in events:
                    seqs.extend(range(event.seq, event.end_seq + 1))
                    if event.data.get("task_id") == last["id"]:
                        break
        assert watcher.close_reason is not None and watcher.close_reason.code == 4002
        assert seqs == list(range(seqs[0], seqs[-1] + 1)), "a gap or a duplicate"
        assert watcher.connected and watcher.expires_at is not None
