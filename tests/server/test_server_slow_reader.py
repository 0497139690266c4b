"""A client that stops reading its socket, over real WebSockets on 127.0.0.1
against a real hub on a SQLite file.

Three clients are in one session room: a producer (the Python client,
streaming a message with ``messages.stream``), a fast reader (the Python
client, keeping a mirror of the room) and a stalled reader (the protocol's
client machine over a bare trio-websocket connection that simply stops
calling ``get_message``, so its socket is no longer read).  The server's
outboxes are small (64 messages) and the chunks large (12 KB), so that the
stalled reader's kernel buffers and outbox fill with about a megabyte.

What must hold:

* while the stalled reader does not read, the fast reader gets every chunk
  promptly (each within ``PROMPT_S`` of its call returning), before and
  after the stalled one overflows;
* the stalled reader's overflow drops it from the room: the room counts one
  lag and the fast reader none;
* once it reads again it gets what was in flight, then ``lagged`` (with the
  first seq it was not sent), rejoins with ``since``, catches up from the
  log (told ``lagged`` once, not again) and goes on live: every seq after
  its join applied exactly once, in order, and the message's content whole;
* no wall-clock sleep anywhere: every wait is on an event, under
  ``trio.fail_after``.
"""

from __future__ import annotations

import pathlib
import string
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio_websocket
from server_support import Daemon, daemon

from agor_actors.client import Client, Mirror, connect, open_websocket
from agor_actors.server import ServerSettings
from protocols import (
    ClientConnection,
    ClientState,
    Codec,
    Event,
    EventApplied,
    Lagged,
    ProtocolViolation,
    ResumeRequested,
    RoomJoined,
    RoomStatus,
    ServerError,
    decode_server_frame,
)

CHUNK_CHARS = 12 * 1024
OUTBOX_MESSAGES = 64
PROMPT_S = 2.0
"""How late the fast reader may get a chunk after its call returned."""
MAX_STALLED_CHUNKS = 400
"""~4.8 MB: the stalled reader must overflow long before (its outbox holds
64 events, ~0.8 MB; its kernel buffers a few hundred KB)."""
AFTER_LAG_CHUNKS = 40
"""More than a rejoin is replayed from the room's memory (half the outbox):
the catch-up comes from the log."""
LIVE_CHUNKS = 10
CATCH_UP_S = 8.0


def chunk_text(i: int) -> str:
    """Chunk ``i``: a header naming it, then filler (12 KB in all)."""
    header = f"<{i:05d}>"
    return header + string.ascii_letters[i % 52] * (CHUNK_CHARS - len(header))


class StalledReader:
    """The protocol's client machine over a bare trio-websocket connection.
    trio-websocket's reader task hands messages over through a queue of one:
    while :meth:`pump` is not running, nobody calls ``get_message`` and the
    socket is not read, so the server's sends back up into the kernel
    buffers and then into the connection's outbox."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, codec: Codec) -> None:
        self.ws = ws
        self.codec = codec
        self.machine = ClientConnection(codec=codec, client_id="stalled")
        self.applied: list[Event] = []
        self.lagged: list[Lagged] = []
        self.resumes: list[ResumeRequested] = []
        self.joined_seq: int | None = None
        self.applied_before_lag: int | None = None

    async def pump(self, until: Callable[[], bool]) -> None:
        """Read frames and act on them until ``until()`` holds."""
        while not until():
            frame = await self.ws.get_message()
            self.lagged.extend(
                m for m in decode_server_frame(self.codec, frame) if isinstance(m, Lagged)
            )
            if len(self.lagged) > 1:
                raise AssertionError(
                    f"lagged again while catching up: {self.lagged[-1]!r} after {self.lagged[0]!r}"
                )
            for event in self.machine.receive_data(frame, trio.current_time()):
                if isinstance(event, EventApplied):
                    self.applied.append(event.event)
                elif isinstance(event, ResumeRequested):
                    if event.reason == "lagged" and self.applied_before_lag is None:
                        self.applied_before_lag = self.last_seq
                    self.resumes.append(event)
                    await self.ws.send_message(event.data)
                elif isinstance(event, RoomJoined) and self.joined_seq is None:
                    self.joined_seq = event.seq
                elif isinstance(event, ProtocolViolation | ServerError):
                    raise AssertionError(f"the stalled reader was refused: {event!r}")

    @property
    def last_seq(self) -> int:
        return self.applied[-1].end_seq if self.applied else (self.joined_seq or 0)

    def seq_in(self, room: str) -> int | None:
        track = self.machine.rooms.get(room)
        return None if track is None or track.status is not RoomStatus.LIVE else track.seq


def room_stats(d: Daemon, room: str) -> dict[str, Any]:
    """The room actor's counters, as ``/debug/actors`` shows them."""
    nodes = [d.hub.snapshot()]
    while nodes:
        node = nodes.pop()
        if node.get("room") == room and "lagged" in node:
            return node
        nodes.extend(node.get("children", []))
        if isinstance(node.get("supervisor"), dict):
            nodes.append(node["supervisor"])
    raise AssertionError(f"no actor for {room}")


