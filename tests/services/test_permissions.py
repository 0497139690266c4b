"""Permissions through the hub (a real SQLite store, the simulated world):
each bypass of issue 11 refused, ``find`` filtered, ownership and lock
rules, revocation, per-user caps and revisions that move."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
from trio.testing import MockClock

from agor_actors.daemon import Hub, Outbox, Principal, ServiceError, open_hub
from agor_actors.services import UserLimits
from agor_actors.store import Mutation, WriteRequest, WriteResult, open_store
from agor_actors.world import simulated_world
from protocols import Codec, Event, Joined, Left, Limits, Since, decode_server_frame


@asynccontextmanager
async def hub_on(
    limits: UserLimits | None = None, authorizer: Any = None
) -> AsyncIterator[tuple[Hub, Principal]]:
    counter = iter(range(1, 1_000_000))
    store = open_store("sqlite://", new_epoch=lambda: f"epoch-{next(counter)}")
    async with open_hub(
        simulated_world(7),
        store=store,
        owner_token="owner-token",
        limits=limits,
        authorizer=authorizer,
    ) as hub:
        owner = await hub.authenticate("owner-token")
        assert owner is not None and owner.is_owner
        yield hub, owner
    store.close()


async def call(hub: Hub, who: Principal, service: str, method: str, **kw: Any) -> Any:
    return await hub.call(who, connection_id=None, service=service, method=method, **kw)


async def refused(hub: Hub, who: Principal, service: str, method: str, **kw: Any) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        await call(hub, who, service, method, **kw)
    return caught.value


async def new_user(hub: Hub, owner: Principal, name: str) -> Principal:
    made = await call(hub, owner, "users", "create", data={"name": name})
    user = await hub.authenticate(made["token"])
    assert user is not None and not user.is_owner
    return user


async def strict(hub: Hub, who: Principal, sid: str, data: dict[str, Any]) -> Any:
    """A patch of a session's strict fields, at its current revision."""
    rev = (await call(hub, who, "sessions", "get", id=sid))["rev"]
    return await call(hub, who, "sessions", "patch", id=sid, data=data, base_rev=rev)


async def member(hub: Hub, owner: Principal, board: str, user: Principal, role: str) -> None:
    await call(
        hub, owner, "boards", "add_member", id=board, data={"user_id": user.user_id, "role": role}
    )


async def drain(outbox: Outbox, until: type[Any], room: str | None = None) -> list[Any]:
    """Frames from ``outbox`` until a message of type ``until`` (for ``room``)."""
    got: list[Any] = []
    with trio.fail_after(5):
        while True:
            got += decode_server_frame(Codec.JSON, await outbox.next_frame(), Limits())
            if any(isinstance(m, until) and (room is None or m.room == room) for m in got):
                return got


async def test_a_viewer_reads_and_never_writes(autojump_clock: MockClock) -> None:
    async with hub_on() as (hub, owner):
        viewer = await new_user(hub, owner, "viewer")
        mate = await new_user(hub, owner, "mate")
        perms = {"viewers": [viewer.user_id], "collaborators": [mate.user_id]}
        session = await call(hub, owner, "sessions", "create", data={"permissions": perms})
        sid = session["id"]
        assert (await call(hub, viewer, "sessions", "get", id=sid))["id"] == sid
        for service, method, kw in (
            ("tasks", "create", {"data": {"session_id": sid, "prompt": "p"}}),
            ("messages", "create", {"data": {"session_id": sid, "content": "c"}}),
            ("sessions", "patch", {"id": sid, "data": {"title": "mine"}}),
            ("sessions", "set_status", {"id": sid, "data": {"status": "running"}}),
        ):
            error = await refused(hub, viewer, service, method, **kw)
            assert error.code == "forbidden", (service, method, error)
        # the collaborator writes; its task stays out of the viewer's reach
        task = await call(hub, mate, "tasks", "create", data={"session_id": sid, "prompt": "p"})
        assert (await refused(hub, viewer, "tasks", "start", id=task["id"])).code == "forbidden"
        assert (await refused(hub, viewer, "tasks", "remove", id=task["id"])).code == "forbidden"
        # a board's viewer members read its sessions and never write them
        board = await call(hub, owner, "boards", "create", data={"name": "b"})
        await member(hub, owner, board["id"], viewer, "viewer")
        on_board = await call(hub, owner, "sessions", "create", data={"board_id": board["id"]})
        error = await refused(
            hub, viewer, "tasks", "create", data={"session_id": on_board["id"], "prompt": "p"}
        )
        assert error.code == "forbidden"
        assert (
            await refused(hub, viewer, "boards", "patch", id=board["id"], data={"name": "x"})
        ).code == "forbidden"
        assert (await call(hub, viewer, "boards", "get", id=board["id"]))["id"] == board["id"]
        # an editor writes
        await member(hub, owner, board["id"], mate, "editor")
        await call(hub, mate, "tasks", "create", data={"session_id": on_board["id"], "prompt": "p"})
        await call(hub, mate, "boards", "patch", id=board["id"], data={"name": "renamed"})


