"""Sign-in for people over HTTP and WebSocket, against a real daemon: the
authentication service, passwords, access tokens in hello and Bearer,
refresh rotation, reuse detection, sign-out."""

from __future__ import annotations

import logging
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from argon2 import profiles
from server_support import Daemon, daemon, http, raw_client, until_closed

from agor_actors.client import CallError, connect
from agor_actors.identity import IdentityConfig
from protocols import Welcome

CHEAP = IdentityConfig(password_params=profiles.CHEAPEST)


@pytest.fixture
async def running(tmp_path: pathlib.Path) -> AsyncIterator[Daemon]:
    async with daemon(tmp_path, identity=CHEAP) as d:
        yield d


async def _user(d: Daemon, name: str = "ada", password: str = "correct horse") -> dict:  # type: ignore[type-arg]
    reply = await http(
        "POST", f"{d.http_url}/users", token=d.token, json={"name": name, "password": password}
    )
    assert reply.status == 201, reply.body
    return reply.body  # type: ignore[no-any-return]


async def _sign_in(d: Daemon, name: str = "ada", password: str = "correct horse") -> dict:  # type: ignore[type-arg]
    reply = await http(
        "POST",
        f"{d.http_url}/authentication",
        json={"strategy": "local", "name": name, "password": password},
    )
    assert reply.status == 201, reply.body
    assert reply.headers["cache-control"] == "no-store"
    return reply.body  # type: ignore[no-any-return]


async def test_sign_in_and_use_the_access_token(running: Daemon) -> None:
    user = await _user(running)
    assert "password" not in user
    signed = await _sign_in(running)
    assert signed["user"] == {"id": user["id"], "name": "ada", "is_owner": False}
    assert {"accessToken", "refreshToken", "expiresAt", "refreshExpiresAt"} <= set(signed)
    access = signed["accessToken"]
    reply = await http("GET", f"{running.http_url}/sessions", token=access)
    assert reply.status == 200
    reply = await http("GET", f"{running.http_url}/users/{user['id']}", token=access)
    assert reply.status == 200
    assert set(reply.body) == {"id", "name", "is_owner", "created_at", "removed_at"}
    async with connect(running.ws_url, token=access) as client:
        assert client.user_id == user["id"]
        created = await client.service("sessions").create({"title": "mine"})
        assert created["title"] == "mine"
    # the local token from users.create still works
    async with connect(running.ws_url, token=user["token"]) as client:
        assert client.user_id == user["id"]


