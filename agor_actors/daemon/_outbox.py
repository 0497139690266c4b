"""One connection's outbox: bounded, drained by one writer task.

Rooms never await a subscriber: they *offer* already-encoded events, which
either fit or make that subscriber lag (its backlog for the room is dropped
and a ``lagged`` notice takes its place).  The writer takes everything
queued and sends it as one frame, so events that arrive while a write is in
flight go out together, and nothing waits when the connection is idle.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import attrs
import trio

from protocols import Codec, Lagged, Limits, Message, Presence, encode

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


@attrs.define(slots=True)
class _Entry:
    item: Frame
    room: str | None  # set for reliable room events (droppable on lag)
    first_seq: int = 0
    size: int = 0


class Outbox:
    """Bounded in messages (``max_messages``) and bytes (``max_bytes``) for
    room events: overflow policy *drop the room's backlog and tell the
    client ``lagged``*.  Control messages are bounded by ``max_control``:
    overflow policy *close the connection*."""

    def __init__(
        self,
        codec: Codec,
        *,
        max_messages: int = 2000,
        max_bytes: int = 4 * 1024 * 1024,
        max_control: int = 1024,
        max_frame_messages: int = Limits().max_batch,
        on_lagged: Callable[[str, int], None] | None = None,
    ) -> None:
        self.codec = codec
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_control = max_control
        self.max_frame_messages = max_frame_messages
        self.on_lagged = on_lagged
        self._queue: deque[_Entry] = deque()
        self._event_count = 0
        self._event_bytes = 0
        self._control_count = 0
        self._presence: dict[str, Presence] = {}
        self._lot = trio.lowlevel.ParkingLot()
        self._drained = trio.lowlevel.ParkingLot()
        self._closed = False
        self.sent_frames = 0
        self.sent_messages = 0
        self.lagged = 0

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
        self._lot.unpark()

    def offer_events(self, room: str, events: list[tuple[int, Frame]]) -> bool:
        """Queue encoded events ``(seq, item)`` of ``room``.  Returns False if
        they did not fit: then the room's whole backlog here is dropped and a
        ``lagged`` notice with the first undelivered seq is queued instead;
        the caller must stop sending this room to this outbox."""
        if self._closed:
            return False
        size = sum(len(item) for _, item in events)
        if self._event_count > 0 and (  # an empty outbox takes any one batch
            self._event_count + len(events) > self.max_messages
            or self._event_bytes + size > self.max_bytes
        ):
            resume_from = events[0][0] if events else 0
            kept: deque[_Entry] = deque()
            for entry in self._queue:
                if entry.room == room:
                    resume_from = min(resume_from, entry.first_seq)
                    self._event_count -= 1
                    self._event_bytes -= entry.size
                else:
                    kept.append(entry)
            self._queue = kept
            self.lagged += 1
            self.offer_control(Lagged(room=room, resume_from=resume_from))
            if self.on_lagged is not None:
                self.on_lagged(room, resume_from)
            return False
        for seq, item in events:
            self._queue.append(_Entry(item, room, seq, len(item)))
        self._event_count += len(events)
        self._event_bytes += size
        self._lot.unpark()
        return True

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
        self._lot.unpark()

    @property
    def shedding(self) -> bool:
        """Reliable events are backing up: presence waits (it is shed first)."""
        return self._event_count > self.max_messages // 4

    def drop_room(self, room: str) -> None:
        """Forget queued events of a room (after ``leave``)."""
        kept: deque[_Entry] = deque()
        for entry in self._queue:
            if entry.room == room:
                self._event_count -= 1
                self._event_bytes -= entry.size
            else:
                kept.append(entry)
        self._queue = kept

    async def next_frame(self) -> Frame:
        """Wait for something to send and take all of it (up to
        ``max_frame_messages``) as one frame.  A checkpoint; raises
        :class:`OutboxClosed` once closed and drained."""
        while not self._queue and not (self._presence and not self._closed):
            if self._closed:
                raise OutboxClosed()
            await self._lot.park()
        await trio.lowlevel.checkpoint_if_cancelled()
        items: list[Frame] = []
        if self._presence and not self.shedding:
            for presence in self._presence.values():
                items.append(encode(self.codec, presence))
            self._presence.clear()
        while self._queue and len(items) < self.max_frame_messages:
            entry = self._queue.popleft()
            if entry.room is None:
                self._control_count -= 1
            else:
                self._event_count -= 1
                self._event_bytes -= entry.size
            items.append(entry.item)
        self.sent_frames += 1
        self.sent_messages += len(items)
        self._drained.unpark_all()
        return join_frame(self.codec, items)

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
        )
