"""Presence and collaboration on the auto-jumping clock: statuses, the
30-per-second cap, coalescing, culling, hidden cursors, follow mode, action
highlights, and the activity log."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from agor_actors.daemon import Hub, Outbox, OutboxClosed, Principal, open_hub
from agor_actors.domain import ServiceError
from agor_actors.domain.presence import PresenceConfig, color_for, status_of
from agor_actors.store import Mutation, SqlStore, WriteRequest, open_store
from agor_actors.world import simulated_world
from protocols import Codec, Cursor, Limits, Presence, PresenceUpdate, Viewport, decode_server_frame
from supervisors import Intensity

OWNER = Principal("owner", "owner", True)


def user(n: int) -> Principal:
    return Principal(f"u{n}", f"User {n}", False)


def memory_store() -> SqlStore:
    counter = iter(range(1, 1_000_000))
    return open_store("sqlite://", new_epoch=lambda: f"epoch-{next(counter)}")


@asynccontextmanager
async def hub_on(store: SqlStore, seed: int = 1) -> AsyncIterator[Hub]:
    async with open_hub(simulated_world(seed), store=store, owner_token="owner-token") as hub:
        yield hub


class Watcher:
    """A connection on a board that records every presence frame it gets."""

    def __init__(self, hub: Hub, who: Principal, conn: str, board: str) -> None:
        self.hub, self.who, self.conn, self.board = hub, who, conn, board
        self.outbox = Outbox(Codec.JSON)
        self.frames: list[tuple[float, Presence]] = []
        self.reading = True

    async def start(self, nursery: trio.Nursery) -> None:
        await self.hub.join(self.who, self.conn, self.outbox, f"board:{self.board}", None)
        nursery.start_soon(self._read)

    async def _read(self) -> None:
        try:
            while True:
                frame = await self.outbox.next_frame()
                for msg in decode_server_frame(Codec.JSON, frame, Limits()):
                    if isinstance(msg, Presence):
                        self.frames.append((trio.current_time(), msg))
        except OutboxClosed:
            pass

    async def send(self, **fields: Any) -> None:
        await self.hub.presence(self.who, self.conn, PresenceUpdate(board=self.board, **fields))

    def facepile(self) -> dict[str, dict[str, Any]]:
        for _, frame in reversed(self.frames):
            if frame.users is not None:
                return {u["user_id"]: u for u in frame.users}
        return {}

    def cursors(self) -> dict[str, tuple[float, float]]:
        out: dict[str, tuple[float, float]] = {}
        for _, frame in self.frames:
            for c in frame.cursors or []:
                out[c["user_id"]] = (c["x"], c["y"])
        return out


async def real_user(hub: Hub, n: int, board: str) -> Principal:
    """A user that exists in the store (writes reference it), an editor of
    ``board``."""
    made = await hub.call(
        OWNER, connection_id=None, service="users", method="create", data={"name": f"User {n}"}
    )
    principal = await hub.authenticate(made["token"])
    assert principal is not None and principal.user_id == made["id"]
    await hub.call(
        OWNER,
        connection_id=None,
        service="boards",
        method="add_member",
        id=board,
        data={"user_id": made["id"], "role": "editor"},
    )
    return principal


async def make_board(hub: Hub) -> str:
    """A board of the owner's, with ``user(0)``..``user(99)`` as viewers."""
    board = await hub.call(
        OWNER, connection_id=None, service="boards", method="create", data={"name": "B"}
    )
    users = [
        Mutation(
            "upsert",
            "users",
            {"id": f"u{n}"},
            {"name": f"User {n}", "token_hash": f"{n:064x}", "created_at": 0},
        )
        for n in range(100)
    ]
    members = [
        Mutation(
            "upsert",
            "board_members",
            {"board_id": board["id"], "user_id": f"u{n}"},
            {"role": "viewer"},
        )
        for n in range(100)
    ]
    store = hub.store
    (result,) = await hub.world.blocking.run(
        lambda: store.commit([WriteRequest(mutations=(*users, *members))])
    )
    assert not isinstance(result, Exception)
    return str(board["id"])