async def test_strangers_see_nothing(autojump_clock: MockClock) -> None:
    async with hub_on() as (hub, owner):
        stranger = await new_user(hub, owner, "stranger")
        session = await call(hub, owner, "sessions", "create", data={"title": "private"})
        task = await call(hub, owner, "tasks", "create", data={"session_id": session["id"]})
        board = await call(hub, owner, "boards", "create", data={"name": "b"})
        for service, id in (
            ("sessions", session["id"]),
            ("tasks", task["id"]),
            ("boards", board["id"]),
        ):
            assert (await refused(hub, stranger, service, "get", id=id)).code == "forbidden"
        for service, method, kw in (
            ("sessions", "patch", {"id": session["id"], "data": {"title": "x"}}),
            ("sessions", "remove", {"id": session["id"]}),
            ("tasks", "patch", {"id": task["id"], "data": {"prompt": "x"}}),
            ("messages", "create", {"data": {"session_id": session["id"], "content": "x"}}),
            ("boards", "patch", {"id": board["id"], "data": {"name": "x"}}),
            ("boards", "remove", {"id": board["id"]}),
            ("activity", "find", {"query": {"board_id": board["id"]}}),
            ("users", "create", {"data": {"name": "x"}}),
            ("users", "find", {}),
            ("users", "get", {"id": owner.user_id}),
        ):
            error = await refused(hub, stranger, service, method, **kw)
            assert error.code == "forbidden", (service, method, error)
        assert (await call(hub, stranger, "users", "get", id=stranger.user_id))[
            "name"
        ] == "stranger"
        # a session of its own on a board it does not write to: refused
        error = await refused(hub, stranger, "sessions", "create", data={"board_id": board["id"]})
        assert error.code == "forbidden"
        # nothing of it was written
        assert (await call(hub, owner, "sessions", "get", id=session["id"]))["title"] == "private"


async def test_find_returns_only_what_the_caller_may_see(autojump_clock: MockClock) -> None:
    async with hub_on() as (hub, owner):
        user = await new_user(hub, owner, "u")
        board = await call(hub, owner, "boards", "create", data={"name": "shared"})
        await call(hub, owner, "boards", "create", data={"name": "hidden"})
        await member(hub, owner, board["id"], user, "viewer")
        made = {
            "private": {},
            "public": {"permissions": {"public": True}},
            "named": {"permissions": {"viewers": [user.user_id]}},
            "on_board": {"board_id": board["id"]},
        }
        ids = {}
        for title, extra in made.items():
            ids[title] = (
                await call(hub, owner, "sessions", "create", data={"title": title, **extra})
            )["id"]
            await call(
                hub, owner, "tasks", "create", data={"session_id": ids[title], "prompt": title}
            )
        mine = await call(hub, user, "sessions", "create", data={"title": "own"})
        seen = await call(hub, user, "sessions", "find", query={"$limit": 100})
        assert {s["title"] for s in seen["data"]} == {"public", "named", "on_board", "own"}
        # with $select, the access columns are read and not shown
        slim = await call(hub, user, "sessions", "find", query={"$select": ["title"]})
        assert {s["title"] for s in slim["data"]} == {"public", "named", "on_board", "own"}
        assert all(set(s) == {"id", "title"} for s in slim["data"])
        tasks = await call(hub, user, "tasks", "find", query={"$limit": 100})
        assert {t["prompt"] for t in tasks["data"]} == {"public", "named", "on_board"}
        boards = await call(hub, user, "boards", "find", query={})
        assert [b["name"] for b in boards["data"]] == ["shared"]
        everything = await call(hub, owner, "sessions", "find", query={"$limit": 100})
        assert len(everything["data"]) == 5 and mine["owner_id"] == user.user_id


