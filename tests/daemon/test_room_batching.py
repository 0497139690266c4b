"""The room's delivery as a plain function (no loop, no store): a batch is
one frame shared by every up-to-date subscriber, a quiet room delivers at
once, and a room under load delivers at most once per batch window per
subscriber, with nothing missing and nothing out of order."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from agor_actors.daemon import Outbox
from agor_actors.domain.room import RoomBehaviour, RoomState, Subscribe, Subscription
from agor_actors.runtime import StartTimer
from agor_actors.store import Committed, StoredEvent
from agor_actors.world import OutFrame, PeerTransport
from protocols import Codec, Event, Joined, Limits, decode_server_frame

ROOM = "session:s1"


class Recorder:
    """A transport that takes every frame at once and keeps it."""

    def __init__(self) -> None:
        self.frames: list[OutFrame] = []

    async def receive(self) -> bytes | str:
        raise AssertionError("not read")

    def try_send(self, frame: OutFrame) -> bool:
        self.frames.append(frame)
        return True

    pending = False

    async def wait_writable(self) -> None:
        raise AssertionError("never busy")

    async def close(self, code: int = 1000, reason: str = "") -> None:
        return None

    def peer_gone(self) -> bool:
        return False


def stored(seq: int) -> StoredEvent:
    return StoredEvent(ROOM, "e1", seq, None, "task:created", {"n": seq}, 0, "u", None, None)


def setup(
    n: int, codecs: tuple[Codec, ...] = (Codec.JSON,)
) -> tuple[RoomBehaviour, RoomState, list[tuple[Outbox, Recorder]]]:
    room = RoomBehaviour(ROOM, store=None)  # type: ignore[arg-type]  # handle never reads it
    room.window_sends_max = 2 * n
    state = RoomState(room=ROOM, epoch="e1", head=0)
    outs = []
    for i in range(n):
        out = Outbox(codecs[i % len(codecs)])
        rec = Recorder()
        room._subscribe(
            state, Subscribe(Subscription(connection_id=f"c{i}", room=ROOM, outbox=out), None)
        )
        outs.append((out, rec))
    return room, state, outs


def seqs(rec: Recorder, codec: Codec = Codec.JSON) -> list[int]:
    got: list[int] = []
    for frame in rec.frames:
        for msg in decode_server_frame(codec, frame.payload, Limits()):
            if isinstance(msg, Joined):
                continue  # each subscriber's join notice
            assert isinstance(msg, Event)
            got.append(msg.seq)
    return got


async def writing(nursery: trio.Nursery, outs: list[tuple[Outbox, Recorder]]) -> None:
    """Each outbox's writer on its transport, idle: from now on an offer is
    written at once, in the offering call (what the room's tests look at)."""
    for out, rec in outs:
        nursery.start_soon(out.run, rec)
    await trio.testing.wait_all_tasks_blocked()
    for _, rec in outs:
        rec.frames.clear()  # the join notices queued before


def commit(room: RoomBehaviour, state: RoomState, first: int, n: int, now: float) -> list[Any]:
    events = tuple(stored(s) for s in range(first, first + n))
    return list(room.handle(state, Committed(ROOM, events), now))


async def test_a_quiet_room_delivers_at_once_one_shared_frame_per_codec(
    nursery: trio.Nursery,
) -> None:
    room, state, outs = setup(4, codecs=(Codec.JSON, Codec.CBOR))
    await writing(nursery, outs)
    effects = commit(room, state, 1, 3, now=10.0)
    assert not [e for e in effects if isinstance(e, StartTimer) and e.key == "window"]
    frames = [rec.frames for _, rec in outs]
    assert all(len(f) == 1 for f in frames)
    # the same object (framed once on the wire) for every subscriber of a codec
    assert frames[0][0] is frames[2][0] and frames[1][0] is frames[3][0]
    assert frames[0][0] is not frames[1][0]
    assert seqs(outs[0][1]) == [1, 2, 3]
    assert seqs(outs[1][1], Codec.CBOR) == [1, 2, 3]


async def test_under_load_at_most_one_frame_per_window_nothing_missing(
    nursery: trio.Nursery,
) -> None:
    room, state, outs = setup(3)  # window_sends_max = 6: two deliveries at once per window
    await writing(nursery, outs)
    now = 0.0
    timers: list[StartTimer] = []
    seq = 1
    # 100 commits of 2 events, 5 ms apart: 500 ms of load
    for _ in range(100):
        effects = commit(room, state, seq, 2, now)
        seq += 2
        timers += [e for e in effects if isinstance(e, StartTimer) and e.key == "window"]
        due = state.window_start_s + room.batch_window_s
        now += 0.005
        if state.window_timer and now >= due:
            room.handle(state, timers[-1].msg, due)
            await trio.testing.wait_all_tasks_blocked()  # a window's end: the writers send
    if state.window_timer:
        room.handle(state, timers[-1].msg, state.window_start_s + room.batch_window_s)
        await trio.testing.wait_all_tasks_blocked()
    for _, rec in outs:
        assert seqs(rec) == list(range(1, seq))  # in order, nothing missing, no duplicate
        # ~500 ms of load: at most 2 frames at once plus one held per window
        assert len(rec.frames) <= 3 * 6 + 2
    assert state.windows >= 4


async def test_a_subscriber_that_joins_during_a_window_gets_only_what_follows_its_join(
    nursery: trio.Nursery,
) -> None:
    room, state, outs = setup(1)  # window_sends_max = 2
    await writing(nursery, outs)
    commit(room, state, 1, 1, now=0.0)
    commit(room, state, 2, 1, now=0.01)
    effects = commit(room, state, 3, 2, now=0.02)  # held for the window's end
    (timer,) = [e for e in effects if isinstance(e, StartTimer) and e.key == "window"]
    assert seqs(outs[0][1]) == [1, 2]
    late = Subscription(connection_id="late", room=ROOM, outbox=Outbox(Codec.JSON))
    rec = Recorder()
    await writing(nursery, [(late.outbox, rec)])
    room._subscribe(state, Subscribe(late, None))  # at the head (4), which the window holds
    assert timer.at_s == 0.1  # windows are aligned to the clock
    room.handle(state, timer.msg, 0.1)
    await trio.testing.wait_all_tasks_blocked()  # a window's end is sent by the writer
    assert seqs(outs[0][1]) == [1, 2, 3, 4]
    assert seqs(rec) == []
    commit(room, state, 5, 1, now=0.3)
    assert rec.frames[-1] is outs[0][1].frames[-1]  # up to date: the shared frame
    assert seqs(rec) == [5]


async def test_a_connection_in_several_busy_rooms_gets_one_frame_per_window(
    nursery: trio.Nursery,
) -> None:
    """Three busy rooms, one connection joined to all: their windows are
    aligned, so they end at one instant, and what they hold reaches the
    connection as one frame."""
    out, rec = Outbox(Codec.JSON), Recorder()
    await writing(nursery, [(out, rec)])
    rooms = []
    for name in ("session:a", "session:b", "board:c"):
        room = RoomBehaviour(name, store=None)  # type: ignore[arg-type]
        room.window_sends_max = 1
        state = RoomState(room=name, epoch="e1", head=0)
        room._subscribe(
            state, Subscribe(Subscription(connection_id="c", room=name, outbox=out), None)
        )
        rooms.append((room, state))
    await trio.testing.wait_all_tasks_blocked()
    rec.frames.clear()  # the three join notices

    def committed(room: RoomBehaviour, state: RoomState, seq: int, now: float) -> list[Any]:
        event = StoredEvent(
            state.room, "e1", seq, None, "task:created", {"n": seq}, 0, "u", None, None
        )
        return list(room.handle(state, Committed(state.room, (event,)), now))

    ends: list[tuple[float, Any, RoomBehaviour, RoomState]] = []
    # each room: one event at once (its window's one send), then two held;
    # the rooms start their load at different times within the window
    for offset, (room, state) in zip((0.012, 0.034, 0.071), rooms, strict=True):
        for i, seq in enumerate((1, 2, 3)):
            for effect in committed(room, state, seq, 1.0 + offset + i * 0.001):
                if isinstance(effect, StartTimer) and effect.key == "window":
                    assert effect.at_s is not None
                    ends.append((effect.at_s, effect.msg, room, state))
    assert len(ends) == 3 and len({at for at, *_ in ends}) == 1  # one instant for all
    await trio.testing.wait_all_tasks_blocked()
    before = len(rec.frames)
    assert before == 3  # the first event of each room went at once (a quiet start)
    for at, msg, room, state in ends:
        room.handle(state, msg, at)
    await trio.testing.wait_all_tasks_blocked()
    assert len(rec.frames) == before + 1  # the three windows' ends: one frame
    got = [
        (m.room, m.seq)
        for m in decode_server_frame(Codec.JSON, rec.frames[-1].payload, Limits())
        if isinstance(m, Event)
    ]
    assert sorted(got) == sorted(
        (r, s) for r in ("session:a", "session:b", "board:c") for s in (2, 3)
    )


def test_recorder_is_a_transport() -> None:
    assert isinstance(Recorder(), PeerTransport)