def test_status_and_color_are_pure() -> None:
    cfg = PresenceConfig()
    assert status_of(0.0, 59.9, connected=True, gone_since_s=None, config=cfg) == "active"
    assert status_of(0.0, 60.0, connected=True, gone_since_s=None, config=cfg) == "idle"
    assert status_of(0.0, 300.0, connected=True, gone_since_s=None, config=cfg) == "away"
    assert status_of(0.0, 5.0, connected=False, gone_since_s=0.0, config=cfg) == "active"
    assert status_of(0.0, 10.0, connected=False, gone_since_s=0.0, config=cfg) == "offline"
    assert color_for("alice") == color_for("alice")
    assert len({color_for(f"user-{i}") for i in range(64)}) > 8


async def test_idle_away_offline_and_second_tab(autojump_clock: MockClock) -> None:
    async with hub_on(memory_store()) as hub, trio.open_nursery() as nursery:
        board = await make_board(hub)
        me = Watcher(hub, user(1), "tab1", board)
        other = Watcher(hub, user(2), "obs", board)
        await me.start(nursery)
        await other.start(nursery)
        await me.send(cursor=Cursor(x=1, y=1), view="session:x")
        await trio.sleep(1)
        assert other.facepile()["u1"]["status"] == "active"
        assert other.facepile()["u1"]["view"] == "session:x"
        await trio.sleep(60)
        assert other.facepile()["u1"]["status"] == "idle"
        await trio.sleep(240)
        assert other.facepile()["u1"]["status"] == "away"
        await me.send(cursor=Cursor(x=2, y=2))
        await trio.sleep(0.1)
        assert other.facepile()["u1"]["status"] == "active"
        # a second tab keeps the user online when the first one goes
        tab2 = Watcher(hub, user(1), "tab2", board)
        await tab2.start(nursery)
        await tab2.send(view="board")
        await hub.disconnect("tab1")
        await trio.sleep(30)
        assert "u1" in other.facepile()
        # every connection gone: still shown during the grace, not after
        await hub.disconnect("tab2")
        await trio.sleep(9)
        assert "u1" in other.facepile()
        await trio.sleep(2)
        assert "u1" not in other.facepile()
        nursery.cancel_scope.cancel()


async def test_typing_expires_after_three_seconds(autojump_clock: MockClock) -> None:
    async with hub_on(memory_store()) as hub, trio.open_nursery() as nursery:
        board = await make_board(hub)
        me, other = Watcher(hub, user(1), "a", board), Watcher(hub, user(2), "b", board)
        await me.start(nursery)
        await other.start(nursery)
        await me.send(typing=True)
        await trio.sleep(1)
        assert other.facepile()["u1"]["typing"] is True
        await trio.sleep(2.5)
        assert other.facepile()["u1"]["typing"] is False
        nursery.cancel_scope.cancel()


async def test_thirty_frames_per_second_cap_with_ten_users_at_sixty(
    autojump_clock: MockClock,
) -> None:
    async with hub_on(memory_store()) as hub, trio.open_nursery() as nursery:
        board = await make_board(hub)
        movers = [Watcher(hub, user(i), f"m{i}", board) for i in range(10)]
        watcher = Watcher(hub, user(99), "w", board)
        for w in [*movers, watcher]:
            await w.start(nursery)
        t0 = trio.current_time()

        async def move(w: Watcher) -> None:
            for step in range(120):  # 2 s at 60 per second
                await w.send(cursor=Cursor(x=float(step), y=1.0))
                await trio.sleep(1 / 60)

        async with trio.open_nursery() as inner:
            for w in movers:
                inner.start_soon(move, w)
        await trio.sleep(0.5)
        times = [t for t, f in watcher.frames if f.cursors and t >= t0]
        for start in times:  # in any one-second window, at most 30 frames
            assert len([t for t in times if start <= t < start + 1.0]) <= 30
        assert len(times) >= 50  # and it did keep up at about 30 per second
        # the final positions arrived (coalescing keeps only the latest)
        assert watcher.cursors() == {f"u{i}": (119.0, 1.0) for i in range(10)}
        nursery.cancel_scope.cancel()