async def test_only_the_owner_or_a_board_admin_changes_ownership(autojump_clock: MockClock) -> None:
    async with hub_on() as (hub, owner):
        alice = await new_user(hub, owner, "alice")
        bob = await new_user(hub, owner, "bob")
        carol = await new_user(hub, owner, "carol")
        board = await call(hub, owner, "boards", "create", data={"name": "b"})
        await member(hub, owner, board["id"], alice, "editor")
        await member(hub, owner, board["id"], carol, "admin")
        session = await call(
            hub,
            alice,
            "sessions",
            "create",
            data={"board_id": board["id"], "permissions": {"collaborators": [bob.user_id]}},
        )
        sid, rev = session["id"], session["rev"]
        assert session["owner_id"] == alice.user_id
        for data in (
            {"owner_id": bob.user_id},
            {"permissions": {"collaborators": [bob.user_id], "public": True}},
            {"board_id": None},
        ):
            error = await refused(hub, bob, "sessions", "patch", id=sid, data=data, base_rev=rev)
            assert error.code == "forbidden", (data, error)
        assert (await refused(hub, bob, "sessions", "remove", id=sid)).code == "forbidden"
        # the collaborator writes what is not about access
        await call(hub, bob, "sessions", "patch", id=sid, data={"title": "by bob"})
        # a board editor is no board admin
        for method, data in (
            ("patch", {"owner_id": alice.user_id}),
            ("add_member", {"user_id": bob.user_id, "role": "admin"}),
            ("remove_member", {"user_id": carol.user_id}),
            ("remove", None),
        ):
            error = await refused(hub, alice, "boards", method, id=board["id"], data=data)
            assert error.code == "forbidden", (method, error)
        # the board's admin hands the session to bob; its owner could too
        current = await call(hub, carol, "sessions", "get", id=sid)
        moved = await call(
            hub,
            carol,
            "sessions",
            "patch",
            id=sid,
            data={"owner_id": bob.user_id},
            base_rev=current["rev"],
        )
        assert moved["owner_id"] == bob.user_id
        assert (await refused(hub, alice, "sessions", "remove", id=sid)).code == "forbidden"
        await call(hub, bob, "sessions", "remove", id=sid)


async def test_owner_mode_and_the_lock(autojump_clock: MockClock) -> None:
    async with hub_on() as (hub, owner):
        alice = await new_user(hub, owner, "alice")
        bob = await new_user(hub, owner, "bob")
        carol = await new_user(hub, owner, "carol")
        team = {"collaborators": [bob.user_id, carol.user_id]}
        session = await call(hub, alice, "sessions", "create", data={"permissions": team})
        sid = session["id"]
        # bob takes the lock: carol spectates, bob writes
        await strict(hub, bob, sid, {"locked_by": bob.user_id})
        error = await refused(hub, carol, "tasks", "create", data={"session_id": sid})
        assert error.code == "forbidden" and "locked" in error.message
        rev = (await call(hub, carol, "sessions", "get", id=sid))["rev"]
        error = await refused(
            hub, carol, "sessions", "patch", id=sid, data={"locked_by": carol.user_id}, base_rev=rev
        )
        assert error.code == "forbidden"
        await call(hub, bob, "tasks", "create", data={"session_id": sid})
        # the owner releases it (an admin may), then turns owner mode on
        await strict(hub, alice, sid, {"locked_by": None})
        await call(hub, carol, "tasks", "create", data={"session_id": sid})
        current = await call(hub, alice, "sessions", "get", id=sid)
        await call(
            hub,
            alice,
            "sessions",
            "patch",
            id=sid,
            data={"permissions": {**team, "mode": "owner"}},
            base_rev=current["rev"],
        )
        error = await refused(hub, bob, "tasks", "create", data={"session_id": sid})
        assert error.code == "forbidden" and "owner mode" in error.message
        await call(hub, alice, "tasks", "create", data={"session_id": sid})
        # still readable by the collaborators
        assert (await call(hub, bob, "sessions", "get", id=sid))["id"] == sid
        bad = await refused(
            hub,
            alice,
            "sessions",
            "patch",
            id=sid,
            data={"permissions": {"mode": "nobody"}},
            base_rev=current["rev"] + 1,
        )
        assert bad.code == "invalid_field"


