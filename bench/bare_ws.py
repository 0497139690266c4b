"""A bare trio-websocket server doing the daemon's fan-out, for comparison.

    .venv/bin/python bench/bare_ws.py [--port 0] [--token TOKEN]

It speaks enough of the agor protocol (``protocols``) for ``bench/fanout.py``
to drive it exactly as it drives the daemon: ``hello``/``welcome``,
``ping``/``pong``, ``join`` (with ``since``: replay from the last 1,024
events of the room, else ``recovered: false``), ``leave``, and the calls
``sessions.create``, ``messages.create`` and ``messages.stream``, each of
which emits the daemon's event into ``session:<id>``.

The fan-out is the daemon's, without the rest of the daemon: a room assigns
the next seq, encodes each event once per codec and offers the same bytes to
every subscriber's bounded outbox (``agor_actors.daemon.Outbox`` itself,
with the daemon's default bounds: 2,000 messages, 4 MiB); one writer task
per connection takes everything queued and sends it as one frame, so events
that arrive while a write is in flight go out together.  A subscriber that
overflows is dropped from the room and told ``lagged``.

What it leaves out is what the comparison measures: hypercorn and quart,
the actors (session, room, store writer), SQLite (nothing is durable here,
a call is answered as soon as its event is offered), authorization (any
token is accepted unless ``--token`` is given) and the heartbeat check.

It listens on 127.0.0.1 only, prints ``listening on 127.0.0.1:<port>`` on
stdout once it accepts connections, and exits on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import signal
import sys
import time
import uuid
from collections import deque
from typing import Any

import trio
import trio_websocket

from agor_actors.daemon import Outbox, OutboxClosed, OutboxOverflow
from agor_actors.server import tune_gc
from protocols import (
    CallReceived,
    Codec,
    ErrorCode,
    Event,
    HelloReceived,
    JoinRequested,
    LeaveRequested,
    LocalProtocolError,
    PingReceived,
    PresenceReceived,
    ProtocolViolation,
    ServerConnection,
    Since,
    SubscriptionDropped,
    encode,
    negotiate,
)

HOST = "127.0.0.1"
RING = 1024
OUTBOX_MESSAGES = 2000
OUTBOX_BYTES = 4 * 1024 * 1024
OUTBOX_CONTROL = 1024
HEARTBEAT_MS = 15_000


class Room:
    """One room: seqs, the recent events (encoded once per codec), subscribers."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.epoch = uuid.uuid4().hex
        self.seq = 0
        self.ring: deque[tuple[int, dict[Codec, str | bytes], Event]] = deque(maxlen=RING)
        self.subscribers: dict[str, Outbox] = {}
        self.delivered = 0
        self.lagged = 0

    def publish(self, event: str, data: Any, origin: str) -> None:
        self.seq += 1
        message = Event(
            room=self.name,
            seq=self.seq,
            event=event,
            data=data,
            ts=time.time_ns() // 1_000_000,
            user_id="owner",
            origin=origin,
        )
        frames: dict[Codec, str | bytes] = {}
        self.ring.append((self.seq, frames, message))
        for key, outbox in list(self.subscribers.items()):
            frame = frames.get(outbox.codec)
            if frame is None:
                frame = frames[outbox.codec] = encode(outbox.codec, message)
            if outbox.offer_events(self.name, [(self.seq, frame)]):
                self.delivered += 1
            else:  # overflowed: its backlog is dropped and ``lagged`` queued
                self.lagged += 1
                del self.subscribers[key]

    def subscribe(self, key: str, connection: Connection, since: Since | None) -> None:
        """``joined`` and the replay (when ``since`` is in memory), then live."""
        outbox = connection.outbox
        oldest = self.ring[0][0] if self.ring else self.seq + 1
        recovered = (
            since is not None
            and since.epoch == self.epoch
            and since.seq <= self.seq
            and (since.seq + 1 >= oldest or since.seq == self.seq)
            and self.seq - since.seq <= outbox.max_messages // 2
        )
        connection.control(
            connection.machine.joined(
                self.name, epoch=self.epoch, seq=self.seq, recovered=recovered
            )
        )
        if recovered:
            assert since is not None
            items = []
            for seq, frames, message in self.ring:
                if seq > since.seq:
                    frame = frames.get(outbox.codec)
                    if frame is None:
                        frame = frames[outbox.codec] = encode(outbox.codec, message)
                    items.append((seq, frame))
            if items and not outbox.offer_events(self.name, items):
                self.lagged += 1
                return
        self.subscribers[key] = outbox


