"""The REST routes, /health and /debug/actors over real HTTP, and that HTTP
and WebSocket agree (same services, same events)."""

from __future__ import annotations

import logging
import pathlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import pytest
import trio
from server_support import Daemon, daemon, http

from agor_actors.client import CallError, connect
from agor_actors.server import ServerSettings, origin_allowed, parse_query
from agor_actors.server._settings import normalize_origin, own_origins


@pytest.fixture
async def running(tmp_path: pathlib.Path) -> AsyncIterator[Daemon]:
    async with daemon(tmp_path / "agor") as d:
        yield d


async def test_health_needs_no_token(running: Daemon) -> None:
    reply = await http("GET", f"{running.http_url}/health")
    assert reply.status == 200 and reply.body["status"] == "ok"


async def test_debug_actors_is_the_owners(running: Daemon) -> None:
    url = f"{running.http_url}/debug/actors"
    reply = await http("GET", url, token=running.token)
    assert reply.status == 200
    assert reply.body["name"] == "root" and isinstance(reply.body["children"], list)
    assert (await http("GET", url)).status == 401
    user = await http("POST", f"{running.http_url}/users", token=running.token, json={"name": "bo"})
    assert user.status == 201 and user.body["token"]
    refused = await http("GET", url, token=user.body["token"])
    assert refused.status == 403 and refused.body["code"] == "forbidden"


async def test_requests_without_a_valid_token_get_401(running: Daemon) -> None:
    for token in (None, "wrong"):
        reply = await http("GET", f"{running.http_url}/sessions", token=token)
        assert reply.status == 401
        assert reply.body["code"] == "not_authenticated"
        assert reply.headers.get("www-authenticate") == "Bearer"


async def test_crud_over_http(running: Daemon) -> None:
    base, token = running.http_url, running.token
    created = await http("POST", f"{base}/sessions", token=token, json={"title": "one"})
    assert created.status == 201 and created.body["title"] == "one"
    sid = created.body["id"]
    assert created.headers["etag"] == '"1"'
    got = await http("GET", f"{base}/sessions/{sid}", token=token)
    assert got.status == 200 and got.body["id"] == sid
    patched = await http("PATCH", f"{base}/sessions/{sid}", token=token, json={"status": "running"})
    assert patched.status == 200 and patched.body["status"] == "running"
    task = await http(
        "POST", f"{base}/tasks", token=token, json={"session_id": sid, "prompt": "go"}
    )
    assert task.status == 201
    started = await http("POST", f"{base}/tasks/{task.body['id']}/start", token=token)
    assert started.status == 200 and started.body["status"] == "running"
    await http("POST", f"{base}/sessions", token=token, json={"title": "two"})
    found = await http("GET", f"{base}/sessions?status=running", token=token)
    assert [row["id"] for row in found.body["data"]] == [sid]
    page = await http("GET", f"{base}/sessions?$limit=1&$sort[created_at]=-1", token=token)
    assert len(page.body["data"]) == 1 and page.body["data"][0]["title"] == "two"
    assert page.body["next_cursor"]
    rest = await http(
        "GET",
        f"{base}/sessions?$limit=1&$sort=-created_at&$cursor={page.body['next_cursor']}",
        token=token,
    )
    assert [row["title"] for row in rest.body["data"]] == ["one"]
    removed = await http("DELETE", f"{base}/sessions/{sid}", token=token)
    assert removed.status == 200
    missing = await http("GET", f"{base}/sessions/{sid}", token=token)
    assert missing.status == 404 and missing.body["code"] == "not_found"


