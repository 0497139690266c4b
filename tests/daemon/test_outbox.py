"""The per-connection outbox: batching into one frame, bounds, lag."""

from __future__ import annotations

import orjson
import pytest
import trio
from trio.testing import MockClock

from agor_actors.daemon import Outbox, OutboxOverflow, join_frame
from protocols import Codec, Event, Lagged, Limits, Pong, decode_server_frame, encode


def ev(seq: int, room: str = "session:a") -> tuple[int, str | bytes]:
    return seq, encode(Codec.JSON, Event(room=room, seq=seq, event="task:message", data={"n": seq}))


async def test_events_queued_while_busy_go_out_in_one_frame() -> None:
    out = Outbox(Codec.JSON)
    assert out.offer_events("session:a", [ev(1)])
    first = await out.next_frame()  # idle: the first event goes out alone, at once
    assert isinstance(orjson.loads(first), dict)
    for seq in (2, 3, 4):  # arrive while the write of frame 1 is in flight
        assert out.offer_events("session:a", [ev(seq)])
    out.offer_control(Pong(t=7))
    frame = await out.next_frame()
    msgs = decode_server_frame(Codec.JSON, frame, Limits())
    assert [m.seq for m in msgs if isinstance(m, Event)] == [2, 3, 4]
    assert isinstance(msgs[-1], Pong)
    assert out.statistics().sent_frames == 2 and out.statistics().sent_messages == 5


async def test_cbor_batches_decode_as_arrays() -> None:
    items = [
        encode(Codec.CBOR, Event(room="board:b", seq=s, event="board:updated")) for s in (1, 2)
    ]
    frame = join_frame(Codec.CBOR, items)
    msgs = decode_server_frame(Codec.CBOR, frame, Limits())
    assert [m.seq for m in msgs if isinstance(m, Event)] == [1, 2]


async def test_overflow_drops_the_rooms_backlog_and_queues_lagged() -> None:
    lagged: list[tuple[str, int]] = []
    out = Outbox(Codec.JSON, max_messages=3, on_lagged=lambda r, s: lagged.append((r, s)))
    assert out.offer_events("session:a", [ev(1), ev(2)])
    assert out.offer_events("board:b", [ev(9, "board:b")])
    assert not out.offer_events("session:a", [ev(3)])  # over the bound
    assert lagged == [("session:a", 1)]
    msgs = decode_server_frame(Codec.JSON, await out.next_frame(), Limits())
    # the other room's event stays; the lagging room's backlog is replaced by one notice
    assert [(type(m).__name__, getattr(m, "seq", None)) for m in msgs] == [
        ("Event", 9),
        ("Lagged", None),
    ]
    assert isinstance(msgs[1], Lagged) and msgs[1].resume_from == 1


async def test_byte_bound_and_control_bound() -> None:
    out = Outbox(Codec.JSON, max_bytes=200, max_control=2)
    assert out.offer_events("session:a", [ev(1)])
    assert not out.offer_events("session:a", [ev(2), ev(3), ev(4)])
    out.offer_control(Pong(t=1))
    with pytest.raises(OutboxOverflow):
        out.offer_control(Pong(t=2))


async def test_writer_waits_without_polling_and_close_ends_it() -> None:
    out = Outbox(Codec.JSON)
    frames: list[str | bytes] = []

    async def writer() -> None:
        from agor_actors.daemon import OutboxClosed

        try:
            while True:
                frames.append(await out.next_frame())
        except OutboxClosed:
            pass

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await trio.testing.wait_all_tasks_blocked()
            out.offer_events("session:a", [ev(1)])
            await trio.testing.wait_all_tasks_blocked()
            out.close()
    assert len(frames) == 1


async def test_an_empty_outbox_takes_one_oversized_batch_and_wait_room_counts_bytes(
    autojump_clock: MockClock,
) -> None:
    out = Outbox(Codec.JSON, max_bytes=100)
    big = ev(1)
    assert len(big[1]) > 50
    assert out.offer_events("session:a", [big])  # alone, it goes: never a lag loop
    assert not out.fits_half(1, 10)
    with trio.move_on_after(60) as cancel:  # virtual time: nothing drains it meanwhile
        await out.wait_room(1, 10)  # waits: over half the byte bound
    assert cancel.cancelled_caught
    await out.next_frame()
    with trio.fail_after(1):
        await out.wait_room(1, 10)  # drained: room again
