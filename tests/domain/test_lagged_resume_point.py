"""The lagged resume point: ``lagged.resume_from`` is exactly the first seq
of the room that the connection did not send.

The protocol promises it (PROTOCOL.md) and the client resumes from
``min(last, resume_from - 1)``, which hides a ``resume_from`` that is too
high from every outcome check: only a direct check of the claim catches
it.  Here a real room behaviour offers committed events (plain and merged)
to a real, small outbox while a writer takes frames at random moments;
whenever the outbox overflows, the ``lagged`` notice must name the seq
right after the last event of the room that went out.
"""

from __future__ import annotations

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agor_actors.daemon import Outbox
from agor_actors.domain.room import RoomBehaviour, RoomState, Subscribe, Subscription
from agor_actors.store import Committed, SqlStore, StoredEvent
from protocols import Codec, Event, Joined, Lagged, Limits, Since, decode_server_frame

ROOM = "session:s1"


def _stored(seq: int, merged: int, size: int) -> StoredEvent:
    return StoredEvent(
        room=ROOM,
        epoch="e1",
        seq=seq,
        last_seq=seq + merged - 1 if merged > 1 else None,
        event="task:message",
        data={"chunk": "x" * size},
        ts=1,
        user_id="u1",
        origin="c1",
        temp_id=None,
    )


class Receiver:
    """What the connection sent of the room, frame by frame."""

    def __init__(self, outbox: Outbox, codec: Codec) -> None:
        self.outbox = outbox
        self.codec = codec
        self.last_sent = 0
        self.joined: list[Joined] = []
        self.lagged: list[tuple[int, int]] = []  # (resume_from, first seq not sent)

    async def take(self) -> None:
        frame = await self.outbox.next_frame()
        for message in decode_server_frame(self.codec, frame, Limits()):
            if isinstance(message, Joined):
                self.joined.append(message)
                self.last_sent = message.seq if not message.recovered else self.last_sent
            elif isinstance(message, Event):
                assert message.seq == self.last_sent + 1, (message.seq, self.last_sent)
                self.last_sent = message.end_seq
            elif isinstance(message, Lagged):
                self.lagged.append((message.resume_from, self.last_sent + 1))


def _run(
    store: SqlStore,
    codec: Codec,
    max_messages: int,
    max_bytes: int,
    frame_messages: int,
    steps: list[tuple[str, int, int, int]],
    since: int | None,
) -> Receiver:
    async def main() -> Receiver:
        behaviour = RoomBehaviour(ROOM, store, ring_size=64)
        state = RoomState(room=ROOM, epoch="e1", head=0)
        outbox = Outbox(
            codec,
            max_messages=max_messages,
            max_bytes=max_bytes,
            max_frame_messages=frame_messages,
        )
        receiver = Receiver(outbox, codec)
        sub = Subscription("c1", ROOM, outbox, user_id="u1")
        head = 0
        # some history first, then the subscription (from ``since`` if any)
        for _ in range(5):
            behaviour.handle(state, Committed(ROOM, (_stored(head + 1, 1, 10),)), 0.0)
            head += 1
        receiver.last_sent = since if since is not None else head
        behaviour._subscribe(state, Subscribe(sub, None if since is None else Since("e1", since)))
        for action, count, merged, size in steps:
            if action == "commit":
                batch = []
                for _ in range(count):
                    batch.append(_stored(head + 1, merged, size))
                    head += merged
                behaviour.handle(state, Committed(ROOM, tuple(batch)), 0.0)
            elif len(outbox):
                for _ in range(count):
                    if not len(outbox):
                        break
                    await receiver.take()
            if sub.key not in state.subscribers:
                # lagged: the room dropped the subscriber; the rest of the
                # queue goes out, then the client would resume
                while len(outbox):
                    await receiver.take()
                receiver.last_sent = receiver.lagged[-1][0] - 1 if receiver.lagged else head
                behaviour._subscribe(state, Subscribe(sub, Since("e1", receiver.last_sent)))
        while len(outbox):
            await receiver.take()
        return receiver

    return trio.run(main)


_steps = st.lists(
    st.tuples(
        st.sampled_from(["commit", "commit", "send"]),
        st.integers(1, 6),  # events in a commit / frames to take
        st.sampled_from([1, 1, 1, 2, 5]),  # seqs a (merged) event covers
        st.integers(1, 300),  # payload bytes
    ),
    max_size=40,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    codec=st.sampled_from([Codec.JSON, Codec.CBOR]),
    max_messages=st.integers(2, 12),
    max_bytes=st.sampled_from([600, 2_000, 1 << 20]),
    frame_messages=st.integers(1, 4),
    since=st.one_of(st.none(), st.integers(2, 5)),
    steps=_steps,
)
def test_lagged_names_the_first_seq_not_sent(
    store: SqlStore,
    codec: Codec,
    max_messages: int,
    max_bytes: int,
    frame_messages: int,
    since: int | None,
    steps: list[tuple[str, int, int, int]],
) -> None:
    receiver = _run(store, codec, max_messages, max_bytes, frame_messages, steps, since)
    for resume_from, first_not_sent in receiver.lagged:
        assert resume_from == first_not_sent


def test_a_burst_past_the_bound_lags_at_the_first_unsent_seq(store: SqlStore) -> None:
    """History 1..5, joined at 5, ten events 6..15 (the room's frames hold at
    most three, as the outbox's do: 6-8, 9-11, 12-14, 15), two frames taken
    (``joined``; 6, 7, 8), then a burst that overflows: ``resume_from`` is 9,
    not the first seq of the burst nor of what was offered."""
    steps = [("commit", 10, 1, 20), ("send", 2, 1, 1), ("commit", 30, 1, 20)]
    receiver = _run(store, Codec.JSON, 12, 1 << 20, 3, steps, since=5)
    assert receiver.lagged == [(9, 9)]
    steps = [("commit", 4, 1, 20), ("send", 1, 1, 1), ("commit", 30, 2, 20)]
    receiver = _run(store, Codec.CBOR, 6, 1 << 20, 2, steps, since=None)
    # history 1..5, then 6..9 in frames 6-7 and 8-9: only ``joined`` went out
    assert receiver.lagged[0] == (6, 6)