async def test_strict_fields_use_if_match_as_base_rev(running: Daemon) -> None:
    base, token = running.http_url, running.token
    sid = (await http("POST", f"{base}/sessions", token=token, json={"title": "t"})).body["id"]
    stale = await http(
        "PATCH",
        f"{base}/sessions/{sid}",
        token=token,
        json={"locked_by": "owner"},
        headers={"If-Match": '"7"'},
    )
    assert stale.status == 412 and stale.body["code"] == "conflict"  # a stale If-Match
    assert stale.body["data"]["current"] == {"locked_by": None}
    fresh = await http(
        "PATCH",
        f"{base}/sessions/{sid}",
        token=token,
        json={"locked_by": "owner"},
        headers={"If-Match": '"1"'},
    )
    assert fresh.status == 200 and fresh.body["locked_by"] == "owner"
    bad = await http(
        "PATCH",
        f"{base}/sessions/{sid}",
        token=token,
        json={"title": "x"},
        headers={"If-Match": "abc"},
    )
    assert bad.status == 400


async def test_a_tasks_rev_moves_with_each_change_and_guards_if_match(
    running: Daemon, tmp_path: pathlib.Path
) -> None:
    """A task's rev moves on every change (a patch, a transition), a
    stale ``If-Match`` is refused with 412 and changes nothing, a patch
    answers the record (with its ``ETag``), the events carry the rev, and
    the stored record says the same."""
    base, token = running.http_url, running.token
    sid = (await http("POST", f"{base}/sessions", token=token, json={"title": "t"})).body["id"]
    task = await http(
        "POST", f"{base}/tasks", token=token, json={"session_id": sid, "prompt": "go"}
    )
    tid = task.body["id"]
    assert task.body["rev"] == 1 and task.headers["etag"] == '"1"'
    async with connect(running.ws_url, token=token) as client:
        mirror = await client.join(f"session:{sid}")
        events = client.events(f"session:{sid}")
        patched = await http(
            "PATCH",
            f"{base}/tasks/{tid}",
            token=token,
            json={"prompt": "go on"},
            headers={"If-Match": '"1"'},
        )
        assert patched.status == 200 and patched.headers["etag"] == '"2"'
        assert patched.body["id"] == tid and patched.body["prompt"] == "go on"
        assert patched.body["rev"] == 2 and patched.body["status"] == "created"
        started = await http("POST", f"{base}/tasks/{tid}/start", token=token)
        assert started.status == 200 and started.body["rev"] == 3
        stale = await http(
            "PATCH",
            f"{base}/tasks/{tid}",
            token=token,
            json={"prompt": "lost"},
            headers={"If-Match": '"2"'},
        )
        assert stale.status == 412 and stale.body["code"] == "conflict"
        assert stale.body["data"]["rev"] == 3
        seen = []
        with trio.fail_after(10):
            async for event in events:
                seen.append((event.name, event.data.get("rev")))
                if len(seen) == 2:
                    break
            await mirror.wait_until(lambda m: (m.get("tasks", tid) or {}).get("rev") == 3)
        assert seen == [("task:updated", 2), ("task:started", 3)]
        got = await http("GET", f"{base}/tasks/{tid}", token=token)
        assert got.body["rev"] == 3 and got.body["prompt"] == "go on"
        assert got.body["status"] == "running"
        assert mirror.get("tasks", tid) == got.body  # what the events made of it


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("POST", "/sessions", b'{"title": ', 400, "bad_json"),
        ("POST", "/sessions", b"\xff\xfe", 400, "bad_json"),
        ("PATCH", "/sessions/x", b"[1,", 400, "bad_json"),
        ("GET", "/nope", None, 404, "unknown_service"),
        ("GET", "/sessions/does-not-exist", None, 404, "not_found"),
        ("GET", "/sessions?$bogus=1", None, 400, "bad_request"),
        ("GET", "/sessions?no_such_column=1", None, 400, "invalid_field"),
        ("POST", "/sessions/x/y/z", None, 404, "not_found"),
        ("PUT", "/sessions", b"{}", 405, "unknown_method"),
        # a misspelt custom method is not a missing record
        ("POST", "/sessions/does-not-exist/set_stauts", b"{}", 405, "unknown_method"),
        # a standard method is called with its own verb, not as a custom one
        ("POST", "/sessions/x/remove", None, 404, "not_found"),
        ("POST", "/sessions/x/patch", b'{"title": "t"}', 404, "not_found"),
        ("POST", "/tasks/x/find", None, 404, "not_found"),
    ],
)
async def test_malformed_requests_get_json_errors(
    running: Daemon, method: str, path: str, body: bytes | None, status: int, code: str
) -> None:
    reply = await http(method, f"{running.http_url}{path}", token=running.token, raw=body)
    assert reply.status == status
    assert reply.body["code"] == code and reply.body["message"]
    # and the daemon is fine
    assert (await http("GET", f"{running.http_url}/health")).status == 200


