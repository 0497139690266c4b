"""A room's revocations: of a subscriber, and ahead of a join still on its way."""

from __future__ import annotations

from agor_actors.daemon import Outbox
from agor_actors.domain.room import (
    REVOKED_AHEAD_MAX,
    Revoke,
    RoomBehaviour,
    RoomState,
    Subscribe,
    Subscription,
)
from protocols import Codec, Joined, Left, Limits, decode_server_frame

ROOM = "session:s1"


async def messages(outbox: Outbox) -> list[object]:
    got: list[object] = []
    while len(outbox):
        got.extend(decode_server_frame(outbox.codec, await outbox.next_frame(), Limits()))
    return got


async def test_a_join_revoked_before_it_reached_the_room_gets_left_and_nothing_else() -> None:
    room = RoomBehaviour(ROOM, store=None)  # type: ignore[arg-type]
    state = RoomState(room=ROOM, epoch="e1", head=3)
    sub = Subscription("c1", ROOM, Outbox(Codec.JSON), user_id="u1")
    assert room._revoke(state, Revoke(sub.key, "forbidden", ahead=True)) is False
    assert room._subscribe(state, Subscribe(sub, None)) == "revoked"
    assert sub.key not in state.subscribers
    got = await messages(sub.outbox)
    assert [type(m) for m in got] == [Left] and got[0].reason == "forbidden"  # type: ignore[attr-defined]
    # the key was used up: the connection's next join (access given back) is taken
    assert room._subscribe(state, Subscribe(sub, None)) == "live"
    assert [type(m) for m in await messages(sub.outbox)] == [Joined]


async def test_a_plain_revoke_forgets_a_key_revoked_ahead_and_the_memory_is_bounded() -> None:
    room = RoomBehaviour(ROOM, store=None)  # type: ignore[arg-type]
    state = RoomState(room=ROOM, epoch="e1", head=0)
    sub = Subscription("c1", ROOM, Outbox(Codec.JSON))
    room._revoke(state, Revoke(sub.key, "forbidden", ahead=True))
    room._revoke(state, Revoke(sub.key, "forbidden"))  # the join ended itself meanwhile
    assert room._subscribe(state, Subscribe(sub, None)) == "live"
    for i in range(REVOKED_AHEAD_MAX + 10):
        room._revoke(state, Revoke(f"c{i}/{ROOM}", "forbidden", ahead=True))
    assert len(state.revoked_ahead) == REVOKED_AHEAD_MAX  # the oldest were dropped
    assert "c0/" + ROOM not in state.revoked_ahead