async def test_a_client_that_does_not_read_gets_only_the_latest(autojump_clock: MockClock) -> None:
    async with hub_on(memory_store()) as hub, trio.open_nursery() as nursery:
        board = await make_board(hub)
        mover = Watcher(hub, user(1), "m", board)
        await mover.start(nursery)
        sleeper = Outbox(Codec.JSON)
        await hub.join(user(2), "s", sleeper, f"board:{board}", None)
        for step in range(300):
            await mover.send(cursor=Cursor(x=float(step), y=0.0))
            await trio.sleep(1 / 60)
        await trio.sleep(0.1)
        frames = []
        with trio.move_on_after(0.01):
            while True:
                frames.extend(decode_server_frame(Codec.JSON, await sleeper.next_frame(), Limits()))
        cursor_frames = [f for f in frames if isinstance(f, Presence) and f.cursors]
        assert len(cursor_frames) == 1  # never a backlog
        assert cursor_frames[0].cursors == [{"user_id": "u1", "x": 299.0, "y": 0.0}]
        nursery.cancel_scope.cancel()


async def test_culling_hidden_cursors_and_follow(autojump_clock: MockClock) -> None:
    async with hub_on(memory_store()) as hub, trio.open_nursery() as nursery:
        board = await make_board(hub)
        near, far = Watcher(hub, user(1), "near", board), Watcher(hub, user(2), "far", board)
        culler = Watcher(hub, user(3), "culler", board)
        hider = Watcher(hub, user(4), "hider", board)
        follower = Watcher(hub, user(5), "follower", board)
        for w in (near, far, culler, hider, follower):
            await w.start(nursery)
        await culler.send(viewport=Viewport(x=0, y=0, w=1000, h=1000, zoom=1))
        await hider.send(hide_cursors=True)
        await follower.send(follow="u1")
        await trio.sleep(0.1)
        await near.send(
            cursor=Cursor(x=500, y=500), viewport=Viewport(x=10, y=20, w=800, h=600, zoom=1)
        )
        await far.send(cursor=Cursor(x=5000, y=5000))
        await trio.sleep(0.1)
        assert culler.cursors() == {"u1": (500.0, 500.0)}  # u2 is outside the viewport + margin
        assert hider.cursors() == {}
        assert set(follower.cursors()) == {"u1", "u2"}
        followed = [f.viewport for _, f in follower.frames if f.viewport is not None]
        assert followed[-1] == Viewport(x=10, y=20, w=800, h=600, zoom=1)
        assert not [f for _, f in near.frames if f.viewport is not None]  # only followers get it
        await near.send(viewport=Viewport(x=99, y=20, w=800, h=600, zoom=2))
        await trio.sleep(0.1)
        assert [f.viewport for _, f in follower.frames if f.viewport][-1].x == 99
        nursery.cancel_scope.cancel()


async def test_board_actions_flash_highlights(autojump_clock: MockClock) -> None:
    async with hub_on(memory_store()) as hub, trio.open_nursery() as nursery:
        board = await make_board(hub)
        watcher = Watcher(hub, user(2), "w", board)
        await watcher.start(nursery)
        alice = await real_user(hub, 1, board)
        session = await hub.call(
            alice,
            connection_id="c1",
            service="sessions",
            method="create",
            data={"title": "S", "board_id": board},
        )
        await trio.sleep(0.1)
        highlights = [h for _, f in watcher.frames for h in f.highlights or []]
        assert {
            "user_id": alice.user_id,
            "color": color_for(alice.user_id),
            "target_type": "session",
            "target_id": session["id"],
            "action": "session:created",
        }.items() <= highlights[-1].items()
        nursery.cancel_scope.cancel()


async def test_activity_log_paging_and_filters_across_restart(autojump_clock: MockClock) -> None:
    store = memory_store()
    async with hub_on(store) as hub:
        board = await make_board(hub)
        people = [await real_user(hub, i, board) for i in range(3)]
        for i in range(30):
            who = people[i % 3]
            s = await hub.call(
                who,
                connection_id=None,
                service="sessions",
                method="create",
                data={"title": f"s{i}", "board_id": board},
            )
            await hub.call(
                who,
                connection_id=None,
                service="sessions",
                method="set_status",
                id=s["id"],
                data={"status": "running"},
            )
        first = await hub.call(
            OWNER,
            connection_id=None,
            service="activity",
            method="find",
            query={"board_id": board, "$limit": 10},
        )
        assert len(first["data"]) == 10 and first["next_cursor"]
    async with hub_on(store) as hub:  # a restarted daemon: memory gone, log kept
        seen: list[int] = []
        query: dict[str, Any] = {"board_id": board, "$limit": 25}
        while True:
            page = await hub.call(
                OWNER, connection_id=None, service="activity", method="find", query=query
            )
            seen += [e["id"] for e in page["data"]]
            if not page["next_cursor"]:
                break
            query = {**query, "$cursor": page["next_cursor"]}
        assert seen == sorted(seen, reverse=True) and len(seen) == len(set(seen))
        # board:created, 3 x board:member_added
        # + 30 x (session:created, session:updated, session:status_changed)
        assert len(seen) == 1 + 3 + 30 * 3
        u1 = people[1].user_id
        mine = await hub.call(
            OWNER,
            connection_id=None,
            service="activity",
            method="find",
            query={"board_id": board, "user_id": u1, "action": "session:created", "$limit": 100},
        )
        assert len(mine["data"]) == 10
        assert all(e["user_id"] == u1 and e["action"] == "session:created" for e in mine["data"])