async def test_a_standard_method_is_no_custom_method(running: Daemon) -> None:
    """``POST /<service>/<id>/<method>`` names custom methods only: a
    standard one there is no path (it removed, patched or created a record
    past its own verb, and past the If-Match that verb reads)."""
    base, token = running.http_url, running.token
    sid = (await http("POST", f"{base}/sessions", token=token, json={"title": "t"})).body["id"]
    for name, route in (
        ("remove", "DELETE /<service>/<id>"),
        ("patch", "PATCH /<service>/<id>"),
        ("update", "PUT /<service>/<id>"),
        ("create", "POST /<service>"),
        ("get", "GET /<service>/<id>"),
        ("find", "GET /<service>"),
    ):
        reply = await http(
            "POST", f"{base}/sessions/{sid}/{name}", token=token, json={"title": "x"}
        )
        assert reply.status == 404, (name, reply)
        assert reply.body["message"] == (
            f"no such path: {name} is not a custom method; it is {route}"
        )
    kept = await http("GET", f"{base}/sessions/{sid}", token=token)
    assert kept.status == 200 and kept.body["title"] == "t" and kept.body["rev"] == 1
    assert len((await http("GET", f"{base}/sessions", token=token)).body["data"]) == 1


@pytest.mark.parametrize(
    ("method", "path", "allow", "hint"),
    [
        ("DELETE", "/sessions", "GET, POST", "a record is removed at /<service>/<id>"),
        ("PUT", "/sessions", "GET, POST", None),
        ("POST", "/sessions/x", "DELETE, GET, PATCH, PUT", None),
        ("GET", "/tasks/x/start", "POST", "a custom method is called with POST"),
        # the daemon's own paths name their own methods (not the services')
        ("PUT", "/health", "GET", None),
        ("PATCH", "/metrics", "GET", None),
        ("POST", "/health", "GET", None),
        ("POST", "/metrics", "GET", None),
        ("POST", "/auth/me", "GET", None),
        ("GET", "/auth/logout", "POST", None),
    ],
)
async def test_a_method_not_allowed_says_which_are(
    running: Daemon, method: str, path: str, allow: str, hint: str | None
) -> None:
    reply = await http(method, f"{running.http_url}{path}", token=running.token)
    assert reply.status == 405 and reply.body["code"] == "unknown_method"
    assert reply.headers["allow"] == allow
    message = reply.body["message"]
    assert message.startswith(f"{method} is not allowed on {path}; allowed: {allow}")
    assert (hint is None and "(" not in message) or (hint is not None and hint in message)


@pytest.mark.parametrize("path", ["/web//etc/passwd", "/client/../token", "/nothing/x/y"])
async def test_a_path_of_no_service_is_404_not_405(running: Daemon, path: str) -> None:
    # (/web//etc/passwd has the shape of /<service>/<id>/<method>: it got
    # 405 "allowed: POST", as though POSTing there could help)
    reply = await http("GET", f"{running.http_url}{path}", token=running.token)
    assert reply.status == 404 and reply.body["code"] == "not_found"
    assert reply.body["message"].startswith("no such path: services are at /<service>: boards")


async def test_oversized_bodies_are_refused(tmp_path: pathlib.Path) -> None:
    from agor_actors.server import ServerSettings

    async with daemon(tmp_path / "agor", ServerSettings(max_body_bytes=1000)) as d:
        reply = await http(
            "POST", f"{d.http_url}/sessions", token=d.token, raw=b'{"title":"' + b"x" * 2000 + b'"}'
        )
        assert reply.status == 413 and reply.body["code"] == "too_large"


