"""A cluster node's room and events that change access (committed by any
daemon): it delivers up to such an event, runs the hub's check, and holds
what follows (bounded) until the check ended; a failed check runs again."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import outcome

from agor_actors.daemon import Outbox
from agor_actors.domain.room import (
    ACCESS_RETRY_S,
    Revoke,
    RoomBehaviour,
    RoomState,
    Subscribe,
    Subscription,
    _AccessChecked,
    _Filled,
)
from agor_actors.runtime import Await, Reply, Request, StartTimer
from agor_actors.store import StoredEvent, StoreUnavailable, open_store
from agor_actors.world import InlineBlocking
from protocols import Codec, Event, Joined, Left, Limits, Since, decode_server_frame

ROOM = "session:s1"


def stored(seq: int, name: str = "task:created", data: Any = None) -> StoredEvent:
    return StoredEvent(ROOM, "e1", seq, None, name, data or {}, 0, "owner", None, None)


def revoking(seq: int) -> StoredEvent:
    return stored(seq, "session:updated", {"session_id": "s1", "updates": {"permissions": {}}})


async def check() -> None:
    return None


def access(event: StoredEvent) -> Callable[[], Awaitable[None]] | None:
    return check if event.event == "session:updated" else None


async def decoded(outbox: Outbox) -> list[object]:
    got: list[object] = []
    while len(outbox):
        frame = await outbox.next_frame()
        got.extend(decode_server_frame(outbox.codec, frame, Limits()))
    return got


def seqs(messages: list[object]) -> list[int]:
    return [m.seq for m in messages if isinstance(m, Event)]


async def joined_room() -> tuple[RoomBehaviour, RoomState, Subscription, Subscription]:
    room = RoomBehaviour(ROOM, store=None, access=access)  # type: ignore[arg-type]
    state = RoomState(room=ROOM, epoch="e1", head=0)
    guest = Subscription("g", ROOM, Outbox(Codec.JSON), user_id="guest")
    owner = Subscription("o", ROOM, Outbox(Codec.JSON), user_id="owner")
    for sub in (guest, owner):
        assert room._subscribe(state, Subscribe(sub, None)) == "live"
        assert [type(m) for m in await decoded(sub.outbox)] == [Joined]
    return room, state, guest, owner


async def test_nothing_past_an_access_change_is_delivered_before_its_check_ended() -> None:
    room, state, guest, owner = await joined_room()
    effects = room._committed(state, (stored(1), revoking(2), stored(3)), 0.0)
    assert [type(e) for e in effects if isinstance(e, Await)] == [Await]
    assert state.head == 2 and [e.seq for e in state.paused] == [3]
    assert seqs(await decoded(guest.outbox)) == [1, 2]
    assert seqs(await decoded(owner.outbox)) == [1, 2]
    # more arrives meanwhile (the broker, the log read again): held, once each
    assert room._committed(state, (stored(3), stored(4)), 0.0) == []
    assert [e.seq for e in state.paused] == [3, 4] and not state.paused_lost
    # the check revokes the guest through the room
    assert room._revoke(state, Revoke(guest.key, "forbidden")) is True
    room._access_checked(state, _AccessChecked(outcome.Value(None)), 0.0)
    assert state.checking is None and state.head == 4
    assert seqs(await decoded(owner.outbox)) == [3, 4]
    got = await decoded(guest.outbox)
    assert [type(m) for m in got] == [Left] and got[0].reason == "forbidden"  # type: ignore[attr-defined]


async def test_a_failed_check_runs_again_and_holds_the_room_meanwhile() -> None:
    room, state, _guest, owner = await joined_room()
    room._committed(state, (revoking(1), stored(2)), 0.0)
    await decoded(owner.outbox)
    effects = room._access_checked(state, _AccessChecked(outcome.Error(RuntimeError("away"))), 0.0)
    assert [(type(e), getattr(e, "delay_s", None)) for e in effects] == [
        (StartTimer, ACCESS_RETRY_S)
    ]
    assert state.checking is not None and len(owner.outbox) == 0
    assert not room.can_passivate(RoomState(room=ROOM, epoch="e1", head=0, checking=check))
    # a second access change in what was held pauses the room again
    room._committed(state, (revoking(3), stored(4)), 0.0)
    room._access_checked(state, _AccessChecked(outcome.Value(None)), 0.0)
    assert seqs(await decoded(owner.outbox)) == [2, 3]
    assert state.checking is not None and [e.seq for e in state.paused] == [4]


async def test_what_waits_for_a_check_is_bounded_and_a_hole_marks_it_for_the_log() -> None:
    room, state, _guest, _owner = await joined_room()
    room.max_held = 3
    room._committed(state, (revoking(1),), 0.0)
    room._committed(state, tuple(stored(n) for n in range(2, 7)), 0.0)
    assert [e.seq for e in state.paused] == [2, 3, 4] and state.paused_lost
    room2, state2, _g, _o = await joined_room()
    room2._committed(state2, (revoking(1), stored(2)), 0.0)
    room2._committed(state2, (stored(4),), 0.0)  # 3 never came
    assert [e.seq for e in state2.paused] == [2] and state2.paused_lost


async def test_a_join_from_past_the_head_waits_for_the_access_check_its_events_wait_for() -> None:
    """A cluster node's room behind what a client saw through another
    daemon reads its log; events there past an access change wait for its
    check, and so does the join: answered at the head its client saw, not
    an older one (simulator, cluster seed 444)."""
    store = open_store("sqlite://", new_epoch=lambda: "e1", shared=True)
    room = RoomBehaviour(ROOM, store=store, access=access)
    room._blocking = InlineBlocking()  # what init takes from the world
    state = RoomState(room=ROOM, epoch="e1", head=1)
    sub = Subscription("c", ROOM, Outbox(Codec.JSON), user_id="owner")
    caller = object()
    join = Request(Subscribe(sub, Since("e1", 4)), caller)  # type: ignore[arg-type]
    effects = list(room.handle(state, join, 0.0))
    assert state.waiting and [type(e) for e in effects if isinstance(e, Await)] == [Await]
    read = outcome.Value([stored(2), revoking(3), stored(4)])
    effects = list(room.handle(state, _Filled(read), 0.0))
    assert state.head == 3 and [e.seq for e in state.paused] == [4]
    assert state.waiting and not [e for e in effects if isinstance(e, Reply)]
    effects = list(room.handle(state, _AccessChecked(outcome.Value(None)), 0.0))
    (reply,) = [e for e in effects if isinstance(e, Reply)]
    assert reply.to is caller and reply.value == "live" and not state.waiting
    (shown,) = [m for m in await decoded(sub.outbox) if isinstance(m, Joined)]
    assert (shown.seq, shown.recovered) == (4, True)
    store.close()


async def test_a_join_waiting_for_a_failed_access_check_is_refused_unavailable() -> None:
    store = open_store("sqlite://", new_epoch=lambda: "e1", shared=True)
    room = RoomBehaviour(ROOM, store=store, access=access)
    room._blocking = InlineBlocking()  # what init takes from the world
    state = RoomState(room=ROOM, epoch="e1", head=1)
    sub = Subscription("c", ROOM, Outbox(Codec.JSON), user_id="owner")
    join = Request(Subscribe(sub, Since("e1", 4)), object())  # type: ignore[arg-type]
    list(room.handle(state, join, 0.0))
    list(room.handle(state, _Filled(outcome.Value([stored(2), revoking(3), stored(4)])), 0.0))
    effects = list(room.handle(state, _AccessChecked(outcome.Error(RuntimeError("away"))), 0.0))
    (reply,) = [e for e in effects if isinstance(e, Reply)]
    assert isinstance(reply.error, StoreUnavailable) and not state.waiting
    store.close()