async def test_a_wrong_password_and_an_unknown_name_get_the_same_answer(
    running: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    await _user(running)
    caplog.set_level(logging.INFO, logger="agor_actors.security")
    answers = []
    for name, password in [("ada", "wrong horse!"), ("nobody", "correct horse")]:
        reply = await http(
            "POST",
            f"{running.http_url}/authentication",
            json={"strategy": "local", "name": name, "password": password},
        )
        answers.append((reply.status, reply.body))
    assert answers[0] == answers[1]
    assert answers[0][0] == 401 and answers[0][1]["code"] == "not_authenticated"
    refusals = [r for r in caplog.records if r.getMessage() == "sign-in refused"]
    assert len(refusals) == 2
    assert all("horse" not in str(r.__dict__) for r in caplog.records)


async def test_refresh_rotates_and_reuse_revokes_the_family(
    running: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    await _user(running)
    first = await _sign_in(running)
    url = f"{running.http_url}/authentication"
    reply = await http(
        "POST", url, json={"strategy": "refresh", "refreshToken": first["refreshToken"]}
    )
    assert reply.status == 201
    second = reply.body
    assert second["refreshToken"] != first["refreshToken"]
    assert second["accessToken"] != first["accessToken"]
    caplog.set_level(logging.INFO, logger="agor_actors.security")
    # the rotated token again: refused, and the whole family with it
    reply = await http(
        "POST", url, json={"strategy": "refresh", "refreshToken": first["refreshToken"]}
    )
    assert reply.status == 401 and reply.body["code"] == "not_authenticated"
    assert any(r.getMessage() == "refresh token reused: family revoked" for r in caplog.records)
    reply = await http(
        "POST", url, json={"strategy": "refresh", "refreshToken": second["refreshToken"]}
    )
    assert reply.status == 401
    # another sign-in is another family, untouched
    third = await _sign_in(running)
    reply = await http(
        "POST", url, json={"strategy": "refresh", "refreshToken": third["refreshToken"]}
    )
    assert reply.status == 201
    for record in caplog.records:
        assert first["refreshToken"] not in str(record.__dict__)


async def test_sign_out_revokes_the_refresh_token(running: Daemon) -> None:
    await _user(running)
    signed = await _sign_in(running)
    url = f"{running.http_url}/authentication"
    reply = await http("DELETE", url, json={"refreshToken": signed["refreshToken"]})
    assert reply.status == 200 and reply.body == {"revoked": 1}
    reply = await http(
        "POST", url, json={"strategy": "refresh", "refreshToken": signed["refreshToken"]}
    )
    assert reply.status == 401
    reply = await http("POST", url, json={"strategy": "refresh", "refreshToken": "made-up"})
    assert reply.status == 401
    reply = await http("POST", url, json={"strategy": "magic"})
    assert reply.status == 400 and reply.body["code"] == "invalid_field"


async def test_authentication_over_the_websocket(running: Daemon) -> None:
    await _user(running)
    signed = await _sign_in(running)
    async with connect(running.ws_url, token=signed["accessToken"]) as client:
        auth = client.service("authentication")
        rotated = await auth.create({"strategy": "refresh", "refreshToken": signed["refreshToken"]})
        assert rotated["user"]["name"] == "ada"
        with pytest.raises(CallError) as caught:
            await auth.create({"strategy": "local", "name": "ada", "password": "nope nope"})
        assert caught.value.code == "not_authenticated"
        assert client.connected  # a refused sign-in does not close the connection
        # the family: the rotated token and the current one
        assert await auth.call("remove", None, {"refreshToken": rotated["refreshToken"]}) == {
            "revoked": 2
        }


async def test_a_password_change_revokes_refresh_tokens(running: Daemon) -> None:
    user = await _user(running)
    signed = await _sign_in(running)
    reply = await http(
        "PATCH",
        f"{running.http_url}/users/{user['id']}",
        token=signed["accessToken"],
        json={"password": "battery staple", "current_password": "correct horse"},
    )
    assert reply.status == 200 and "password" not in str(reply.body)
    reply = await http(
        "POST",
        f"{running.http_url}/authentication",
        json={"strategy": "refresh", "refreshToken": signed["refreshToken"]},
    )
    assert reply.status == 401
    # the access token issued under the old password is refused too
    reply = await http("GET", f"{running.http_url}/boards", token=signed["accessToken"])
    assert reply.status == 401
    again = await _sign_in(running, password="battery staple")
    reply = await http("GET", f"{running.http_url}/boards", token=again["accessToken"])
    assert reply.status == 200
    reply = await http(
        "POST",
        f"{running.http_url}/authentication",
        json={"strategy": "local", "name": "ada", "password": "correct horse"},
    )
    assert reply.status == 401
    # someone else's password: only the owner
    other = await _user(running, "bob", "bob's password")
    reply = await http(
        "PATCH",
        f"{running.http_url}/users/{other['id']}",
        token=again["accessToken"],
        json={"password": "taken over!"},
    )
    assert reply.status == 403


async def test_users_create_refuses_bad_passwords_and_taken_names(running: Daemon) -> None:
    reply = await http(
        "POST",
        f"{running.http_url}/users",
        token=running.token,
        json={"name": "x", "password": "short"},
    )
    assert reply.status == 400 and "8 to 1024" in reply.body["message"]
    await _user(running)
    reply = await http(
        "POST",
        f"{running.http_url}/users",
        token=running.token,
        json={"name": "ada", "password": "another one"},
    )
    assert reply.status == 409


async def test_refused_access_tokens_close_the_websocket_and_401(
    running: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    await _user(running)
    signed = await _sign_in(running)
    head, body, sig = signed["accessToken"].split(".")
    forged = f"{head}.{body}.{sig[:-4]}AAAA"
    caplog.set_level(logging.INFO, logger="agor_actors.security")
    reply = await http("GET", f"{running.http_url}/sessions", token=forged)
    assert reply.status == 401 and reply.body["code"] == "not_authenticated"
    async with raw_client(running.ws_url, token=forged) as raw:
        messages, reason = await until_closed(raw)
    assert reason.code == 4001
    assert not any(isinstance(m, Welcome) for m in messages)
    reasons = [
        getattr(r, "reason", None)
        for r in caplog.records
        if r.getMessage() == "access token refused"
    ]
    assert reasons == ["bad_signature", "bad_signature"]
    for record in caplog.records:
        assert forged not in str(record.__dict__)


async def test_verify_only_daemons_do_not_sign_in(tmp_path: pathlib.Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    public = tmp_path / "public.pem"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    config = IdentityConfig(public_key=public, password_params=profiles.CHEAPEST)
    async with daemon(tmp_path / "data", identity=config) as d:
        reply = await http(
            "POST",
            f"{d.http_url}/authentication",
            json={"strategy": "local", "name": "owner", "password": "whatever!"},
        )
        assert reply.status == 503 and reply.body["code"] == "unavailable"
        # a token signed elsewhere with the private key is accepted
        from agor_actors.identity import AccessTokens, JwtKeys

        signer = AccessTokens(JwtKeys("ES256", key.public_key(), key))
        token, _ = signer.issue("owner", now_ms=d.hub.world.wall.now_ms(), jti="x")
        reply = await http("GET", f"{d.http_url}/sessions", token=token)
        assert reply.status == 200


async def test_password_guessing_is_throttled_per_name(running: Daemon) -> None:
    from agor_actors.identity import SignInThrottle

    await _user(running)
    assert running.hub.identity is not None
    running.hub.identity.throttle = SignInThrottle(max_failures=3)
    url = f"{running.http_url}/authentication"
    for _ in range(3):
        reply = await http(
            "POST", url, json={"strategy": "local", "name": "ada", "password": "guess guess"}
        )
        assert reply.status == 401
    # now even the right password waits: the guesser cannot tell
    reply = await http(
        "POST", url, json={"strategy": "local", "name": "ada", "password": "correct horse"}
    )
    assert reply.status == 429 and reply.body["code"] == "rate_limited"
    assert reply.body["data"]["retry_after_ms"] > 0
    # another name is not affected
    await _user(running, "bob", "bob's password")
    await _sign_in(running, "bob", "bob's password")


async def test_tokens_signed_with_the_daemons_key_but_wrong_are_refused(running: Daemon) -> None:
    """A wrong audience, a wrong issuer, alg none and an expired token, each
    signed (or not) as an attacker holding the claims could: all 401."""
    import jwt

    user = await _user(running)
    secret = (running.data_dir / "jwt-secret").read_text().strip()
    now_s = running.hub.world.wall.now_ms() // 1000
    assert running.hub.identity is not None
    known = await running.hub.identity.known_user(user["id"])
    assert known is not None and len(known[1]) == 16
    good = {
        "sub": user["id"],
        "aud": "agor",
        "iss": "agor-actors",
        "iat": now_s,
        "exp": now_s + 60,
        "jti": "j",
        "gen": known[1],  # the user's password, as the daemon names it
    }
    assert (
        await http("GET", f"{running.http_url}/sessions", token=jwt.encode(good, secret))
    ).status == 200
    bad = [
        jwt.encode({**good, "aud": "elsewhere"}, secret),
        jwt.encode({**good, "iss": "someone"}, secret),
        jwt.encode({**good, "exp": now_s - 1}, secret),
        jwt.encode({**good, "sub": "owner"}, "x" * 48),  # forged: another key
        jwt.encode({**good, "sub": "owner"}, None, algorithm="none"),  # type: ignore[arg-type]
        jwt.encode({**good, "sub": "nobody"}, secret),  # no such user
        jwt.encode({**good, "gen": "0" * 16}, secret),  # issued under another password
        jwt.encode({k: v for k, v in good.items() if k != "gen"}, secret),  # under none
        jwt.encode({**good, "gen": 7}, secret),  # malformed
    ]
    for token in bad:
        reply = await http("GET", f"{running.http_url}/sessions", token=token)
        assert reply.status == 401 and reply.body["code"] == "not_authenticated", token


async def test_changing_ones_own_password_needs_the_current_one(running: Daemon) -> None:
    # a stolen access token (or an open tab) was enough to take the account
    # over: a new password, and every other sign-in of the user closed
    user = await _user(running)
    signed = await _sign_in(running)
    url = f"{running.http_url}/users/{user['id']}"

    async def change(body: dict, token: str = signed["accessToken"]) -> Any:  # type: ignore[type-arg]
        return await http("PATCH", url, token=token, json=body)

    for body, said in (
        ({"password": "taken over!"}, "data.current_password is required to change a password"),
        (
            {"password": "taken over!", "current_password": "a guess"},
            "data.current_password is not this user's password",
        ),
        ({"password": "taken over!", "name": "x"}, "users.patch takes only data.password"),
    ):
        reply = await change(body)
        assert reply.status == 400 and reply.body["code"] == "invalid_field", reply
        assert reply.body["message"].startswith(said), reply.body
    # wrong guesses count as failed sign-ins of the name: past the limit, refused
    for _ in range(9):
        await change({"password": "taken over!", "current_password": "a guess"})
    reply = await change({"password": "taken over!", "current_password": "correct horse"})
    assert reply.status == 429 and reply.body["code"] == "rate_limited", reply
    reply = await http(
        "POST",
        f"{running.http_url}/authentication",
        json={"strategy": "local", "name": "ada", "password": "correct horse"},
    )
    assert reply.status == 429  # (the same count as a sign-in's)
    # the owner needs none; a user without a password sets its first one
    assert (await change({"password": "reset by owner"}, running.token)).status == 200
    fresh = await http(
        "POST", f"{running.http_url}/users", token=running.token, json={"name": "nopw"}
    )
    first = await http(
        "PATCH",
        f"{running.http_url}/users/{fresh.body['id']}",
        token=fresh.body["token"],
        json={"password": "my first password"},
    )
    assert first.status == 200, first


async def test_renewing_ones_token_with_an_access_token_needs_the_password(
    running: Daemon,
) -> None:
    # an access token (15 minutes) was enough to get a token that never expires
    user = await _user(running)
    signed = await _sign_in(running)
    url = f"{running.http_url}/users/{user['id']}/rotate_token"
    bare = await http("POST", url, token=signed["accessToken"])
    assert bare.status == 400, bare
    assert bare.body["message"] == "data.current_password is required to renew a token"
    wrong = await http(
        "POST", url, token=signed["accessToken"], json={"current_password": "a guess"}
    )
    assert wrong.status == 400 and "is not this user's password" in wrong.body["message"]
    renewed = await http(
        "POST", url, token=signed["accessToken"], json={"current_password": "correct horse"}
    )
    assert renewed.status == 200 and renewed.body["token"] != user["token"], renewed
    # with the token itself (or by the owner) no password is asked
    again = await http("POST", url, token=renewed.body["token"])
    assert again.status == 200, again
    assert (await http("POST", url, token=running.token)).status == 200


async def test_a_browser_sign_in_from_an_access_token_or_a_cookie_needs_the_password(
    running: Daemon,
) -> None:
    # a 15-minute access token (or a cookie) minted a week-long browser sign-in
    from test_server_user_removal import _cookie

    user = await _user(running)
    signed = await _sign_in(running)
    codes = f"{running.http_url}/auth/codes"
    bare = await http("POST", codes, token=signed["accessToken"], json={})
    assert bare.status == 400, bare
    assert bare.body["message"] == "data.current_password is required to sign a browser in"
    made = await http(
        "POST", codes, token=signed["accessToken"], json={"current_password": "correct horse"}
    )
    assert made.status == 201, made
    # a browser signed in with the user's own token mints none without it
    cookie = await _cookie(running, user["token"])
    origin = running.http_url
    headers = {"Cookie": cookie, "Origin": origin}
    by_cookie = await http("POST", codes, headers=headers, json={})
    assert by_cookie.status == 400 and "current_password" in by_cookie.body["message"]
    with_pw = await http("POST", codes, headers=headers, json={"current_password": "correct horse"})
    assert with_pw.status == 201, with_pw


async def test_a_cookie_alone_does_not_give_its_user_a_first_password(running: Daemon) -> None:
    """A user without a password, signed in to a browser from its own
    token: the cookie (an open tab) set a password and so bought a sign-in
    that outlives it (30 days of refresh tokens)."""
    from test_server_user_removal import _cookie

    made = await http("POST", f"{running.http_url}/users", token=running.token, json={"name": "np"})
    assert made.status == 201, made
    url = f"{running.http_url}/users/{made.body['id']}"
    cookie = await _cookie(running, made.body["token"])
    headers = {"Cookie": cookie, "Origin": running.http_url}
    by_cookie = await http("PATCH", url, headers=headers, json={"password": "a first one"})
    assert by_cookie.status == 403 and "to change a password" in by_cookie.body["message"], (
        by_cookie
    )
    by_token = await http("PATCH", url, token=made.body["token"], json={"password": "a first one"})
    assert by_token.status == 200, by_token
    # (which closed the browser's sign-in); now that it has one, a cookie names it
    headers["Cookie"] = await _cookie(running, made.body["token"])
    again = await http(
        "PATCH",
        url,
        headers=headers,
        json={"password": "a second one", "current_password": "a first one"},
    )
    assert again.status == 200, again


async def test_the_owner_signed_in_by_password_names_it_too(running: Daemon) -> None:
    # what is asked of a sign-in is the credential's, not the user's rank
    url = running.http_url
    given = await http(
        "PATCH", f"{url}/users/owner", token=running.token, json={"password": "owner's own pw"}
    )
    assert given.status == 200, given
    signed = await _sign_in(running, "owner", "owner's own pw")
    bare = await http("POST", f"{url}/auth/codes", token=signed["accessToken"], json={})
    assert bare.status == 400 and "current_password" in bare.body["message"], bare
    with_pw = await http(
        "POST",
        f"{url}/auth/codes",
        token=signed["accessToken"],
        json={"current_password": "owner's own pw"},
    )
    assert with_pw.status == 201, with_pw
    # a user (whose token never expires) is made with the password too
    made = await http("POST", f"{url}/users", token=signed["accessToken"], json={"name": "x"})
    assert made.status == 400 and "to create a user" in made.body["message"], made
    made = await http(
        "POST",
        f"{url}/users",
        token=signed["accessToken"],
        json={"name": "x", "current_password": "owner's own pw"},
    )
    assert made.status == 201 and made.body["name"] == "x", made
    # nor does it set a user's password (a sign-in that outlives the token) without it
    x = f"{url}/users/{made.body['id']}"
    bare = await http("PATCH", x, token=signed["accessToken"], json={"password": "x's new pw"})
    assert bare.status == 400 and "to change a password" in bare.body["message"], bare
    wrong = await http(
        "PATCH",
        x,
        token=signed["accessToken"],
        json={"password": "x's new pw", "current_password": "not it"},
    )
    assert wrong.status == 400 and "is not this user's password" in wrong.body["message"], wrong
    set_pw = await http(
        "PATCH",
        x,
        token=signed["accessToken"],
        json={"password": "x's new pw", "current_password": "owner's own pw"},
    )
    assert set_pw.status == 200, set_pw
    assert (await _sign_in(running, "x", "x's new pw"))["accessToken"]
    # the owner's token itself is asked nothing
    assert (await http("POST", f"{url}/auth/codes", token=running.token, json={})).status == 201