async def test_foreign_origins_are_refused(running: Daemon) -> None:
    reply = await http(
        "GET",
        f"{running.http_url}/sessions",
        token=running.token,
        headers={"Origin": "https://evil.example"},
    )
    assert reply.status == 403 and reply.body["code"] == "forbidden"
    # another local port is another origin (another local web app)
    other = await http(
        "GET",
        f"{running.http_url}/sessions",
        token=running.token,
        headers={"Origin": f"http://localhost:{running.port + 1}"},
    )
    assert other.status == 403
    own = await http(
        "GET",
        f"{running.http_url}/sessions",
        token=running.token,
        headers={"Origin": f"http://localhost:{running.port}"},
    )
    assert own.status == 200


async def test_allowed_origins_are_configured(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agor_actors.security")
    settings = ServerSettings(allow_origins=("https://app.example.com", "http://LOCALHOST:5173/"))
    async with daemon(tmp_path, settings) as d:
        for origin, status in [
            ("https://app.example.com", 200),
            ("https://app.example.com:443", 200),
            ("http://localhost:5173", 200),
            ("http://app.example.com", 403),
            ("https://evil.example", 403),
        ]:
            reply = await http(
                "GET", f"{d.http_url}/sessions", token=d.token, headers={"Origin": origin}
            )
            assert reply.status == status, origin
    refused = [r for r in caplog.records if r.getMessage() == "origin refused"]
    assert [getattr(r, "origin", None) for r in refused] == [
        "http://app.example.com",
        "https://evil.example",
    ]


async def test_http_writes_are_seen_over_websocket_and_back(running: Daemon) -> None:
    base, token = running.http_url, running.token
    async with connect(running.ws_url, token=token, codec="cbor") as client:
        sid = (await http("POST", f"{base}/sessions", token=token, json={"title": "shared"})).body[
            "id"
        ]
        assert (await client.service("sessions").get(sid))["title"] == "shared"
        mirror = await client.join(f"session:{sid}")
        stream = client.events(f"session:{sid}")
        task = (
            await http(
                "POST", f"{base}/tasks", token=token, json={"session_id": sid, "prompt": "p"}
            )
        ).body
        with trio.fail_after(5):
            event = await stream.__anext__()
        assert event.name == "task:created" and event.data["task"]["id"] == task["id"]
        assert event.origin is None and not event.own  # HTTP writes have no connection
        assert mirror.get("tasks", task["id"]) == {
            k: v for k, v in task.items() if not k.startswith("_")
        }
        found = await client.service("tasks").find({"session_id": sid})
        assert [row["id"] for row in found["data"]] == [task["id"]]
        # and the other way round
        over_ws = await client.service("tasks").create({"session_id": sid, "prompt": "from ws"})
        got = await http("GET", f"{base}/tasks/{over_ws['id']}", token=token)
        assert got.status == 200 and got.body["prompt"] == "from ws"
        listed = await http(
            "GET", f"{base}/tasks?session_id={quote(sid)}&$sort[created_at]=1", token=token
        )
        assert [row["id"] for row in listed.body["data"]] == [task["id"], over_ws["id"]]


# ------------------------------------------------------------ pure helpers


@pytest.mark.parametrize(
    ("pairs", "query"),
    [
        ([("status", "running"), ("$limit", "10")], {"status": "running", "$limit": 10}),
        ([("$sort[created_at]", "-1"), ("$sort[id]", "1")], {"$sort": {"created_at": -1, "id": 1}}),
        ([("$sort", "-created_at,id")], {"$sort": {"created_at": -1, "id": 1}}),
        ([("rev[$gte]", "2"), ("rev[$lt]", "5")], {"rev": {"$gte": 2, "$lt": 5}}),
        ([("status[$in]", "idle,running")], {"status": {"$in": ["idle", "running"]}}),
        (
            [("status[$nin][]", "idle"), ("status[$nin][]", "failed")],
            {"status": {"$nin": ["idle", "failed"]}},
        ),
        ([("status", "idle"), ("status", "running")], {"status": {"$in": ["idle", "running"]}}),
        ([("title", '"123"'), ("agent", "null")], {"title": "123", "agent": None}),
        (
            [("$select", "id,title"), ("$total", "true")],
            {"$select": ["id", "title"], "$total": True},
        ),
        ([("$cursor", "abc")], {"$cursor": "abc"}),
        (
            [("$query", '{"rev": {"$gt": 1}}'), ("status", "idle")],
            {"rev": {"$gt": 1}, "status": "idle"},
        ),
    ],
)
def test_query_strings_become_find_queries(
    pairs: list[tuple[str, str]], query: dict[str, Any]
) -> None:
    assert parse_query(pairs) == query


@pytest.mark.parametrize(
    "pairs",
    [
        [("$limit", "ten")],
        [("$sort[created_at]", "2")],
        [("$what", "1")],
        [("rev[$regex]", "x")],
        [("$query", "[1]")],
        [("$query", "{")],
        [("status", "idle"), ("status[$ne]", "x")],
        [("a]b", "1")],
    ],
)
def test_bad_query_strings_are_refused(pairs: list[tuple[str, str]]) -> None:
    from agor_actors.daemon import ServiceError

    with pytest.raises(ServiceError) as caught:
        parse_query(pairs)
    assert caught.value.code == "bad_request" and caught.value.http_status == 400


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (None, True),
        ("", True),
        ("http://127.0.0.1:3030", True),
        ("http://localhost:3030", True),
        ("HTTP://LOCALHOST:3030/", True),
        ("http://[::1]:3030", True),
        ("http://localhost", False),
        ("https://localhost:3030", False),
        ("http://localhost:3031", False),
        ("null", False),
        ("file://", False),
        ("http://localhost.example.com:3030", False),
        ("http://127.0.0.1.nip.io:3030", False),
        ("http://user@localhost:3030", False),
        ("http://localhost:notaport", False),
        ("ws://localhost:3030", False),
    ],
)
def test_origin_check(origin: str | None, allowed: bool) -> None:
    own = own_origins("127.0.0.1", 3030, tls=False)
    assert origin_allowed(origin, own) is allowed