async def test_joins_need_sight_of_the_room(autojump_clock: MockClock) -> None:
    async with hub_on() as (hub, owner):
        stranger = await new_user(hub, owner, "stranger")
        board = await call(hub, owner, "boards", "create", data={"name": "b"})
        session = await call(hub, owner, "sessions", "create", data={"title": "s"})
        answers = set()
        for room in (
            f"board:{board['id']}",
            f"activity:{board['id']}",
            f"session:{session['id']}",
            "session:made-up",
            "board:made-up",
        ):
            with pytest.raises(ServiceError) as caught:
                await hub.join(stranger, "c1", Outbox(Codec.JSON), room, None)
            answers.add((caught.value.code, caught.value.message.replace(room, "<room>")))
        assert answers == {("forbidden", "no room '<room>' that this user may see")}
        names = hub.system.registry.names()
        assert not any("made-up" in name for name in names)


async def test_a_revoked_member_is_sent_left_and_nothing_after(autojump_clock: MockClock) -> None:
    async with hub_on() as (hub, owner):
        user = await new_user(hub, owner, "u")
        board = await call(hub, owner, "boards", "create", data={"name": "b"})
        bid = board["id"]
        await member(hub, owner, bid, user, "viewer")
        session = await call(hub, owner, "sessions", "create", data={"board_id": bid})
        rooms = [f"board:{bid}", f"activity:{bid}", f"session:{session['id']}"]
        # two connections of the user, each in every room; the owner watches too
        boxes = {c: {r: Outbox(Codec.JSON) for r in rooms} for c in ("c1", "c2")}
        for c, by_room in boxes.items():
            for room, box in by_room.items():
                await hub.join(user, c, box, room, None)
                await drain(box, Joined)
        watch = Outbox(Codec.JSON)
        await hub.join(owner, "w", watch, f"board:{bid}", None)
        await drain(watch, Joined)
        await call(hub, owner, "boards", "remove_member", id=bid, data={"user_id": user.user_id})
        # every affected connection was told at once, with the reason
        for by_room in boxes.values():
            for room, box in by_room.items():
                got = await drain(box, Left, room)
                left = [m for m in got if isinstance(m, Left)]
                assert [(m.room, m.reason) for m in left] == [(room, "forbidden")]
        assert hub.rooms_of("c1") == [] and hub.rooms_of("c2") == []
        # then the owner writes: the owner sees it, the user nothing more
        await call(hub, owner, "tasks", "create", data={"session_id": session["id"]})
        await call(hub, owner, "sessions", "patch", id=session["id"], data={"title": "after"})
        got = await drain(watch, Event)
        assert any(isinstance(m, Event) and m.event == "task:created" for m in got)
        await trio.sleep(1)
        for by_room in boxes.values():
            for box in by_room.values():
                assert len(box) == 0, "something of the room reached a revoked member"
        # and the user cannot come back: a resume is checked again
        again = Outbox(Codec.JSON)
        with pytest.raises(ServiceError) as caught:
            await hub.join(user, "c3", again, f"board:{bid}", Since("epoch-1", 1))
        assert caught.value.code == "forbidden" and len(again) == 0


async def test_a_session_made_private_drops_its_viewers(autojump_clock: MockClock) -> None:
    async with hub_on() as (hub, owner):
        user = await new_user(hub, owner, "u")
        session = await call(
            hub, owner, "sessions", "create", data={"permissions": {"public": True}}
        )
        sid = session["id"]
        box = Outbox(Codec.JSON)
        await hub.join(user, "c1", box, f"session:{sid}", None)
        await drain(box, Joined)
        await call(
            hub,
            owner,
            "sessions",
            "patch",
            id=sid,
            data={"permissions": {"public": False}},
            base_rev=session["rev"],
        )
        got = await drain(box, Left)
        assert [(m.room, m.reason) for m in got if isinstance(m, Left)] == [
            (f"session:{sid}", "forbidden")
        ]
        await call(hub, owner, "tasks", "create", data={"session_id": sid})
        await trio.sleep(1)
        assert len(box) == 0
        assert (await refused(hub, user, "sessions", "get", id=sid)).code == "forbidden"


