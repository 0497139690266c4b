"""A room the server lets go for now (``left`` with ``unavailable``: its
actor could not start, the store away) stays wanted: the client keeps its
mirror and joins it again after a backoff, from where the mirror stands, as
a Phoenix channel rejoins after an error.  Before, the mirror was ended
and the application had to notice and join again (the simulator's clients
gave the room up: cluster seed 5446).  A real daemon on 127.0.0.1 on a real
SQLite file; its store seam refuses calls while told to."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import TypeVar

import attrs
import pytest
import trio
import trio.testing
from client_support import daemon

from agor_actors.client import REJOIN_CODES, CallError, ClientObserver, connect
from agor_actors.store import StoreUnavailable
from agor_actors.world import Blocking, real_world
from protocols import ClientEvent, RoomJoined, RoomLeft

T = TypeVar("T")


class Unreachable:
    """The store seam, refusing every call while ``failing``."""

    def __init__(self, inner: Blocking) -> None:
        self.inner = inner
        self.failing = False
        self.refusal = trio.Event()

    async def run(self, fn: Callable[[], T], *, local: bool = False) -> T:
        if self.failing:
            await trio.lowlevel.checkpoint()
            self.refusal.set()
            raise StoreUnavailable("the store cannot be reached (test)")
        return await self.inner.run(fn, local=local)


class Rooms(ClientObserver):
    """The client's ``left`` and ``joined`` events as its machine reports them."""

    def __init__(self) -> None:
        self.left: list[str] = []
        self.joined: list[RoomJoined] = []
        self.changed = trio.Event()

    def protocol_event(self, event: ClientEvent) -> None:
        if isinstance(event, RoomLeft):
            self.left.append(event.reason)
        elif isinstance(event, RoomJoined):
            self.joined.append(event)
        else:
            return
        self.changed.set()
        self.changed = trio.Event()

    async def wait(self, until: Callable[[], bool]) -> None:
        with trio.fail_after(10):
            while not until():
                await self.changed.wait()


def test_the_codes_that_rejoin_are_the_temporary_ones() -> None:
    assert "unavailable" in REJOIN_CODES
    assert not {"forbidden", "not_found", "invalid_field", "left"} & REJOIN_CODES


async def test_a_room_let_go_for_now_is_joined_again_from_where_it_stood(
    tmp_path: pathlib.Path,
) -> None:
    world = real_world()
    seam = Unreachable(world.blocking)
    rooms = Rooms()
    async with (
        daemon(tmp_path / "agor", world=attrs.evolve(world, blocking=seam)) as d,
        connect(
            d.url, token=d.token, seed=7, backoff_base_s=0.05, backoff_cap_s=0.2, observer=rooms
        ) as client,
    ):
        tasks = client.service("tasks")
        session = await client.service("sessions").create({"title": "s"})
        room = f"session:{session['id']}"
        mirror = await client.join(room)
        first = await tasks.create({"session_id": session["id"], "prompt": "1"})
        with trio.fail_after(10):
            await mirror.wait_until(lambda m: m.seq >= first["_seq"])
        stream = client.events(room)

        # the store goes away and the room's actor stops: the client is told
        # to resume, its resume is refused (the room cannot start), and so
        # is the join it sends again by itself
        seam.failing = True
        await d.hub.system.registry.supervisor.terminate_child(f"room:{room}")
        await rooms.wait(lambda: len(rooms.left) >= 2)
        assert set(rooms.left) == {"unavailable"}
        assert client.mirror(room) is mirror and mirror.left_reason is None

        # the store is back: a join the client sends again is taken, and it
        # resumes from where the mirror stood (nothing reloaded)
        seam.failing = False
        await rooms.wait(lambda: len(rooms.joined) >= 2)
        assert rooms.joined[-1].recovered and rooms.joined[-1].seq == first["_seq"]
        second = await tasks.create({"session_id": session["id"], "prompt": "2"})
        with trio.fail_after(10):
            await mirror.wait_until(lambda m: m.seq >= second["_seq"])
        assert mirror.left_reason is None and client.mirror(room) is mirror
        assert mirror.reloads == 1  # the first join's
        assert {t["prompt"] for t in mirror.items("tasks").values()} == {"1", "2"}
        with trio.fail_after(10):
            event = await stream.__anext__()
        assert event.seq == second["_seq"]  # the stream goes on too

        # a leave ends it for good, also while a join waits to be sent again
        seam.failing = True
        await d.hub.system.registry.supervisor.terminate_child(f"room:{room}")
        left = len(rooms.left)
        await rooms.wait(lambda: len(rooms.left) > left)
        await client.leave(room)
        assert mirror.left_reason == "left" and client.mirror(room) is None
        seam.failing = False
        await trio.testing.wait_all_tasks_blocked(0.3)
        assert room not in client.machine.rooms


async def test_a_refusal_for_good_still_ends_the_join(tmp_path: pathlib.Path) -> None:
    async with daemon(tmp_path / "agor") as d, connect(d.url, token=d.token) as client:
        room = "session:019b76da-0000-7000-8000-000000000000"
        with pytest.raises(CallError) as refused:
            await client.join(room)
        assert refused.value.code == "forbidden"
        assert client.mirror(room) is None and room not in client.machine.rooms