def test_own_origins() -> None:
    assert own_origins("127.0.0.1", 3030, tls=True) == {
        "https://127.0.0.1:3030",
        "https://localhost:3030",
        "https://[::1]:3030",
    }
    assert own_origins("agor.example.com", 443, tls=True) == {"https://agor.example.com"}
    assert normalize_origin("https://A.example:443/") == "https://a.example"
    assert normalize_origin("https://a.example/path") is None


async def test_a_refused_find_says_what_is_wrong_and_hides_what_clients_never_see(
    running: Daemon,
) -> None:
    """A ``find`` the query language refuses names the fault (over HTTP and
    over the WebSocket alike); the merge clocks and token hashes can be
    neither named nor listed."""
    base, token = running.http_url, running.token

    async def refused(path: str) -> str:
        reply = await http("GET", f"{base}{path}", token=token)
        assert reply.status == 400 and reply.body["code"] == "invalid_field", reply.body
        return str(reply.body["message"])

    unknown = await refused("/sessions?titl=1")
    assert unknown.startswith("query: unknown column 'titl' in sessions; columns: id, ")
    assert "title" in unknown and "clocks" not in unknown
    assert await refused("/sessions?$limit=-1") == (
        "query: $limit must be an integer from 0 to 500, got -1"
    )
    assert "unknown column 'clocks'" in await refused("/sessions?$select=clocks")
    assert "unknown column 'clocks'" in await refused("/sessions?$sort=-clocks")
    hashes = await refused("/users?token_hash[$gt]=0")
    assert "unknown column 'token_hash'" in hashes and "columns: id, name," in hashes
    assert "token_hash" not in hashes.partition("columns:")[2]
    assert await refused("/sessions?created_at[$gt]=soon") == (
        "query: created_at: expected int, got str 'soon'"
    )
    # a query-string value that reads as a number is one: the answer says how to quote it
    assert 'put it in double quotes for the text: name="1"' in await refused("/tasks?prompt=1")
    assert (await http("GET", f"{base}/tasks?prompt=%221%22", token=token)).status == 200
    # nothing internal in a page either
    await http("POST", f"{base}/sessions", token=token, json={"title": "one"})
    page = await http("GET", f"{base}/sessions", token=token)
    assert page.status == 200 and page.body["data"]
    assert all("clocks" not in row for row in page.body["data"])

    async with connect(running.ws_url, token=token) as client:
        with pytest.raises(CallError) as caught:
            await client.service("sessions").find({"titl": 1})
        assert caught.value.code == "invalid_field"
        assert caught.value.message.startswith("query: unknown column 'titl' in sessions")


