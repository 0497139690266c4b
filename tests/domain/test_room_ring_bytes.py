"""The room's ring of recent events is bounded in bytes as well as in
events: a writer's large events (a session's ``git_state``, a tool call's
input, up to a frame each) would otherwise keep 1,024 of them in memory per
room.  A resume from before the ring is caught up from the log."""

from __future__ import annotations

import trio

from agor_actors.daemon import Outbox
from agor_actors.domain.room import (
    CatchUp,
    RoomBehaviour,
    RoomState,
    Subscribe,
    Subscription,
)
from agor_actors.store import EventDraft, SqlStore, WriteRequest
from protocols import Codec, Event, Joined, Limits, Since, decode_server_frame

ROOM = "session:s1"


def test_the_ring_keeps_at_most_its_bytes_and_a_resume_past_it_reads_the_log(
    store: SqlStore,
) -> None:
    behaviour = RoomBehaviour(ROOM, store, ring_size=1024)
    behaviour.ring_bytes_max = 100_000
    big = "x" * 30_000
    drafts = [EventDraft(ROOM, "session:updated", {"git_state": {"diff": big}}, ts=1)]
    stored = []
    for _ in range(10):
        stored.extend(store.commit([WriteRequest(events=tuple(drafts))])[0].events)
    state = RoomState(room=ROOM, epoch=stored[0].epoch, head=0)
    behaviour._fan_out(state, tuple(stored), 0.0)

    # three events of ~30 KB fit in 100 KB: the other seven were let go
    assert state.head == 10
    assert [e.end_seq for e in state.ring] == [8, 9, 10]
    assert state.ring_bytes == sum(e.size for e in state.ring) <= 100_000
    assert all(e.size > 30_000 for e in state.ring)
    # the JSON frame made to size it is the one JSON subscribers get
    [entry] = [e for e in state.ring if e.end_seq == 10]
    [message] = decode_server_frame(Codec.JSON, entry.frames[(Codec.JSON, False)], Limits())
    assert isinstance(message, Event) and message.seq == 10

    async def resume_from(since: int) -> list[int] | CatchUp:
        outbox = Outbox(Codec.JSON, max_messages=64, max_bytes=4 << 20)
        sub = Subscription("c1", ROOM, outbox, user_id="u1")
        result = behaviour._subscribe(state, Subscribe(sub, Since(state.epoch, since)))
        if isinstance(result, CatchUp):
            return result  # the hub reads the gap from the log
        seqs: list[int] = []
        while len(outbox):
            for m in decode_server_frame(Codec.JSON, await outbox.next_frame(), Limits()):
                if isinstance(m, Event):
                    seqs.append(m.seq)
                else:
                    assert isinstance(m, Joined)
        return seqs

    # from memory: what the ring holds; from the log: what it let go
    assert trio.run(resume_from, 8) == [9, 10]
    assert trio.run(resume_from, 2) == CatchUp(state.epoch, 10)
    # an event that alone is larger than the bound stays (the newest is kept)
    huge = [EventDraft(ROOM, "session:updated", {"git_state": {"diff": "y" * 150_000}}, ts=2)]
    behaviour._fan_out(state, store.commit([WriteRequest(events=tuple(huge))])[0].events, 0.0)
    assert [e.end_seq for e in state.ring] == [11] and state.ring_bytes > 100_000
