"""One connection's outbox: bounded, and the connection's one write path.

Rooms never await a subscriber: they *offer* already-encoded events, which
either fit or make that subscriber lag (its backlog for the room is dropped
and a ``lagged`` notice takes its place).

With a transport attached (:meth:`Outbox.run`, the connection's writer), an
offer to an idle connection is written at once, in the offering task, with
no task switch: a room's batch is one :class:`~agor_actors.world.OutFrame`,
framed once and written to every subscriber that is up to date.  While the
transport is busy (the peer reads slower than we write), offers queue, and
the writer sends everything queued as one frame once the socket takes more:
events that arrive while a write is in flight go out together.  Without a
transport (an in-process consumer), :meth:`Outbox.next_frame` takes what is
queued.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import attrs
import trio

from protocols import Codec, Lagged, Limits, Message, Presence, encode

from ..marks import mark
from ..world import OutFrame, PeerTransport

__all__ = ["Outbox", "OutboxClosed", "OutboxOverflow", "OutboxStats", "join_frame"]

Frame = bytes | str


class OutboxOverflow(Exception):
    """Control messages (results, notices) beyond their bound: the client is
    not reading at all; the connection should be closed (1008)."""


class OutboxClosed(Exception):
    pass


def join_frame(codec: Codec, items: list[Frame]) -> Frame:
    """One frame from single-message encodings: the message itself, or a
    batch (JSON array; CBOR indefinite-length array) of them."""
    if len(items) == 1:
        return items[0]
    if codec is Codec.JSON:
        return (
            "[" + ",".join(item if isinstance(item, str) else item.decode() for item in items) + "]"
        )
    return (
        b"\x9f"
        + b"".join(item if isinstance(item, bytes) else item.encode() for item in items)
        + b"\xff"
    )


@attrs.frozen
class OutboxStats:
    queued_messages: int
    queued_bytes: int
    sent_frames: int
    sent_messages: int
    lagged: int
    sent_bytes: int = 0
    queued_batches: int = 0
    """Queue entries holding room events (a batch or a single event): the
    byte bound holds whenever there are two or more (see :class:`Outbox`)."""


@attrs.define(slots=True)
class _Entry:
    item: Frame | OutFrame
    room: str | None  # set for reliable room events (droppable on lag)
    first_seq: int = 0
    size: int = 0
    count: int = 1  # messages in ``item`` (a room's batch holds several)


class Outbox:
    """Bounded in messages (``max_messages``) and bytes (``max_bytes``) for
    room events: overflow policy *drop the room's backlog and tell the
    client ``lagged``*.  Control messages are bounded by ``max_control``:
    overflow policy *close the connection*.  A transport adds at most one
    frame's unwritten tail (:class:`~agor_actors.world.PeerTransport`).

    An outbox that holds no events takes any one batch, whatever its size
    (else an event, or a window's batch, larger than ``max_bytes`` could
    never be sent: the client would lag and catch up on it forever); so the
    events held are at most ``max_bytes``, or one batch alone."""

    def __init__(
        self,
        codec: Codec,
        *,
        max_messages: int = 2000,
        max_bytes: int = 4 * 1024 * 1024,
        max_control: int = 1024,
        max_frame_messages: int = Limits().max_batch,
        on_lagged: Callable[[str, int], None] | None = None,
        on_delivered: Callable[[float], None] | None = None,
    ) -> None:
        self.codec = codec
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_control = max_control
        self.max_frame_messages = max_frame_messages
        self.on_lagged = on_lagged
        self.on_delivered = on_delivered
        """Told the ``committed_s`` of a frame of fresh room events as the
        transport takes it (see :meth:`_written`)."""
        self._queue: deque[_Entry] = deque()
        self._event_count = 0
        self._event_bytes = 0
        self._control_count = 0
        self._presence: dict[str, Presence] = {}
        self._lot = trio.lowlevel.ParkingLot()
        self._drained = trio.lowlevel.ParkingLot()
        self._closed = False
        self._transport: PeerTransport | None = None
        self._held: OutFrame | None = None  # taken from the queue, not yet taken by the transport
        self._writer_idle = False  # the writer waits for something to send
        self.sent_frames = 0
        self.sent_messages = 0
        self.sent_bytes = 0
        """Payload bytes taken by the transport (the WebSocket's framing not counted)."""
        self.lagged = 0
        self._rooms: set[str] = set()  # rooms that offered events (until dropped)
        self._upto: dict[str, int] = {}
        """Per room this connection is in: the end seq of the last event
        offered (what a room that forgot it must resume from, see
        :meth:`room_lost`); a room that lagged or was dropped is not here."""

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._queue)

    def offer_control(self, message: Message | Frame) -> None:
        """Queue a result or notice.  Never blocks; raises :class:`OutboxOverflow`."""
        if self._closed:
            raise OutboxClosed()
        if self._control_count >= self.max_control:
            raise OutboxOverflow(f"more than {self.max_control} control messages queued")
        item = message if isinstance(message, bytes | str) else encode(self.codec, message)
        self._queue.append(_Entry(item, None))
        self._control_count += 1
        self._kick()

    def offer_events(
        self, room: str, events: list[tuple[int, Frame]], *, upto: int | None = None
    ) -> bool:
        """Queue encoded events ``(seq, item)`` of ``room``; ``upto``: the end
        seq of the last (a merged event's ``last_seq``; default its seq).
        Returns False if they did not fit: then the room's whole backlog here
        is dropped and a ``lagged`` notice with the first undelivered seq is
        queued instead; the caller must stop sending this room to this
        outbox."""
        if self._closed:
            return False
        if not events:
            return True
        size = sum(len(item) for _, item in events)
        if not self._fits(len(events), size):
            self._lag(room, events[0][0])
            return False
        self._rooms.add(room)
        self._upto[room] = events[-1][0] if upto is None else upto
        for seq, item in events:
            self._queue.append(_Entry(item, room, seq, len(item)))
        self._event_count += len(events)
        self._event_bytes += size
        self._kick()
        return True

    def offer_batch(
        self,
        room: str,
        first_seq: int,
        count: int,
        frame: OutFrame,
        *,
        upto: int | None = None,
        hold: bool = False,
    ) -> bool:
        """Queue ``count`` events of ``room`` from ``first_seq`` already
        joined into one frame (shared by every subscriber it goes to);
        ``upto`` as for :meth:`offer_events` (default ``first_seq + count - 1``).
        Overflow as for :meth:`offer_events`.  ``hold``: not written in the
        offering task even if the connection is idle; the writer sends it
        on its next turn, with whatever else was queued by then (the other
        rooms whose batch window ended at the same instant): one frame.
        An outbox that only one room offers to sends at once all the same
        (nothing could join it; a task switch less per window)."""
        if self._closed:
            return False
        size = len(frame)
        if not self._fits(count, size):
            self._lag(room, first_seq)
            return False
        self._queue.append(_Entry(frame, room, first_seq, size, count))
        self._event_count += count
        self._event_bytes += size
        self._rooms.add(room)
        self._upto[room] = first_seq + count - 1 if upto is None else upto
        if hold and len(self._rooms) > 1:
            self._lot.unpark()
        else:
            self._kick()
        return True

    def _fits(self, messages: int, size: int) -> bool:
        return self._event_count == 0 or (  # an empty outbox takes any one batch
            self._event_count + messages <= self.max_messages
            and self._event_bytes + size <= self.max_bytes
        )

    def _lag(self, room: str, first_seq: int) -> None:
        """Drop the room's backlog here and queue ``lagged`` from the first
        seq the client has not been sent."""
        resume_from = first_seq
        self._upto.pop(room, None)
        kept: deque[_Entry] = deque()
        for entry in self._queue:
            if entry.room == room:
                resume_from = min(resume_from, entry.first_seq)
                self._event_count -= entry.count
                self._event_bytes -= entry.size
            else:
                kept.append(entry)
        self._queue = kept
        self.lagged += 1
        mark("outbox.lagged")
        self.offer_control(Lagged(room=room, resume_from=resume_from))
        if self.on_lagged is not None:
            self.on_lagged(room, resume_from)

    def offer_presence(self, board: str, frame: Presence) -> None:
        """Set the board's presence to send: never queued behind itself; an
        unsent frame is merged with the newer one (users and viewport: the
        newer wins; cursors: the latest per user; highlights: both)."""
        if self._closed:
            return
        old = self._presence.get(board)
        if old is not None:
            cursors = {c["user_id"]: c for c in (old.cursors or [])}
            cursors.update({c["user_id"]: c for c in (frame.cursors or [])})
            highlights = [*(old.highlights or []), *(frame.highlights or [])][-64:]
            frame = Presence(
                board=board,
                users=frame.users if frame.users is not None else old.users,
                cursors=list(cursors.values()) or None,
                viewport=frame.viewport if frame.viewport is not None else old.viewport,
                highlights=highlights or None,
            )
        self._presence[board] = frame
        self._kick()

    @property
    def shedding(self) -> bool:
        """Reliable events are backing up: presence waits (it is shed first)."""
        return self._event_count > self.max_messages // 4

    def drop_room(self, room: str) -> int | None:
        """Forget queued events of a room (after ``leave``, or when the room
        is gone); returns the first seq dropped (None: nothing was queued)."""
        self._rooms.discard(room)
        self._upto.pop(room, None)
        first: int | None = None
        kept: deque[_Entry] = deque()
        for entry in self._queue:
            if entry.room == room:
                first = entry.first_seq if first is None else min(first, entry.first_seq)
                self._event_count -= entry.count
                self._event_bytes -= entry.size
            else:
                kept.append(entry)
        self._queue = kept
        return first

    def open_room(self, room: str, upto: int) -> None:
        """``room`` took this connection in with everything up to ``upto``
        already sent or offered (its join's start)."""
        self._upto[room] = upto

    def room_lost(self, room: str) -> None:
        """``room`` forgot this connection (its actor crashed): what it
        offered but not yet sent is dropped and ``lagged`` from the first
        seq not sent is queued, so that the client resumes.  Nothing if the
        room had already dropped it (it lagged, left or was revoked)."""
        upto = self._upto.get(room)
        if upto is None or self._closed:
            return
        dropped = self.drop_room(room)
        self.offer_control(Lagged(room=room, resume_from=upto + 1 if dropped is None else dropped))

    # ------------------------------------------------------------- sending

    def _ready(self) -> bool:
        return bool(self._queue) or (bool(self._presence) and not self._closed)

    def _take(self) -> OutFrame:
        """Everything queued (up to ``max_frame_messages``) as one frame.  A
        lone room batch is passed on as it is (its wire bytes are shared)."""
        if len(self._queue) == 1 and not self._presence:
            entry = self._queue.popleft()
            self._taken(entry)
            self.sent_frames += 1
            self.sent_messages += entry.count
            self._drained.unpark_all()
            item = entry.item
            self.sent_bytes += len(item)
            return item if isinstance(item, OutFrame) else OutFrame(item)
        parts: list[Frame] = []
        messages = 0
        committed_s = 0.0
        if self._presence and not self.shedding:
            for presence in self._presence.values():
                parts.append(encode(self.codec, presence))
            messages += len(self._presence)
            self._presence.clear()
        while self._queue:
            entry = self._queue[0]
            if messages and messages + entry.count > self.max_frame_messages:
                break
            self._queue.popleft()
            self._taken(entry)
            item = entry.item
            if isinstance(item, OutFrame):
                parts.append(_inner(self.codec, item.payload, entry.count))
                if item.committed_s and (not committed_s or item.committed_s < committed_s):
                    committed_s = item.committed_s
            else:
                parts.append(item)
            messages += entry.count
        self.sent_frames += 1
        self.sent_messages += messages
        self._drained.unpark_all()
        frame = OutFrame(_join(self.codec, parts, messages), committed_s)
        self.sent_bytes += len(frame)
        return frame

    def _taken(self, entry: _Entry) -> None:
        if entry.room is None:
            self._control_count -= 1
        else:
            self._event_count -= entry.count
            self._event_bytes -= entry.size

    def _kick(self) -> None:
        """Something was queued.  An idle connection's transport takes it at
        once, here (no task switch); a busy one's writer sends it later."""
        transport = self._transport
        if transport is None or not self._writer_idle:
            self._lot.unpark()
            return
        while self._held is not None or self._ready():
            if self._held is None:
                self._held = self._take()
            frame = self._held
            if not transport.try_send(frame):
                break
            self._held = None
            if frame.committed_s and not frame.measured:
                self._written(frame)
            if transport.pending:
                break
        else:
            return
        # the transport is busy: the writer takes over
        self._writer_idle = False
        self._lot.unpark()

    def _written(self, frame: OutFrame) -> None:
        """``frame`` of fresh room events was taken by the transport: its
        delivery latency is measured.  Once per frame: a frame the room
        shares between its subscribers is measured at its first write from
        an offer (the others from offers follow in the same task, with no
        await between), and at every write by a busy connection's writer
        (the slow subscribers, the tail worth seeing)."""
        frame.measured = True
        if self.on_delivered is not None:
            self.on_delivered(frame.committed_s)

    async def run(self, transport: PeerTransport) -> None:
        """The connection's writer: from now on offers go to ``transport``
        (at once while it is idle); this task sends what queues while it is
        busy.  Returns once the outbox is closed and everything queued has
        been taken by the transport.  Cancelled: what is queued is not sent."""
        self._transport = transport
        try:
            while True:
                if self._held is None:
                    if transport.pending:
                        await transport.wait_writable()
                        continue
                    if not self._ready():
                        if self._closed:
                            return
                        self._writer_idle = True
                        try:
                            await self._lot.park()
                        finally:
                            self._writer_idle = False
                        continue
                    self._held = self._take()
                frame = self._held
                if transport.try_send(frame):
                    self._held = None
                    if frame.committed_s:
                        self._written(frame)
                    await trio.lowlevel.checkpoint()
                else:
                    await transport.wait_writable()
        finally:
            self._transport = None
            self._writer_idle = False

    async def next_frame(self) -> Frame:
        """For an in-process consumer (no transport): wait for something to
        send and take all of it (up to ``max_frame_messages``) as one frame.
        A checkpoint; raises :class:`OutboxClosed` once closed and drained."""
        while not self._ready():
            if self._closed:
                raise OutboxClosed()
            await self._lot.park()
        await trio.lowlevel.checkpoint_if_cancelled()
        return self._take().payload

    def fits_half(self, messages: int, size: int) -> bool:
        """Whether ``messages`` more events of ``size`` bytes in all keep the
        outbox within half its bounds (the share a replay may take at once)."""
        return (
            self._event_count + messages <= self.max_messages // 2
            and self._event_bytes + size <= self.max_bytes // 2
        )

    async def wait_room(self, messages: int, size: int = 0) -> None:
        """Wait until ``messages`` more events of ``size`` bytes fit within
        half the bounds, or the outbox holds no events (a catch-up from the
        log goes at the pace the client reads).  A checkpoint; raises
        :class:`OutboxClosed` if closed meanwhile."""
        await trio.lowlevel.checkpoint()
        while not self.fits_half(messages, size) and self._event_count > 0:
            if self._closed:
                raise OutboxClosed()
            await self._drained.park()
        if self._closed:
            raise OutboxClosed()

    def close(self) -> None:
        """No more offers; the writer drains what is queued, then stops."""
        self._closed = True
        self._lot.unpark_all()
        self._drained.unpark_all()

    def statistics(self) -> OutboxStats:
        return OutboxStats(
            queued_messages=len(self._queue),
            queued_bytes=self._event_bytes,
            sent_frames=self.sent_frames,
            sent_messages=self.sent_messages,
            lagged=self.lagged,
            sent_bytes=self.sent_bytes,
            queued_batches=sum(1 for entry in self._queue if entry.room is not None),
        )


def _inner(codec: Codec, payload: Frame, count: int) -> Frame:
    """The messages inside a frame of ``count`` messages made by
    :func:`join_frame`, as a part for :func:`_join` (a batch without its
    brackets: its items, comma-separated or concatenated)."""
    if count == 1:
        return payload
    if codec is Codec.JSON:
        text = payload if isinstance(payload, str) else payload.decode()
        return text[1:-1]
    raw = payload if isinstance(payload, bytes) else payload.encode()
    return raw[1:-1]


def _join(codec: Codec, parts: list[Frame], messages: int) -> Frame:
    """One frame of ``messages`` messages from parts made by :func:`_inner`."""
    if messages == 1:
        return parts[0]
    if codec is Codec.JSON:
        return "[" + ",".join(p if isinstance(p, str) else p.decode() for p in parts) + "]"
    return b"\x9f" + b"".join(p if isinstance(p, bytes) else p.encode() for p in parts) + b"\xff"