async def test_the_idempotency_key_header(running: Daemon) -> None:
    """A POST sent again under its ``Idempotency-Key`` is answered as the
    first was (``Idempotent-Replayed: true``), and runs once; the key sent
    with another body is refused."""
    base, token = running.http_url, running.token
    session = await http("POST", f"{base}/sessions", token=token, json={"title": "keys"})
    body = {"session_id": session.body["id"], "prompt": "over http"}
    keyed = {"Idempotency-Key": "http-key-1"}
    first = await http("POST", f"{base}/tasks", token=token, json=body, headers=keyed)
    again = await http("POST", f"{base}/tasks", token=token, json=body, headers=keyed)
    assert first.status == again.status == 201
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert again.body == first.body
    other = {**body, "prompt": "other"}
    refused = await http("POST", f"{base}/tasks", token=token, json=other, headers=keyed)
    assert refused.status == 400 and refused.body["code"] == "invalid_field"
    found = await http("GET", f"{base}/tasks?session_id={session.body['id']}", token=token)
    assert [t["id"] for t in found.body["data"]] == [first.body["id"]]


async def test_a_reference_to_a_record_that_does_not_exist_is_named(running: Daemon) -> None:
    # (the store's refusal says only "the data does not fit the records",
    # which left a newcomer guessing which field was wrong)
    url, token = running.http_url, running.token
    board = (await http("POST", f"{url}/boards", token=token, json={"name": "b"})).body
    session = (await http("POST", f"{url}/sessions", token=token, json={"title": "s"})).body
    refused = [
        await http("POST", f"{url}/sessions", token=token, json={"title": "x", "board_id": "nope"}),
        await http(
            "PATCH", f"{url}/sessions/{session['id']}", token=token, json={"board_id": "nope"}
        ),
        await http(
            "POST",
            f"{url}/boards/{board['id']}/add_member",
            token=token,
            json={"user_id": "nobody", "role": "viewer"},
        ),
    ]
    assert [(r.status, r.body["code"], r.body["message"]) for r in refused] == [
        (400, "invalid_field", "data.board_id: no board nope"),
        (400, "invalid_field", "data.board_id: no board nope"),
        (400, "invalid_field", "data.user_id: no user nobody"),
    ]
    # nothing of them was written, and the same writes with real records work
    moved = await http(
        "PATCH", f"{url}/sessions/{session['id']}", token=token, json={"board_id": board["id"]}
    )
    assert moved.status == 200 and moved.body["board_id"] == board["id"] and moved.body["rev"] == 2
    user = (await http("POST", f"{url}/users", token=token, json={"name": "ann"})).body
    added = await http(
        "POST",
        f"{url}/boards/{board['id']}/add_member",
        token=token,
        json={"user_id": user["id"], "role": "viewer"},
    )
    assert added.status == 200
    # another user is refused a board it cannot write to, whether or not it
    # exists (the refusal does not tell it which boards exist)
    theirs = await http(
        "POST", f"{url}/sessions", token=user["token"], json={"title": "x", "board_id": "nope"}
    )
    assert (theirs.status, theirs.body["code"]) == (403, "forbidden")