async def test_activity_queries_out_of_range_are_refused_by_name(
    autojump_clock: MockClock,
) -> None:
    """A cursor past 64 bits (was a 500: the driver overflowed), tens of
    thousands of action names (PostgreSQL refuses a statement of more than
    65,535 parameters: "the store is unavailable"), or a NUL in a filter
    are the caller's mistakes, told as such."""
    async with hub_on(memory_store()) as hub:
        board = await make_board(hub)

        async def find(**query: Any) -> Any:
            return await hub.call(
                OWNER,
                connection_id=None,
                service="activity",
                method="find",
                query={"board_id": board, **query},
            )

        for query, words in [
            ({"$cursor": "9" * 20}, "bad $cursor"),
            ({"$cursor": 2**63}, "bad $cursor"),
            ({"$cursor": "-5"}, "bad $cursor"),
            ({"$cursor": "1e3"}, "bad $cursor"),
            ({"$cursor": True}, "bad $cursor"),
            ({"action": ["session:created"] * 101}, "at most 100 actions"),
            ({"action": "a\x00b"}, "NUL"),
            ({"user_id": "u\x00"}, "NUL"),
            ({"user_id": "u" * 129}, "longer than 128"),
        ]:
            with pytest.raises(ServiceError) as refused:
                await find(**query)
            assert refused.value.code == "invalid_field", query
            assert words in refused.value.message, (query, refused.value.message)
        # within bounds, from the store (a cursor) and from the room's memory
        page = await find(**{"$cursor": str(2**63 - 1), "action": ["board:created"] * 100})
        assert [e["action"] for e in page["data"]] == ["board:created"]
        assert (await find(action="board:created"))["data"] == page["data"]


async def test_activity_stream_is_a_live_resumable_projection(autojump_clock: MockClock) -> None:
    from protocols import Event, Joined, Since

    async with hub_on(memory_store()) as hub:
        board = await make_board(hub)
        alice = await real_user(hub, 1, board)
        out = Outbox(Codec.JSON)
        await hub.join(alice, "c", out, f"activity:{board}", None)
        # the same connection can watch the board itself too: separate subscriptions
        board_out = Outbox(Codec.JSON)
        await hub.join(alice, "c", board_out, f"board:{board}", None)
        s = await hub.call(
            alice,
            connection_id="c",
            service="sessions",
            method="create",
            data={"title": "S", "board_id": board},
        )
        msgs: list[Any] = []
        with trio.fail_after(5):
            while not any(isinstance(m, Event) for m in msgs):
                msgs += decode_server_frame(Codec.JSON, await out.next_frame(), Limits())
        joined = next(m for m in msgs if isinstance(m, Joined))
        event = next(m for m in msgs if isinstance(m, Event))
        assert joined.room == f"activity:{board}"
        assert event.room == f"activity:{board}" and event.event == "activity:new"
        assert event.data["action"] == "session:created" and event.data["user_id"] == alice.user_id
        assert event.data["data"]["session_id"] == s["id"]
        # the entry carries the board log's seq, so the stream resumes like any room
        await hub.leave("c", f"activity:{board}")
        await hub.call(
            alice,
            connection_id="c",
            service="sessions",
            method="set_status",
            id=s["id"],
            data={"status": "running"},
        )
        again = Outbox(Codec.JSON)
        await hub.join(alice, "c", again, f"activity:{board}", Since(joined.epoch, event.seq))
        got: list[Any] = []
        with trio.fail_after(5):
            while len([m for m in got if isinstance(m, Event)]) < 2:
                got += decode_server_frame(Codec.JSON, await again.next_frame(), Limits())
        replay = [m for m in got if isinstance(m, Event)]
        assert [e.seq for e in replay] == [event.seq + 1, event.seq + 2]
        assert {e.data["action"] for e in replay} == {"session:updated", "session:status_changed"}


