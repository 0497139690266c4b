"""Signing a browser in: one-time codes exchanged for a session cookie that
the REST routes and the WebSocket accept (with the Origin check)."""

from __future__ import annotations

import http.cookies
import pathlib
import subprocess
import sys

import orjson
import pytest
import trio
import trio_websocket
from web_support import REPO, DaemonProcess, daemon_process, free_port, request

from agor_actors.client import open_websocket
from agor_actors.daemon import Principal
from agor_actors.server._web import WebAuth, cookie_name
from agor_actors.world import simulated_world

BOB = Principal("u-bob", "Bob")


async def _codes_sequence(auth: WebAuth, bob: Principal, other: Principal) -> None:
    code = await auth.new_code(bob, "/?board=b-1")
    assert await auth.redeem(code) == (bob, "/?board=b-1")
    assert await auth.redeem(code) is None  # single use
    assert await auth.redeem("") is None and await auth.redeem("x" * 10_000) is None
    late = await auth.new_code(bob)
    await trio.sleep(60.0)
    assert await auth.redeem(late) is None  # expired
    # at most user_codes_max of a user's pending, codes_max in all: expired
    # ones are dropped first, then refused
    await auth.new_code(bob)
    await auth.new_code(bob)
    with pytest.raises(Exception, match="too many sign-in links pending for this user"):
        await auth.new_code(bob)
    await auth.new_code(other)  # another user is not held up by bob's
    with pytest.raises(Exception, match="too many sign-in links pending; try"):
        await auth.new_code(other)
    await trio.sleep(61.0)
    assert await auth.redeem(await auth.new_code(bob)) is not None


async def test_a_code_works_once_and_expires(autojump_clock: trio.testing.MockClock) -> None:
    auth = WebAuth(simulated_world(1), None, code_ttl_s=60.0, codes_max=3, user_codes_max=2)
    await _codes_sequence(auth, BOB, Principal("u-ann", "Ann"))


