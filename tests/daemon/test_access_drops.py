"""A room's access check waits for the drops another recheck has under way
in that room: otherwise the room goes on delivering to a subscriber the
hub already forgot, ahead of its ``left`` (the simulator's cluster seed
9465: two changes of one guest's access, a board membership and the
session's permissions, checked at once on one node)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from agor_actors.daemon import Hub, Outbox, Principal, open_hub
from agor_actors.services import AccessChange
from agor_actors.store import open_store
from agor_actors.world import simulated_world
from protocols import Codec


async def test_a_rooms_access_check_ends_after_the_drops_in_that_room(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = open_store("sqlite://", new_epoch=lambda: "epoch-1")
    async with open_hub(simulated_world(7), store=store, owner_token="owner-token") as hub:
        owner = await hub.authenticate("owner-token")
        assert owner is not None
        made = await hub.call(
            owner, connection_id=None, service="users", method="create", data={"name": "gv"}
        )
        guest = await hub.authenticate(made["token"])
        assert guest is not None
        session = await hub.call(
            owner,
            connection_id=None,
            service="sessions",
            method="create",
            data={"title": "s", "permissions": {"viewers": [guest.user_id]}},
        )
        sid, room = session["id"], f"session:{session['id']}"
        hub.connect(guest, "c-gv")
        await hub.join(guest, "c-gv", Outbox(Codec.JSON), room, None)
        # the guest may no longer see it (another daemon's write, say); the
        # room is slow to take the drop in: held until released
        monkeypatch.setattr(hub.gate, "may_see_room", _never)
        released = trio.Event()
        drop = Hub._drop

        async def slow_drop(self: Hub, sub: Any, reason: str) -> None:
            await released.wait()
            await drop(self, sub, reason)

        monkeypatch.setattr(Hub, "_drop", slow_drop)
        checked = trio.Event()

        async def recheck_guest() -> None:  # a board's member removal, say
            await hub._recheck(users={guest.user_id})

        async def check_room() -> None:  # the room's check of the session's change
            await hub._access_changed(AccessChange(session_id=sid, rooms=frozenset({room})), room)
            checked.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(recheck_guest)  # it finds the subscription first
            await trio.testing.wait_all_tasks_blocked()
            assert hub._drops == {room: 1}
            nursery.start_soon(check_room)  # finds nothing left to drop
            await trio.testing.wait_all_tasks_blocked()
            assert not checked.is_set()  # the room's subscriber is still in it
            released.set()
        assert checked.is_set() and hub._drops == {}
    store.close()


async def _never(principal: Principal, room: str) -> bool:
    return False