async def test_newcomer_gets_the_facepile_and_arrival_counts_as_active(
    autojump_clock: MockClock,
) -> None:
    async with hub_on(memory_store()) as hub, trio.open_nursery() as nursery:
        await trio.sleep(1000)  # a daemon that has run a while: a fresh user is not "away"
        board = await make_board(hub)
        first = Watcher(hub, user(1), "w1", board)
        await first.start(nursery)
        await first.send(hide_cursors=False)  # arrives; no cursor, no view, no typing
        await trio.sleep(0.1)
        # a second window of a user already present: nothing changes, yet it
        # gets the whole facepile at once
        second = Watcher(hub, user(2), "w2", board)
        await second.start(nursery)
        with trio.fail_after(1):
            while "u1" not in second.facepile():
                await trio.sleep(0.01)
        assert second.facepile()["u1"]["status"] == "active"
        # leaving the board's room takes the connection off the facepile (after the grace)
        await hub.leave("w1", f"board:{board}")
        await trio.sleep(5)
        assert "u1" in second.facepile()
        await trio.sleep(6)
        assert "u1" not in second.facepile()
        nursery.cancel_scope.cancel()


async def two_on_a_board(hub: Hub, nursery: trio.Nursery, board: str, **first: Any) -> Watcher:
    """u1 (connection w1, saying ``first``) and u2 (w2, on view "board") on
    ``board``'s facepile; u2's watcher."""
    one = Watcher(hub, user(1), "w1", board)
    two = Watcher(hub, user(2), "w2", board)
    await one.start(nursery)
    await two.start(nursery)
    await one.send(**first)
    await two.send(view="board")
    await trio.sleep(1)
    assert set(two.facepile()) == {"u1", "u2"}
    return two


async def crash_board_room(hub: Hub, board: str) -> None:
    room = hub.system.registry.lookup(f"room:board:{board}")
    assert room is not None
    assert room.try_send(object())  # a message no behaviour knows: the room crashes
    with trio.fail_after(5):
        await room.wait_stopped()


async def test_a_board_room_that_restarts_gets_its_facepile_back_at_once(
    autojump_clock: MockClock,
) -> None:
    """The facepile lives in the board room's memory: after the room crashes
    and restarts, every present user's entry is sent to it again (before,
    it stayed empty until someone's next status change, a minute later)."""
    async with hub_on(memory_store()) as hub, trio.open_nursery() as nursery:
        board = await make_board(hub)
        await two_on_a_board(hub, nursery, board, view="board")
        await crash_board_room(hub, board)
        # the connections were told lagged; a client joins again
        again = Watcher(hub, user(2), "w2b", board)
        await again.start(nursery)
        await trio.sleep(1)
        assert set(again.facepile()) == {"u1", "u2"}
        nursery.cancel_scope.cancel()


async def test_a_board_room_that_restarts_in_a_users_grace_gets_their_entry_too(
    autojump_clock: MockClock,
) -> None:
    """A user's only connection drops (they stay on the facepile for the
    offline grace) and the board's room crashes meanwhile.  The new room is
    given the entry of every user with one, not only of those connected:
    before, the user vanished at once, and when they came back saying what
    they had said before, their presence actor (which still believed the
    room held their entry) sent nothing, so the facepile lacked them until
    their next status change, a minute later (the simulator's medium seed
    2648)."""
    async with hub_on(memory_store()) as hub, trio.open_nursery() as nursery:
        board = await make_board(hub)
        # u1 says no view: its entry is the same connected or not
        two = await two_on_a_board(hub, nursery, board, hide_cursors=False)
        await hub.disconnect("w1")  # in the grace: still on the facepile
        await trio.sleep(1)
        assert set(two.facepile()) == {"u1", "u2"}
        await crash_board_room(hub, board)
        again = Watcher(hub, user(2), "w2b", board)
        await again.start(nursery)
        await trio.sleep(1)
        assert set(again.facepile()) == {"u1", "u2"}  # u1 still in the grace
        back = Watcher(hub, user(1), "w1b", board)
        await back.start(nursery)
        await back.send(hide_cursors=False)  # the same as before
        await trio.sleep(1)
        assert set(again.facepile()) == {"u1", "u2"}
        await trio.sleep(20)  # past the first grace: u1 is connected again
        assert set(again.facepile()) == {"u1", "u2"}
        assert again.facepile()["u1"]["status"] == "active"
        nursery.cancel_scope.cancel()