async def test_codes_kept_in_the_store_work_on_another_daemon(
    tmp_path: pathlib.Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The daemon's codes are kept in its store, so that another daemon on
    the same store (a cluster behind a load balancer) takes a link this one
    made; the same rules hold.  A removed user's link is refused."""
    from agor_actors.daemon import open_hub

    world = simulated_world(4)
    async with (
        open_hub(world, data_dir=tmp_path / "a") as hub,
        open_hub(world, db_url=f"sqlite:///{tmp_path / 'a' / 'agor.db'}") as other,
    ):
        owner = Principal("owner", "owner", True)
        made = await hub.call(
            owner, connection_id=None, service="users", method="create", data={"name": "Bob"}
        )
        bob = Principal(made["id"], "Bob")
        ann = await hub.call(
            owner, connection_id=None, service="users", method="create", data={"name": "Ann"}
        )
        limits = {"code_ttl_s": 60.0, "codes_max": 3, "user_codes_max": 2}
        auth = WebAuth(world, None, codes=hub, **limits)
        elsewhere = WebAuth(world, None, codes=other, **limits)
        code = await auth.new_code(bob, "/?board=b-2")
        assert await elsewhere.redeem(code) == (bob, "/?board=b-2")
        assert await auth.redeem(code) is None  # taken once, by either
        await trio.sleep(61.0)  # none pending
        await _codes_sequence(auth, bob, Principal(ann["id"], "Ann"))
        await trio.sleep(61.0)
        code = await auth.new_code(bob)
        await hub.call(owner, connection_id=None, service="users", method="remove", id=bob.user_id)
        assert await elsewhere.redeem(code) is None


async def test_the_cookie_names_the_user_and_expires(
    autojump_clock: trio.testing.MockClock,
) -> None:
    auth = WebAuth(simulated_world(2), None, session_max_age_s=3600)
    value = auth.cookie_value(BOB)
    assert auth.principal_of(value) == BOB
    assert auth.principal_of(value[:-2] + ("AA" if value[-2:] != "AA" else "BB")) is None
    assert auth.principal_of("") is None and auth.principal_of("garbage") is None
    other = WebAuth(simulated_world(3), None)
    assert other.principal_of(value) is None  # another key
    await trio.sleep(3600.0)
    assert auth.principal_of(value) is None


def test_cookie_names_differ_per_port() -> None:
    assert cookie_name(3030) == "agor_session_3030" != cookie_name(3031)


def _sign_in(daemon: DaemonProcess, token: str) -> tuple[str, str]:
    """A code for ``token``'s user exchanged for the cookie: (name, value)."""
    status, _, body = request("POST", daemon.http_url + "/auth/codes", token=token, body={})
    assert status == 201, body
    status, headers, _ = request("GET", daemon.http_url + body["path"])
    assert status == 303 and headers["location"] == "/"
    cookie = http.cookies.SimpleCookie(headers["set-cookie"])
    ((name, morsel),) = cookie.items()
    assert name == f"agor_session_{daemon.port}"
    assert morsel["httponly"] and morsel["samesite"] == "Strict" and morsel["path"] == "/"
    assert token not in headers["set-cookie"]
    return name, morsel.value


async def _ws_hello(daemon: DaemonProcess, headers: list[tuple[str, str]]) -> dict[str, object]:
    """Open /ws with ``headers``, send a hello without a token: the answer."""
    raw_headers = [(k.encode(), v.encode()) for k, v in headers]
    async with open_websocket(
        daemon.ws_url, subprotocols=["agor.v1.json"], extra_headers=raw_headers
    ) as ws:
        await ws.send_message(orjson.dumps({"type": "hello", "protocol": 1}).decode())
        with trio.fail_after(5):
            reply: dict[str, object] = orjson.loads(await ws.get_message())
        return reply


@pytest.mark.slow
async def test_sign_in_with_a_one_time_link(tmp_path: pathlib.Path) -> None:
    with daemon_process(tmp_path / "agor") as daemon:
        owner = daemon.token
        assert request("POST", daemon.http_url + "/auth/codes", body={})[0] == 401
        name, value = _sign_in(daemon, owner)
        jar = {"Cookie": f"{name}={value}"}
        status, _, me = request("GET", daemon.http_url + "/auth/me", headers=jar)
        assert status == 200 and me == {"user_id": "owner", "name": "owner", "is_owner": True}
        # the REST routes take the cookie; a foreign origin is refused even with it
        status, _, body = request(
            "POST", daemon.http_url + "/boards", headers=jar, body={"name": "B"}
        )
        assert status == 201 and body["name"] == "B"
        evil = {**jar, "Origin": "https://evil.example"}
        assert request("GET", daemon.http_url + "/boards", headers=evil)[0] == 403
        # a cookie this daemon did not sign says so (not "Bearer required")
        forged = {"Cookie": f"{name}={value[:-4]}AAAA"}
        status, _, body = request("GET", daemon.http_url + "/boards", headers=forged)
        assert status == 401 and "sign-in cookie is not valid here" in body["message"]
        # the link is single use
        status, _, code = request(
            "POST", daemon.http_url + "/auth/codes", token=owner, body={"next": "/?board=x"}
        )
        assert request("GET", daemon.http_url + code["path"])[1]["location"] == "/?board=x"
        status, _, page = request("GET", daemon.http_url + code["path"])
        assert status == 400 and "agor-actors open" in page
        # a next that leaves the site is ignored
        _, _, code = request(
            "POST", daemon.http_url + "/auth/codes", token=owner, body={"next": "//evil.example/"}
        )
        assert request("GET", daemon.http_url + code["path"])[1]["location"] == "/"
        # and so is one too long to keep (it is stored until the link is used)
        _, _, code = request(
            "POST", daemon.http_url + "/auth/codes", token=owner, body={"next": "/" + "x" * 5000}
        )
        assert request("GET", daemon.http_url + code["path"])[1]["location"] == "/"

        # the WebSocket: the cookie stands for the token in hello
        welcome = await _ws_hello(daemon, [("Cookie", f"{name}={value}")])
        assert welcome["type"] == "welcome" and welcome["user_id"] == "owner", welcome
        refused = await _ws_hello(daemon, [("Cookie", f"{name}=forged")])
        assert refused["type"] == "error" and refused["code"] == "not_authenticated"
        with pytest.raises(trio_websocket.ConnectionRejected):
            await _ws_hello(
                daemon, [("Cookie", f"{name}={value}"), ("Origin", "https://evil.example")]
            )

        # a user made with users.create signs in the same way
        _, _, bob = request("POST", daemon.http_url + "/users", token=owner, body={"name": "Bob"})
        bob_name, bob_value = _sign_in(daemon, bob["token"])
        _, _, me = request(
            "GET", daemon.http_url + "/auth/me", headers={"Cookie": f"{bob_name}={bob_value}"}
        )
        assert me == {"user_id": bob["id"], "name": "Bob", "is_owner": False}
        welcome = await _ws_hello(daemon, [("Cookie", f"{bob_name}={bob_value}")])
        assert welcome["user_id"] == bob["id"]

        # logging out clears the cookie, and closes its sign-in: the cookie's
        # value, kept elsewhere, is refused from then on
        status, headers, _ = request("POST", daemon.http_url + "/auth/logout", headers=jar)
        assert status == 200 and "Max-Age=0" in headers["set-cookie"]
        status, _, body = request("GET", daemon.http_url + "/auth/me", headers=jar)
        assert status == 401 and body["message"] == "this sign-in is no longer valid"
        refused = await _ws_hello(daemon, [("Cookie", f"{name}={value}")])
        assert refused["type"] == "error" and refused["code"] == "unauthorized"

        # the key and the sign-ins are kept in the data dir: a cookie
        # outlives a restart
        assert (daemon.data_dir / "web-secret").stat().st_mode & 0o777 == 0o600
        daemon.stop()
        daemon.start()
        bob_jar = {"Cookie": f"{bob_name}={bob_value}"}
        status, _, me = request("GET", daemon.http_url + "/auth/me", headers=bob_jar)
        assert status == 200 and me["user_id"] == bob["id"]
        # a password change signs the user's browsers out
        status, _, _ = request(
            "PATCH",
            daemon.http_url + f"/users/{bob['id']}",
            token=owner,
            body={"password": "a new password"},
        )
        assert status == 200
        assert request("GET", daemon.http_url + "/auth/me", headers=bob_jar)[0] == 401


def _open_command(url: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """``agor-actors open --url URL ARGS...`` (``stdin`` on its standard input)."""
    return subprocess.run(
        [sys.executable, "-m", "agor_actors.cli", "open", "--url", url, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        input=stdin,
        timeout=30,
    )


@pytest.mark.slow
def test_the_open_command_prints_a_working_link(tmp_path: pathlib.Path) -> None:
    with daemon_process(tmp_path / "agor") as daemon:
        status, _, board = request(
            "POST", daemon.http_url + "/boards", token=daemon.token, body={"name": "B"}
        )
        assert status == 201

        def open_board(board_id: str) -> subprocess.CompletedProcess[str]:
            data_dir = str(daemon.data_dir)
            return _open_command(daemon.http_url, "--data-dir", data_dir, "--board", board_id)

        result = open_board(board["id"])
        assert result.returncode == 0, result.stderr
        link = result.stdout.strip()
        assert link.startswith(daemon.http_url + "/auth/open?code=")
        assert daemon.token not in link
        status, headers, _ = request("GET", link)
        assert status == 303 and headers["location"] == f"/?board={board['id']}"
        assert "HttpOnly" in headers["set-cookie"]
        # a board that is not there: no link to a page that opens nothing
        missing = open_board("b-7")
        assert missing.returncode == 1 and missing.stdout == ""
        assert "refused: 404" in missing.stderr and "no board b-7" in missing.stderr
        # a password sign-in's access token needs the password too, on stdin
        status, _, ada = request(
            "POST",
            daemon.http_url + "/users",
            token=daemon.token,
            body={"name": "ada", "password": "correct horse"},
        )
        assert status == 201, ada
        status, _, signed = request(
            "POST",
            daemon.http_url + "/authentication",
            body={"strategy": "local", "name": "ada", "password": "correct horse"},
        )
        assert status == 201, signed
        token = signed["accessToken"]
        bare = _open_command(daemon.http_url, "--token", token)
        assert bare.returncode == 1 and "--password-stdin" in bare.stderr, bare.stderr
        given = _open_command(
            daemon.http_url, "--token", token, "--password-stdin", stdin="correct horse\n"
        )
        assert given.returncode == 0, given.stderr
        assert given.stdout.startswith(daemon.http_url + "/auth/open?code=")
    stopped = _open_command(f"http://127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "agor"))
    assert stopped.returncode == 1 and "cannot reach" in stopped.stderr