async def test_revisions_move_on_board_and_session_writes(autojump_clock: MockClock) -> None:
    async with hub_on() as (hub, owner):
        session = await call(hub, owner, "sessions", "create", data={"title": "t"})
        sid = session["id"]
        task = await call(hub, owner, "tasks", "create", data={"session_id": sid, "prompt": "p"})
        patched = await call(hub, owner, "tasks", "patch", id=task["id"], data={"prompt": "q"})
        # a patch answers the whole record, not {task_id, updates}
        assert patched["prompt"] == "q" and patched["id"] == task["id"] and "rev" in patched
        error = await refused(
            hub, owner, "tasks", "patch", id=task["id"], data={"prompt": "r"}, base_rev=99
        )
        assert error.code == "conflict" and error.data["current"]["prompt"] == "q"
        board = await call(hub, owner, "boards", "create", data={"name": "b"})
        box = Outbox(Codec.JSON)
        await hub.join(owner, "c", box, f"board:{board['id']}", None)
        await drain(box, Joined)
        renamed = await call(hub, owner, "boards", "patch", id=board["id"], data={"name": "c"})
        assert renamed["rev"] == 2
        events = [m for m in await drain(box, Event) if isinstance(m, Event)]
        assert events[0].event == "board:updated" and events[0].data["rev"] == 2
        stale = await refused(
            hub, owner, "boards", "patch", id=board["id"], data={"name": "d"}, base_rev=1
        )
        assert stale.code == "conflict" and stale.data["rev"] == 2
        s2 = await call(hub, owner, "sessions", "patch", id=sid, data={"title": "u"})
        assert s2["rev"] == session["rev"] + 1


async def test_a_patch_over_the_websocket_path_answers_the_record(
    autojump_clock: MockClock,
) -> None:
    from protocols import Call

    async with hub_on() as (hub, owner):
        session = await call(hub, owner, "sessions", "create", data={"title": "t"})
        task = await call(hub, owner, "tasks", "create", data={"session_id": session["id"]})
        answers: list[Any] = []
        done = trio.Event()

        def reply(result: Any) -> None:
            answers.append(result.unwrap())
            done.set()

        run = await hub.submit(
            owner, "c", Call(1, "tasks", "patch", id=task["id"], data={"prompt": "z"}), reply
        )
        assert run is None
        with trio.fail_after(5):
            await done.wait()
        assert answers[0]["id"] == task["id"] and answers[0]["prompt"] == "z"
        assert "rev" in answers[0] and "updates" not in answers[0]