async def test_a_board_room_keeps_its_facepile_while_a_user_is_present_unsubscribed(
    autojump_clock: MockClock,
) -> None:
    """A user has two tabs on a board, one subscribed to its room and one
    not (it only sends presence).  The subscribed tab drops: nobody is
    subscribed any more, but the room holds the user's entry, which the
    user's presence actor sends only when it changes, so the room does not
    passivate (started again, it would show the board without the user
    until their next status change: the simulator's seeds 9 and 83, where
    the hub's republish at the next join came before the user's new tab had
    said anything).  The tab comes back and says the same as before: the
    user is on the facepile.  Once every tab is gone and the grace is over,
    the room passivates."""
    async with (
        open_hub(
            simulated_world(1), store=memory_store(), owner_token="owner-token", idle_s=1.0
        ) as hub,
        trio.open_nursery() as nursery,
    ):
        board = await make_board(hub)
        first = Watcher(hub, user(1), "w1", board)
        await first.start(nursery)
        await first.send(view="board")
        second_tab = Watcher(hub, user(1), "w2", board)  # never joins the room
        await second_tab.send(view="board")
        await trio.sleep(1)
        assert set(first.facepile()) == {"u1"}
        room = hub.system.registry.lookup(f"room:board:{board}")
        assert room is not None
        await hub.disconnect("w1")
        with trio.move_on_after(10):
            await room.wait_stopped()
        assert hub.system.registry.lookup(f"room:board:{board}") is room  # still there
        back = Watcher(hub, user(1), "w1", board)
        await back.start(nursery)
        await back.send(view="board")  # the same presence as before
        await trio.sleep(1)
        assert set(back.facepile()) == {"u1"}
        await hub.disconnect("w1")
        await hub.disconnect("w2")
        with trio.fail_after(60):
            await room.wait_stopped()  # the user offline after the grace: it passivated
        nursery.cancel_scope.cancel()


async def test_a_connection_that_closes_while_every_actor_starts_over_leaves_the_facepile(
    autojump_clock: MockClock,
) -> None:
    """Every actor starting over (the registry gave up) has the hub tell each
    user's new presence actor what their connections last said; a connection
    that closed while the registry was away is not among them (simulator,
    seed 955: its entry came back after its PresenceGone and stayed on the
    board for good)."""
    store = memory_store()
    world = simulated_world(1)
    async with (
        open_hub(
            world,
            store=store,
            owner_token="owner-token",
            restart_intensity=Intensity(max_restarts=0, period_s=60.0),
        ) as hub,
        trio.open_nursery() as nursery,
    ):
        board = await make_board(hub)
        one = Watcher(hub, user(1), "w1", board)
        two = Watcher(hub, user(2), "w2", board)
        await one.start(nursery)
        await two.start(nursery)
        await one.send(view="board")
        await two.send(view="board")
        await trio.sleep(1)
        assert set(two.facepile()) == {"u1", "u2"}
        for crash in range(2):  # the second give-up restarts the registry after a backoff
            actor = hub.system.registry.lookup("presence:user:u2")
            assert actor is not None
            assert actor.try_send(object())  # it crashes: the registry gives up
            await trio.sleep(0)
            if crash == 0:
                await trio.sleep(1)
        # while the registry is away, user 1's connection closes
        await hub.disconnect("w1")
        await trio.sleep(PresenceConfig().offline_grace_s + 5)  # past the grace
        three = Watcher(hub, user(3), "w3", board)
        await three.start(nursery)
        await three.send(view="board")
        await trio.sleep(1)
        assert set(three.facepile()) == {"u2", "u3"}
        nursery.cancel_scope.cancel()
