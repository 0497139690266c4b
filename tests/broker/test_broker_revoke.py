"""A revocation across daemons: two hubs in this process on one PostgreSQL
schema and either broker.  The owner takes access away through daemon A;
a guest connected to daemon B is told ``left`` ``forbidden`` there, and
nothing of the room past the revocation reaches it (the simulator's
cluster bug ``access``)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from cluster_support import (
    CODEC,
    OWNER,
    Reader,
    hub_node,
    make_task,
    needs_pg,
    view,
)

from agor_actors.daemon import Hub, Outbox, Principal, ServiceError
from protocols import Event, Joined, Left, Limits, decode_server_frame

pytestmark = needs_pg


async def owner_call(hub: Hub, service: str, method: str, **kw: Any) -> Any:
    return await hub.call(OWNER, connection_id="w", service=service, method=method, **kw)


async def guest_on(a: Hub, b: Hub) -> Principal:
    """A user made through ``a``, signed in on ``b``."""
    made = await owner_call(a, "users", "create", data={"name": "guest"})
    guest = await b.authenticate(made["token"])
    assert guest is not None and not guest.is_owner
    return guest


async def read_until_left(box: Outbox, room: str, *, limit_s: float = 10.0) -> list[object]:
    got: list[object] = []
    with trio.fail_after(limit_s):
        while not any(isinstance(m, Left) and m.room == room for m in got):
            got += decode_server_frame(box.codec, await box.next_frame(), Limits())
    return got


async def test_a_session_unshared_on_one_daemon_drops_its_guest_on_the_other(
    pg_url: str, broker_url: str
) -> None:
    async with hub_node(pg_url, broker_url) as a, hub_node(pg_url, broker_url) as b:
        guest = await guest_on(a, b)
        made = await owner_call(
            a,
            "sessions",
            "create",
            data={"title": "S", "permissions": {"viewers": [guest.user_id]}},
        )
        sid = made["id"]
        room = f"session:{sid}"
        box = Outbox(CODEC)
        await b.join(guest, "g", box, room, None)
        owner_on_a = await view(a, "oa", room)
        owner_on_b = await view(b, "ob", room)
        guest_reader = Reader(box)
        shared = await make_task(a, sid, "shared")
        await guest_reader.until_seq(shared)  # (unread, it would be dropped with the room)
        # the owner unshares the session through daemon A
        await owner_call(a, "sessions", "patch", id=sid, data={"permissions": {}}, base_rev=1)
        after = await make_task(a, sid, "after")
        events = await owner_on_a.until_seq(after)
        unshared = next(e.seq for e in events if e.event == "session:updated")
        got = guest_reader.messages + await read_until_left(box, room)
        assert isinstance(got[0], Joined)
        lefts = [m for m in got if isinstance(m, Left)]
        assert [(m.room, m.reason) for m in lefts] == [(room, "forbidden")]
        assert isinstance(got[-1], Left), "something of the room followed left"
        seen = [m.end_seq for m in got if isinstance(m, Event)]
        assert shared in seen and max(seen) <= unshared, (seen, unshared)
        assert b.rooms_of("g") == []
        # the owner's next write reaches B's room, and nothing of it the guest
        last = await make_task(a, sid, "last")
        await owner_on_b.until_seq(last)
        assert len(box) == 0, "something of the room reached the revoked guest"
        # and the guest cannot come back through B (its gate was told)
        with pytest.raises(ServiceError) as caught:
            await b.join(guest, "g2", Outbox(CODEC), room, None)
        assert caught.value.code == "forbidden"
        with pytest.raises(ServiceError) as caught:
            await b.call(guest, connection_id="g", service="sessions", method="get", id=sid)
        assert caught.value.code == "forbidden"


async def test_a_member_removed_on_one_daemon_leaves_the_board_on_the_other(
    pg_url: str, broker_url: str
) -> None:
    async with hub_node(pg_url, broker_url) as a, hub_node(pg_url, broker_url) as b:
        guest = await guest_on(a, b)
        board = await owner_call(a, "boards", "create", data={"name": "B"})
        bid = board["id"]
        await owner_call(
            a, "boards", "add_member", id=bid, data={"user_id": guest.user_id, "role": "viewer"}
        )
        room = f"board:{bid}"
        box = Outbox(CODEC)
        await b.join(guest, "g", box, room, None)
        owner_on_a = await view(a, "oa", room)
        owner_on_b = await view(b, "ob", room)
        await owner_call(a, "boards", "remove_member", id=bid, data={"user_id": guest.user_id})
        await owner_call(a, "boards", "patch", id=bid, data={"description": "after"})
        got = await read_until_left(box, room)
        lefts = [m for m in got if isinstance(m, Left)]
        assert [(m.room, m.reason) for m in lefts] == [(room, "forbidden")]
        assert isinstance(got[-1], Left), "something of the room followed left"
        assert not any(isinstance(m, Event) and m.event == "board:updated" for m in got)
        assert b.rooms_of("g") == []
        # the owner's next write reaches B's room, and nothing of it the guest
        await owner_call(a, "boards", "patch", id=bid, data={"description": "last"})
        last = await until_event(owner_on_a, "board:updated", "last")
        await owner_on_b.until_seq(last)
        assert len(box) == 0, "something of the room reached the removed member"


async def until_event(reader: Reader, name: str, description: str) -> int:
    """The seq of the board's update to ``description`` once ``reader`` has it."""
    seq = 1
    while True:
        events = await reader.until_seq(seq)
        for e in events:
            if e.event == name and e.data["updates"].get("description") == description:
                return e.seq
        seq = events[-1].end_seq + 1