class _Held:
    """Holds every call of a user in the authorization seam until released."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.entered = trio.Event()

    async def authorize(self, principal: Principal, action: str, resource: str) -> None:
        if not principal.is_owner and resource.startswith("sessions"):
            self.entered.set()
            await self.release.wait()


async def test_per_user_caps(autojump_clock: MockClock) -> None:
    held = _Held()
    limits = UserLimits(connections=2, rooms=2, pending_calls=1)
    async with hub_on(limits, held) as (hub, owner):
        user = await new_user(hub, owner, "u")
        hub.connect(user, "c1")
        hub.connect(user, "c2")
        with pytest.raises(ServiceError) as caught:
            hub.connect(user, "c3")
        assert caught.value.code == "too_many_connections"
        hub.connect(owner, "o1")  # the local owner has no caps
        # rooms: two at once over all the user's connections
        sessions = [
            (await call(hub, owner, "sessions", "create", data={"permissions": {"public": True}}))[
                "id"
            ]
            for _ in range(3)
        ]
        await hub.join(user, "c1", Outbox(Codec.JSON), f"session:{sessions[0]}", None)
        await hub.join(user, "c2", Outbox(Codec.JSON), f"session:{sessions[1]}", None)
        with pytest.raises(ServiceError) as caught:
            await hub.join(user, "c2", Outbox(Codec.JSON), f"session:{sessions[2]}", None)
        assert caught.value.code == "too_many_subscriptions"
        await hub.leave("c1", f"session:{sessions[0]}")
        await hub.join(user, "c2", Outbox(Codec.JSON), f"session:{sessions[2]}", None)
        # pending calls: one in flight, the next refused until it is answered
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: call(hub, user, "sessions", "get", id=sessions[0]))
            await held.entered.wait()
            assert (
                await refused(hub, user, "sessions", "get", id=sessions[1])
            ).code == "too_many_pending"
            held.release.set()
        assert (await call(hub, user, "sessions", "get", id=sessions[1]))["id"] == sessions[1]
        await hub.disconnect("c1")
        hub.connect(user, "c3")


async def test_the_gate_reads_access_fresh_when_asked_and_keeps_what_it_assumes(
    autojump_clock: MockClock,
) -> None:
    # what a cluster node's join and sweep rely on: another daemon's write
    # (here straight to the store, as a second daemon on the database does)
    async with hub_on() as (hub, owner):
        user = await new_user(hub, owner, "u")
        session = await call(
            hub, owner, "sessions", "create", data={"permissions": {"viewers": [user.user_id]}}
        )
        sid, room = session["id"], f"session:{session['id']}"
        gate = hub.gate
        assert await gate.may_see_room(user, room)
        unshare = Mutation("update", "sessions", {"id": sid}, {"permissions": {}})
        assert isinstance(hub.store.commit([WriteRequest(mutations=(unshare,))])[0], WriteResult)
        assert await gate.may_see_room(user, room), "the cache answers (not told)"
        assert not await gate.may_see_room(user, room, fresh=True)
        # an assumption of a write in flight stays whatever is read or forgotten
        shared = await gate.session(sid)
        assert shared is not None
        gate.assume_session(attrs.evolve(shared, viewers=frozenset({user.user_id})))
        gate.forget_loaded()
        assert await gate.may_see_room(user, room, fresh=True)
        gate.forget_session(sid)  # the write was answered
        assert not await gate.may_see_room(user, room)
        # forget_loaded drops what was read
        reshare = Mutation(
            "update", "sessions", {"id": sid}, {"permissions": {"viewers": [user.user_id]}}
        )
        assert isinstance(hub.store.commit([WriteRequest(mutations=(reshare,))])[0], WriteResult)
        assert not await gate.may_see_room(user, room)
        gate.forget_loaded()
        assert await gate.may_see_room(user, room)


async def test_permissions_naming_no_user_are_refused_by_name(autojump_clock: MockClock) -> None:
    """A mistyped id in a session's viewers or collaborators granted nothing
    and said nothing: the teammate it was meant for just saw no session."""
    async with hub_on() as (hub, owner):
        ann = await new_user(hub, owner, "ann")
        gone = await new_user(hub, owner, "gone")
        await call(hub, owner, "users", "remove", id=gone.user_id)
        sid = (await call(hub, owner, "sessions", "create", data={"title": "s"}))["id"]
        many = [ann.user_id] * 3 + [f"nobody-{i}" for i in range(600)]  # past a page
        for permissions, message in [
            ({"viewers": [ann.user_id, "anne"]}, "data.permissions.viewers: no user anne"),
            ({"collaborators": ["x"]}, "data.permissions.collaborators: no user x"),
            (
                {"viewers": [gone.user_id]},
                f"data.permissions.viewers: user {gone.user_id} was removed",
            ),
            ({"viewers": many}, "data.permissions.viewers: no user nobody-0"),
        ]:
            rev = (await call(hub, owner, "sessions", "get", id=sid))["rev"]
            error = await refused(
                hub,
                owner,
                "sessions",
                "patch",
                id=sid,
                data={"permissions": permissions},
                base_rev=rev,
            )
            assert (error.code, error.message) == ("invalid_field", message), permissions
            error = await refused(
                hub, owner, "sessions", "create", data={"title": "t", "permissions": permissions}
            )
            assert (error.code, error.message) == ("invalid_field", message), permissions
        await strict(hub, owner, sid, {"permissions": {"viewers": [ann.user_id]}})
        assert (await call(hub, ann, "sessions", "get", id=sid))["id"] == sid
