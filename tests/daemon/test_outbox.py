"""The per-connection outbox: batching into one frame, bounds, lag."""

from __future__ import annotations

import orjson
import pytest
import trio
import trio.testing
from trio.testing import MockClock

from agor_actors.daemon import Outbox, OutboxOverflow, join_frame
from agor_actors.world import OutFrame, PeerTransport
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
    assert not out.offer_events("session:b", [ev(2)])  # nothing joins it: b lags
    stats = out.statistics()
    # over the byte bound, as one batch alone (what the simulator's check allows)
    assert (stats.queued_bytes, stats.queued_batches, stats.queued_messages) == (len(big[1]), 1, 2)
    assert not out.fits_half(1, 10)
    with trio.move_on_after(60) as cancel:  # virtual time: nothing drains it meanwhile
        await out.wait_room(1, 10)  # waits: over half the byte bound
    assert cancel.cancelled_caught
    await out.next_frame()
    with trio.fail_after(1):
        await out.wait_room(1, 10)  # drained: room again


class SlowPeer:
    """A transport whose socket takes each frame only partly: the rest stays
    pending until ``wait_writable`` writes it (when ``credit`` allows)."""

    def __init__(self) -> None:
        self.written: list[str] = []
        self.tail: OutFrame | None = None
        self.credit = trio.Event()
        self.waits = 0

    async def receive(self) -> bytes | str:
        raise AssertionError("not read")

    def try_send(self, frame: OutFrame) -> bool:
        if self.tail is not None:
            return False
        self.tail = frame
        return True

    @property
    def pending(self) -> bool:
        return self.tail is not None

    async def wait_writable(self) -> None:
        self.waits += 1
        await self.credit.wait()
        if self.tail is not None:
            payload = self.tail.payload
            self.written.append(payload if isinstance(payload, str) else payload.decode())
            self.tail = None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        return None

    def peer_gone(self) -> bool:
        return False


async def test_a_frame_the_transport_took_only_partly_is_finished_by_the_writer() -> None:
    out = Outbox(Codec.JSON)
    peer = SlowPeer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(out.run, peer)
        await trio.testing.wait_all_tasks_blocked()
        assert out.offer_events("session:a", [ev(1)])  # taken at once, in part
        assert out.offer_events("session:a", [ev(2)])  # queued: the transport is busy
        assert out.offer_events("session:a", [ev(3)])
        await trio.testing.wait_all_tasks_blocked()
        assert peer.waits == 1 and peer.written == []
        peer.credit.set()  # the peer reads again: nothing is left behind
        await trio.testing.wait_all_tasks_blocked()
        assert not peer.pending
        out.close()
    seqs = [m.seq for w in peer.written for m in decode_server_frame(Codec.JSON, w, Limits())]
    assert seqs == [1, 2, 3]
    assert isinstance(peer, PeerTransport)


def batch(seq: int, committed_s: float) -> OutFrame:
    return OutFrame(ev(seq)[1], committed_s)


async def test_delivery_latency_is_measured_once_per_frame_as_it_is_written() -> None:
    """``on_delivered`` gets a frame's commit time when the transport takes
    it: a frame shared by several outboxes once (its first write from an
    offer), a frame a busy writer sends each time, with the earliest commit
    time of what it joined; control frames and catch-ups never."""
    seen: list[tuple[str, float]] = []
    fast = Outbox(Codec.JSON, on_delivered=lambda c: seen.append(("fast", c)))
    other = Outbox(Codec.JSON, on_delivered=lambda c: seen.append(("other", c)))
    slow = Outbox(Codec.JSON, on_delivered=lambda c: seen.append(("slow", c)))
    peers = [SlowPeer(), SlowPeer(), SlowPeer()]
    async with trio.open_nursery() as nursery:
        for out, peer in zip((fast, other, slow), peers, strict=True):
            nursery.start_soon(out.run, peer)
        await trio.testing.wait_all_tasks_blocked()
        shared = batch(1, 10.0)
        for out in (fast, other, slow):  # taken at once by each: measured at the first
            assert out.offer_batch("session:a", 1, 1, shared)
        assert seen == [("fast", 10.0)]
        peers[0].credit.set()
        peers[1].credit.set()
        await trio.testing.wait_all_tasks_blocked()
        # the slow one is busy: these queue, and its writer joins them
        assert slow.offer_batch("session:a", 2, 1, batch(2, 10.5))
        assert slow.offer_batch("session:a", 3, 1, batch(3, 11.0))
        slow.offer_control(Pong(t=1))
        assert slow.offer_events("session:a", [ev(4)])  # a catch-up: no commit time
        peers[2].credit.set()
        await trio.testing.wait_all_tasks_blocked()
        assert seen == [("fast", 10.0), ("slow", 10.5)]
        fast.offer_control(Pong(t=2))  # a control frame is not a delivery
        await trio.testing.wait_all_tasks_blocked()
        assert seen == [("fast", 10.0), ("slow", 10.5)]
        for out in (fast, other, slow):
            out.close()


async def test_a_room_that_forgot_the_connection_is_resumed_from_the_first_seq_not_sent() -> None:
    """A room's actor crashed: what it offered but the connection did not
    send yet is dropped and ``lagged`` names the first seq not sent; if
    everything was sent, the one after the last offered (a merged event's
    end seq); a room that lagged already or was left is not told twice."""
    out = Outbox(Codec.JSON)
    out.open_room("session:a", 4)  # joined with 1..4 sent
    out.open_room("board:b", 0)
    out.open_room("session:c", 7)
    assert out.offer_events("session:a", [ev(5)], upto=6)  # a chunk merging 5..6
    assert out.offer_events("board:b", [ev(1, "board:b")])
    sent = decode_server_frame(Codec.JSON, await out.next_frame(), Limits())
    assert [m.seq for m in sent if isinstance(m, Event)] == [5, 1]
    assert out.offer_events("session:a", [ev(7), ev(8)])  # queued, not sent
    assert out.offer_events("board:b", [ev(2, "board:b")])
    out.room_lost("session:a")
    out.room_lost("session:a")  # once only: the room is no longer in it
    out.drop_room("session:c")  # left
    out.room_lost("session:c")
    msgs = decode_server_frame(Codec.JSON, await out.next_frame(), Limits())
    assert [(type(m).__name__, getattr(m, "resume_from", None)) for m in msgs] == [
        ("Event", None),  # board:b's, untouched
        ("Lagged", 7),
    ]
    out.room_lost("board:b")  # everything offered was sent: from the next one
    (lagged,) = decode_server_frame(Codec.JSON, await out.next_frame(), Limits())
    assert isinstance(lagged, Lagged) and (lagged.room, lagged.resume_from) == ("board:b", 3)