class Server:
    """The rooms and the in-memory records the calls touch."""

    def __init__(self, token: str | None) -> None:
        self.token = token
        self.rooms: dict[str, Room] = {}
        self.messages: dict[str, dict[str, Any]] = {}
        self.ids = itertools.count(1)

    def room(self, name: str) -> Room:
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(name)
        return room

    def new_id(self) -> str:
        return f"{next(self.ids):012x}-{uuid.uuid4().hex[:12]}"

    def call(self, origin: str, service: str, method: str, id: str | None, data: Any) -> Any:
        """Run a call: its result data, or raise ``LookupError`` / ``ValueError``."""
        values = data if isinstance(data, dict) else {}
        now = time.time_ns() // 1_000_000
        row: dict[str, Any] | None
        if (service, method) == ("sessions", "create"):
            row = {
                "id": self.new_id(),
                "title": values.get("title"),
                "status": "idle",
                "created_at": now,
                "updated_at": now,
                "rev": 1,
            }
            self.room(f"session:{row['id']}").publish(
                "session:created", {"session_id": row["id"], "session": row}, origin
            )
            return row
        if (service, method) == ("messages", "create"):
            session_id = values.get("session_id")
            if not isinstance(session_id, str) or f"session:{session_id}" not in self.rooms:
                raise LookupError("no such session")
            content = values.get("content", "")
            row = {
                "id": self.new_id(),
                "session_id": session_id,
                "task_id": values.get("task_id"),
                "role": values.get("role", "assistant"),
                "content": content if isinstance(content, str) else "",
                "streaming": bool(values.get("streaming", False)),
                "created_at": now,
                "updated_at": now,
                "rev": 1,
            }
            self.messages[str(row["id"])] = row
            self.room(f"session:{session_id}").publish(
                "task:message", {"task_id": row["task_id"], "message": row}, origin
            )
            return row
        if (service, method) == ("messages", "stream"):
            row = self.messages.get(id or "")
            if row is None:
                raise LookupError("no such message")
            chunk = values.get("chunk")
            if not isinstance(chunk, str) or not chunk:
                raise ValueError("chunk must be a non-empty string")
            offset = len(row["content"])
            row["content"] += chunk
            self.room(f"session:{row['session_id']}").publish(
                "task:message",
                {
                    "task_id": row["task_id"],
                    "message_id": row["id"],
                    "chunk": chunk,
                    "offset": offset,
                },
                origin,
            )
            return {"id": row["id"], "appended": len(chunk)}
        raise KeyError(f"{service}.{method}")