@pytest.mark.parametrize(
    "outbox_bytes",
    [
        pytest.param(1024 * 1024, id="catch-up-page-fits-the-byte-bound"),
        pytest.param(256 * 1024, id="catch-up-page-beyond-the-byte-bound"),
    ],
)
async def test_a_stalled_reader_slows_nobody_lags_and_catches_up_from_the_log(
    tmp_path: pathlib.Path, outbox_bytes: int
) -> None:
    settings = ServerSettings(outbox_messages_max=OUTBOX_MESSAGES, outbox_bytes_max=outbox_bytes)
    async with (
        daemon(tmp_path / "agor", settings) as d,
        connect(d.ws_url, token=d.token, codec="json") as producer,
        connect(d.ws_url, token=d.token, codec="cbor") as fast,
        open_websocket(d.ws_url, subprotocols=[Codec.JSON.subprotocol]) as ws,
    ):
        session = await producer.service("sessions").create({"title": "slow reader"})
        room = f"session:{session['id']}"
        message = await producer.service("messages").create(
            {"session_id": session["id"], "role": "assistant", "content": ""}
        )
        mid = message["id"]
        mirror = await fast.join(room)
        assert mirror.get("messages", mid) is not None

        stalled = StalledReader(ws, Codec.JSON)
        with trio.fail_after(5):
            await ws.send_message(stalled.machine.hello(d.token))
            await stalled.pump(lambda: stalled.machine.state is ClientState.OPEN)
            await ws.send_message(stalled.machine.join(room))
            await stalled.pump(lambda: stalled.seq_in(room) is not None)
        start_seq = stalled.joined_seq
        assert start_seq is not None

        sent: list[str] = []
        stream = Producer(producer, fast, mirror, mid, sent)

        # The stalled reader reads nothing from here on.  Stream until its
        # outbox overflows (the room drops it), then some more: the fast
        # reader gets each chunk promptly all along.
        with trio.fail_after(60):
            while room_stats(d, room)["lagged"] == 0:
                assert len(sent) < MAX_STALLED_CHUNKS, "the stalled reader never lagged"
                await stream.one()
            for _ in range(AFTER_LAG_CHUNKS):
                await stream.one()
        stats = room_stats(d, room)
        assert stats["lagged"] == 1
        assert stats["subscribers"] == 1  # only the fast reader is still in the room
        assert fast.machine.statistics().lagged == 0
        head = stalled_head = mirror.seq
        assert stalled.applied == [] and stalled.lagged == []

        # It reads again: what was in flight, then ``lagged``, then the
        # catch-up from the log, up to the room's head.
        with trio.fail_after(CATCH_UP_S):
            await stalled.pump(lambda: stalled.seq_in(room) == head)

        # Live again: each new chunk reaches both readers promptly.
        for _ in range(LIVE_CHUNKS):
            await stream.one()
            with trio.fail_after(PROMPT_S):
                await stalled.pump(lambda: stalled.seq_in(room) == mirror.seq)
        head = mirror.seq

        # Told ``lagged`` once, with the first seq it was not sent; every
        # event before it came first, in order.
        assert len(stalled.lagged) == 1
        lagged = stalled.lagged[0]
        assert lagged.room == room
        assert stalled.applied_before_lag is not None
        assert lagged.resume_from == stalled.applied_before_lag + 1
        assert [r.reason for r in stalled.resumes] == ["lagged"]
        assert stalled.resumes[0].join.since is not None
        assert stalled.resumes[0].join.since.seq == lagged.resume_from - 1
        # The gap it resumed over was more than a rejoin replays from the
        # room's memory (half the outbox): it came from the log.
        assert stalled_head - (lagged.resume_from - 1) > OUTBOX_MESSAGES // 2

        # Every seq after its join exactly once, in order, nothing lost.
        covered: list[int] = []
        for event in stalled.applied:
            covered.extend(range(event.seq, event.end_seq + 1))
        assert covered == list(range(start_seq + 1, head + 1))
        machine_stats = stalled.machine.statistics()
        assert machine_stats.gaps == 0 and machine_stats.overlaps == 0
        assert machine_stats.events_ignored == 0  # nothing of the room after ``lagged``
        content = "".join(e.data["chunk"] for e in stalled.applied)
        assert content == "".join(sent)
        assert [e.data["offset"] for e in stalled.applied[:1]] == [0]

        # The fast reader's mirror and the store agree.
        fast_message = mirror.get("messages", mid)
        assert fast_message is not None and fast_message["content"] == "".join(sent)
        stored = await producer.service("messages").get(mid)
        assert stored["content"] == "".join(sent)
        assert len(sent) >= AFTER_LAG_CHUNKS + LIVE_CHUNKS + 1


class Producer:
    """Streams chunk after chunk; after each call returns, waits (at most
    ``PROMPT_S``) until the fast reader's mirror holds it."""

    def __init__(
        self, client: Client, fast: Client, mirror: Mirror, message_id: str, sent: list[str]
    ) -> None:
        self.client = client
        self.fast = fast
        self.mirror = mirror
        self.message_id = message_id
        self.sent = sent

    async def one(self) -> None:
        text = chunk_text(len(self.sent))
        result = await self.client.service("messages").call(
            "stream", self.message_id, {"chunk": text}
        )
        assert result["appended"] == len(text)
        self.sent.append(text)
        length = sum(len(s) for s in self.sent)

        def holds_it(mirror: Mirror) -> bool:
            row = mirror.get("messages", self.message_id)
            return row is not None and len(row.get("content") or "") >= length

        with trio.fail_after(PROMPT_S):
            await self.mirror.wait_until(holds_it)