class Connection:
    """One WebSocket: a reader (frames into the protocol machine) and a
    writer (the outbox into the socket)."""

    ids = itertools.count(1)

    def __init__(self, server: Server, ws: trio_websocket.WebSocketConnection, codec: Codec):
        self.server = server
        self.ws = ws
        self.machine = ServerConnection(codec=codec)
        self.outbox = Outbox(
            codec,
            max_messages=OUTBOX_MESSAGES,
            max_bytes=OUTBOX_BYTES,
            max_control=OUTBOX_CONTROL,
        )
        self.id = f"bare-{next(self.ids)}"
        self.rooms: set[str] = set()
        self.close_code: int | None = None

    def control(self, frame: str | bytes | None) -> None:
        if frame is None:
            return
        try:
            self.outbox.offer_control(frame)
        except OutboxOverflow:
            self.close_code = 1008
        except OutboxClosed:
            pass

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                try:
                    await self._reader()
                finally:
                    self._leave_all()
                    self.outbox.close()
                    nursery.cancel_scope.deadline = trio.current_time() + 2.0
        finally:
            code = self.close_code or 1000
            with trio.move_on_after(2.0):
                await self.ws.aclose(code)

    async def _writer(self) -> None:
        try:
            while True:
                frame = await self.outbox.next_frame()
                await self.ws.send_message(frame)
        except (OutboxClosed, trio_websocket.ConnectionClosed):
            pass

    def closing(self) -> bool:
        return self.close_code is not None

    async def _reader(self) -> None:
        while not self.closing():
            try:
                data = await self.ws.get_message()
            except trio_websocket.ConnectionClosed:
                return
            for event in self.machine.receive_data(data, trio.current_time()):
                self._dispatch(event)
                if self.closing():
                    return

    def _dispatch(self, event: Any) -> None:
        machine = self.machine
        if isinstance(event, ProtocolViolation):
            self.control(event.reply)
            if event.close_code is not None:
                self.close_code = int(event.close_code)
        elif isinstance(event, HelloReceived):
            token = event.hello.token
            if not token or (self.server.token is not None and token != self.server.token):
                self.control(machine.close(ErrorCode.UNAUTHORIZED, "invalid token"))
                self.close_code = 4001
                return
            self.control(
                machine.welcome(connection_id=self.id, user_id="owner", heartbeat_ms=HEARTBEAT_MS)
            )
        elif isinstance(event, CallReceived):
            call = event.call
            try:
                data = self.server.call(self.id, call.service, call.method, call.id, call.data)
            except KeyError as exc:
                self.control(machine.result_error(call.ref, "unknown_method", str(exc)))
            except LookupError as exc:
                self.control(machine.result_error(call.ref, "not_found", str(exc)))
            except ValueError as exc:
                self.control(machine.result_error(call.ref, "invalid_data", str(exc)))
            else:
                self.control(machine.result(call.ref, data=data))
        elif isinstance(event, JoinRequested):
            room = event.join.room
            if not room.startswith("session:"):
                self.control(machine.left(room, "not_found"))
                return
            self.rooms.add(room)
            self.server.room(room).subscribe(self.id, self, event.join.since)
        elif isinstance(event, LeaveRequested):
            self._leave(event.room)
            self.control(machine.left(event.room))
        elif isinstance(event, SubscriptionDropped):
            self._leave(event.room)
        elif isinstance(event, PingReceived):
            self.control(machine.pong(event.ping.t))
        else:  # presence: not part of this comparison
            assert isinstance(event, PresenceReceived)

    def _leave(self, name: str) -> None:
        self.rooms.discard(name)
        room = self.server.rooms.get(name)
        if room is not None:
            room.subscribers.pop(self.id, None)
        self.outbox.drop_room(name)

    def _leave_all(self) -> None:
        for name in list(self.rooms):
            self._leave(name)
        if self.machine.state.value != "closed":
            with contextlib.suppress(LocalProtocolError):
                self.machine.connection_closed()


async def serve(
    port: int, token: str | None, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    server = Server(token)

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        codec = negotiate(request.proposed_subprotocols)
        if codec is None:
            await request.reject(400, body=b"offer agor.v1.json or agor.v1.cbor")
            return
        ws = await request.accept(subprotocol=codec.subprotocol)
        await Connection(server, ws, codec).run()

    async with trio.open_nursery() as nursery:
        listener = await nursery.start(
            lambda task_status: trio_websocket.serve_websocket(
                handler,
                HOST,
                port,
                ssl_context=None,
                max_message_size=16 << 20,
                task_status=task_status,
            )
        )
        task_status.started(listener.port)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                return


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free one)")
    parser.add_argument("--token", default=None, help="the token hello must carry (default: any)")
    args = parser.parse_args()

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve, args.port, args.token)
            tune_gc()  # the daemon's GC settings, for a like-for-like comparison
            print(f"listening on {HOST}:{port}", flush=True)

    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
