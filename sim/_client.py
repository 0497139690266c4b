"""A simulated client: the protocol's :class:`~protocols.ClientConnection`
over a simulated link, with a mirror of every room it is in.

It behaves like a real client: it reconnects with the protocol's backoff,
pings at the announced heartbeat and gives a silent server up, rejoins its
rooms where it left off, sends the resumes the machine asks for, applies each
event the machine hands it once, and reloads a room through ``get`` and
``find`` when the server answers ``recovered: false``.  On the way it checks
what only a client can see: that events come gap-free and in order, and that
the server never breaks the protocol.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any

import attrs
import trio

from agor_actors.world import TransportClosed, VirtualWallClock
from protocols import (
    CallResult,
    ClientConnection,
    ClientEvent,
    ClientState,
    Codec,
    ErrorInfo,
    EventApplied,
    Heartbeat,
    HeartbeatAction,
    Join,
    Leave,
    LocalProtocolError,
    PongReceived,
    PresenceChanged,
    PresenceUpdate,
    ProtocolViolation,
    ReloadRequired,
    Result,
    ResumeRequested,
    RoomJoined,
    RoomLeft,
    RoomStatus,
    ServerError,
    Welcomed,
    backoff_s,
)
from protocols import Event as WireEvent

from ._config import ClientSpec
from ._model import (
    ModelError,
    View,
    activity_view,
    apply_event,
    board_view,
    room_kind,
    session_view,
)
from ._net import ClientSide, Network
from ._record import Recorder, WriteRecord
from ._trace import Trace, reached

__all__ = ["CallFailed", "NotConnected", "RoomMirror", "SimClient"]


def _appends(event: WireEvent) -> bool:
    """Whether ``event`` appends a streamed chunk."""
    return isinstance(event.data, dict) and "chunk" in event.data


SEND_QUEUE_MAX = 512
HELLO_TIMEOUT_S = 10.0


class NotConnected(Exception):
    """The client has no open connection (or cannot send another call now)."""


class CallFailed(Exception):
    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


@attrs.define(eq=False)
class _Slot:
    done: trio.Event = attrs.field(factory=trio.Event)
    result: Result | None = None
    wid: str | None = None


@attrs.define
class RoomMirror:
    """The client's copy of one room."""

    room: str
    view: View | None = None
    reloading: bool = False
    generation: int = 0
    buffer: list[WireEvent] = attrs.field(factory=list)
    expected_next: int | None = None
    """The seq the next applied event must have (None until joined)."""
    just_recovered: bool = False
    """A ``recovered: true`` join was answered and no event applied since."""
    reloads: int = 0


class SimClient:
    def __init__(
        self,
        spec: ClientSpec,
        *,
        seed: int,
        token: str,
        user_id: str,
        net: Network,
        trace: Trace,
        recorder: Recorder,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.user_id = user_id
        self._token = token
        self._net = net
        self._trace = trace
        self._recorder = recorder
        self.codec = Codec.CBOR if spec.cbor else Codec.JSON
        self.machine = ClientConnection(codec=self.codec, client_id=spec.name)
        self.rng = random.Random(f"{seed}/client/{spec.name}/workload")
        self._backoff_rng = random.Random(f"{seed}/client/{spec.name}/backoff")
        self._wall = VirtualWallClock(skew_ms=spec.skew_ms)
        self._hlc: tuple[int, int] = (0, 0)
        self.mirrors: dict[str, RoomMirror] = {}
        self.wanted: dict[str, None] = {}
        self.connection_id: str | None = None
        self._slots: dict[int, _Slot] = {}
        self._outq: deque[bytes | str] = deque()
        self._out_lot = trio.lowlevel.ParkingLot()
        self._welcomed = False
        self._open_lot = trio.lowlevel.ParkingLot()
        self._heartbeat_policy = Heartbeat()
        self._conn_scope: trio.CancelScope | None = None
        self._sock: ClientSide | None = None
        self._stall_until_us = 0
        self._stall_lot = trio.lowlevel.ParkingLot()
        self._nursery: trio.Nursery | None = None
        self._writes = 0
        self.connections = 0
        self.presence_frames = 0
        self.presence_board: str | None = None
        """The board this client looks at: announced after every welcome."""
        self.facepiles: dict[str, dict[str, Any]] = {}
        """Per board: the last facepile received (user id -> entry)."""

    # ------------------------------------------------------------------ state

    @property
    def is_open(self) -> bool:
        return self.machine.state is ClientState.OPEN and self._welcomed

    async def wait_open(self) -> None:
        await trio.lowlevel.checkpoint()
        while not self.is_open:
            await self._open_lot.park()

    @property
    def send_queue_depth(self) -> int:
        return len(self._outq)

    @property
    def pending_calls(self) -> bool:
        return bool(self._slots)

    def backoff_state(self) -> object:
        return self._backoff_rng.getstate()

    def stall(self, until_us: int) -> None:
        """Stop reading until ``until_us`` (a frozen tab, a slow consumer)."""
        self._stall_until_us = max(self._stall_until_us, until_us)
        self._trace.emit("stall", f"{self.name} until {until_us / 1e6:.3f}s")

    def unstall(self) -> None:
        self._stall_until_us = 0
        self._stall_lot.unpark_all()

    def converged_rooms(self) -> dict[str, str]:
        """Rooms wanted but not (yet) in a checkable state, with why."""
        out: dict[str, str] = {}
        for room in self.wanted:
            track = self.machine.rooms.get(room)
            mirror = self.mirrors.get(room)
            if track is None:
                out[room] = "not joined"
            elif track.status is not RoomStatus.LIVE:
                out[room] = f"room {track.status.value}"
            elif mirror is None or mirror.view is None or mirror.reloading:
                out[room] = "reloading"
        return out

    # ------------------------------------------------------------------ run

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            attempt = 0
            while True:
                try:
                    sock = await self._net.connect(self.name, self.codec)
                except TransportClosed:
                    welcomed = False
                else:
                    welcomed = await self._connection(sock)
                attempt = 0 if welcomed else attempt + 1
                delay = backoff_s(attempt, self._backoff_rng.random())
                await trio.sleep(round(delay * 1_000_000) / 1_000_000)

    async def _connection(self, sock: ClientSide) -> bool:
        self.connections += 1
        self._sock = sock
        self._outq.clear()
        self._welcomed = False
        welcomed = False
        try:
            self._enqueue(self.machine.hello(self._token))
            async with trio.open_nursery() as nursery:
                self._conn_scope = nursery.cancel_scope
                nursery.start_soon(self._writer, sock)
                nursery.start_soon(self._reader, sock)
                nursery.start_soon(self._heartbeat, sock)
        finally:
            welcomed = self._welcomed
            self._welcomed = False
            self._conn_scope = None
            self._sock = None
            self.connection_id = None
            sock.abort(f"{self.name} closed")
            self._handle(self.machine.connection_lost())
            self._trace.emit("lost", f"{self.name} conn {sock.conn.name}")
        return welcomed

    def _drop(self, sock: ClientSide, why: str) -> None:
        self._trace.emit("drop", f"{self.name} {why}")
        sock.abort(why)
        if self._conn_scope is not None:
            self._conn_scope.cancel()

    def _enqueue(self, frame: bytes | str) -> None:
        if len(self._outq) >= SEND_QUEUE_MAX:
            # named overflow policy: a client that cannot send drops the connection
            self._recorder.count("client_send_overflow")
            if self._sock is not None:
                self._drop(self._sock, "send queue full")
            return
        self._outq.append(frame)
        self._out_lot.unpark()

    async def _writer(self, sock: ClientSide) -> None:
        while True:
            while not self._outq:
                await self._out_lot.park()
            frame = self._outq.popleft()
            try:
                await sock.send(frame)
            except TransportClosed:
                self._drop(sock, "send failed")
                return

    async def _reader(self, sock: ClientSide) -> None:
        while True:
            while not reached(self._stall_until_us):
                with trio.move_on_at(self._stall_until_us / 1_000_000):
                    await self._stall_lot.park()
            try:
                frame = await sock.receive()
            except TransportClosed as exc:
                self._trace.emit("closed", f"{self.name} {exc.code} {exc.reason}")
                self._drop(sock, f"closed {exc.code}")
                return
            self._recorder.frame_in(self.name, self.machine, frame)
            events = self.machine.receive_data(frame, trio.current_time())
            self._handle(events)

    async def _heartbeat(self, sock: ClientSide) -> None:
        opened_s = trio.current_time()
        with trio.move_on_after(HELLO_TIMEOUT_S):
            while not self._welcomed:
                await self._open_lot.park()
        if not self._welcomed:
            self._drop(sock, "no welcome")
            return
        welcomed_s = trio.current_time()
        heartbeat = self._heartbeat_policy
        while True:
            last_received = self.machine.last_received_s or opened_s
            last_ping = self.machine.last_ping_s or welcomed_s
            action = heartbeat.decide(
                trio.current_time(), last_received_s=last_received, last_ping_s=last_ping
            )
            if action is HeartbeatAction.DEAD:
                self._drop(sock, "heartbeat timeout")
                return
            if action is HeartbeatAction.PING:
                self._enqueue(self.machine.ping(trio.current_time()))
                continue
            wake_s = heartbeat.next_check_s(last_received_s=last_received, last_ping_s=last_ping)
            # ``decide`` computes ``now - last >= interval`` while ``next_check_s``
            # computes ``last + interval``: at that instant float rounding can
            # still say WAIT, which would spin forever on a mock clock.
            await trio.sleep_until(max(wake_s, trio.current_time() + 1e-6))

    # ------------------------------------------------------------------ events

    def _handle(self, events: list[ClientEvent]) -> None:
        for event in events:
            if isinstance(event, EventApplied):
                self._on_applied(event.event)
            elif isinstance(event, CallResult):
                self._on_result(event.result)
            elif isinstance(event, RoomJoined):
                self._on_joined(event)
            elif isinstance(event, ReloadRequired):
                self._on_reload(event)
            elif isinstance(event, ResumeRequested):
                self._on_resume(event)
            elif isinstance(event, Welcomed):
                self._on_welcome(event)
            elif isinstance(event, RoomLeft):
                self._on_left(event)
            elif isinstance(event, PresenceChanged):
                self.presence_frames += 1
                users = event.presence.users
                if users is not None:
                    pile = {str(u["user_id"]): u for u in users}
                    if pile != self.facepiles.get(event.presence.board):
                        self._trace.emit(
                            "facepile",
                            f"{self.name} {event.presence.board}: "
                            + " ".join(
                                f"{u[-4:]}:{e.get('status')}" for u, e in sorted(pile.items())
                            ),
                        )
                    self.facepiles[event.presence.board] = pile
            elif isinstance(event, PongReceived):
                pass
            elif isinstance(event, ServerError):
                self._recorder.count(f"server_error:{event.error.code}")
                self._trace.emit("error", f"{self.name} {event.error.code} {event.error.message}")
            else:
                assert isinstance(event, ProtocolViolation)
                self._recorder.violate(
                    "protocol", self.name, f"the server broke the protocol: {event.error}"
                )
                if event.close_code is not None and self._sock is not None:
                    self._drop(self._sock, f"protocol violation {event.close_code}")

    def _on_welcome(self, event: Welcomed) -> None:
        self.connection_id = event.welcome.connection_id
        self._heartbeat_policy = Heartbeat.from_heartbeat_ms(event.welcome.heartbeat_ms)
        self._trace.emit("welcome", f"{self.name} as {self.connection_id}")
        leaves = [
            Leave(room)
            for room, track in self.machine.rooms.items()
            if track.status is RoomStatus.DETACHED and room not in self.wanted
        ]
        joins: list[Join | Leave] = [*leaves, *self.machine.rejoin_all()]
        joins += [Join(room) for room in self.wanted if room not in self.machine.rooms]
        batch = self.machine.server_limits.max_batch
        for i in range(0, len(joins), batch):
            self._send(joins[i : i + batch])
        self._welcomed = True
        self._open_lot.unpark_all()
        if self.presence_board is not None:
            self.presence(PresenceUpdate(board=self.presence_board))

    def _send(self, messages: list[Join | Leave]) -> None:
        try:
            self._enqueue(self.machine.send(messages))
        except LocalProtocolError as exc:
            self._recorder.count("client_refused_send")
            self._trace.emit("refused", f"{self.name} {exc}")

    def _on_result(self, result: Result) -> None:
        slot = self._slots.pop(result.ref, None)
        if slot is None:
            return
        slot.result = result
        if slot.wid is not None:
            code = result.error.code if result.error is not None else None
            self._recorder.write_answered(slot.wid, result.ok, result.data, code)
        slot.done.set()

    def _on_joined(self, event: RoomJoined) -> None:
        mirror = self.mirrors.setdefault(event.room, RoomMirror(event.room))
        self._trace.emit(
            "joined",
            f"{self.name} {event.room} seq {event.seq} "
            f"{'recovered' if event.recovered else 'reload'}",
        )
        if event.recovered:
            if mirror.expected_next is not None and mirror.expected_next != event.seq + 1:
                self._recorder.violate(
                    "order",
                    self.name,
                    f"{event.room}: recovered at seq {event.seq} but the mirror stands at "
                    f"{mirror.expected_next - 1}",
                )
            mirror.just_recovered = True

    def _on_reload(self, event: ReloadRequired) -> None:
        mirror = self.mirrors.setdefault(event.room, RoomMirror(event.room))
        mirror.generation += 1
        mirror.reloading = True
        mirror.buffer.clear()
        mirror.view = None
        mirror.expected_next = event.seq + 1
        mirror.just_recovered = False
        mirror.reloads += 1
        if self._nursery is not None:
            self._nursery.start_soon(self._reload, event.room, mirror.generation)

    def _on_resume(self, event: ResumeRequested) -> None:
        room = event.join.room
        mirror = self.mirrors.get(room)
        if event.reason in ("gap", "overlap"):
            kind = "replay" if mirror is not None and mirror.just_recovered else "gap"
            self._recorder.violate(
                kind,
                self.name,
                f"{room}: {event.reason} on a live subscription after seq "
                f"{None if mirror is None or mirror.expected_next is None else mirror.expected_next - 1}",
            )
        self._trace.emit("resume", f"{self.name} {room} {event.reason} since {event.join.since}")
        self._enqueue(event.data)

    def _on_left(self, event: RoomLeft) -> None:
        self._trace.emit("left", f"{self.name} {event.room} {event.reason}")
        self.mirrors.pop(event.room, None)
        kind, ident = room_kind(event.room)
        if kind == "board":
            self.facepiles.pop(ident, None)
        if event.reason not in ("left", "connection_lost"):
            self._recorder.count(f"left:{event.reason}")
            self.wanted.pop(event.room, None)

    def _on_applied(self, event: WireEvent) -> None:
        room = event.room
        mirror = self.mirrors.get(room)
        if mirror is None:
            self._recorder.violate("order", self.name, f"{room}: event seq {event.seq} unasked")
            return
        if mirror.expected_next is not None and event.seq != mirror.expected_next:
            self._recorder.violate(
                "order",
                self.name,
                f"{room}: applied seq {event.seq}..{event.end_seq} where "
                f"{mirror.expected_next} was next",
            )
        mirror.expected_next = event.end_seq + 1
        mirror.just_recovered = False
        track = self.machine.rooms.get(room)
        epoch = track.epoch if track is not None and track.epoch is not None else ""
        self._recorder.applied_event(self.name, room, event, epoch)
        self._trace.emit("apply", f"{self.name} {room} {event.seq}-{event.end_seq} {event.event}")
        if mirror.reloading:
            mirror.buffer.append(event)
            return
        if mirror.view is None:
            self._recorder.violate("order", self.name, f"{room}: event before the room was loaded")
            return
        self._apply(mirror, event)

    def _apply(self, mirror: RoomMirror, event: WireEvent) -> None:
        assert mirror.view is not None
        try:
            apply_event(mirror.view, mirror.room, event)
        except (ModelError, KeyError, TypeError) as exc:
            self._recorder.violate(
                "model", self.name, f"{mirror.room}: cannot apply seq {event.seq}: {exc!r}"
            )

    # ------------------------------------------------------------------ reloads

    async def _reload(self, room: str, generation: int) -> None:
        while True:
            mirror = self.mirrors.get(room)
            if mirror is None or mirror.generation != generation:
                return
            await self.wait_open()
            try:
                view = await self._load(room)
            except (CallFailed, NotConnected) as exc:
                self._trace.emit("reload", f"{self.name} {room} failed: {exc}")
                await trio.sleep(0.25)
                continue
            mirror = self.mirrors.get(room)
            if mirror is None or mirror.generation != generation:
                return
            mirror.view = view
            mirror.reloading = False
            buffered, mirror.buffer = mirror.buffer, []
            self._trace.emit("reload", f"{self.name} {room} loaded, {len(buffered)} buffered")
            for event in buffered:
                self._apply(mirror, event)
            if any(_appends(event) for event in buffered):
                # the load may already hold some of these chunks: their
                # offsets say so (the mirror applies each chunk once)
                self._recorder.count("chunks_during_reload")
            return

    async def _load(self, room: str) -> View:
        kind, ident = room_kind(room)
        if kind == "activity":
            newest = await self.call("activity", "find", query={"board_id": ident, "$limit": 1})
            if not newest.ok:
                assert newest.error is not None
                raise CallFailed(newest.error.code, newest.error.message)
            entries = newest.data["data"]
            return activity_view(entries[0] if entries else None)
        if kind == "session":
            session = await self._get("sessions", ident)
            tasks = await self._find_all("tasks", {"session_id": ident})
            messages = await self._find_all("messages", {"session_id": ident})
            return session_view(session, tasks, messages)
        board = await self._get("boards", ident)
        sessions = await self._find_all("sessions", {"board_id": ident})
        return board_view(board, sessions)

    async def _get(self, service: str, ident: str) -> dict[str, Any] | None:
        result = await self.call(service, "get", id=ident)
        if result.ok:
            data: dict[str, Any] = result.data
            return data
        assert result.error is not None
        if result.error.code == "not_found":
            return None
        raise CallFailed(result.error.code, result.error.message)

    async def _find_all(self, service: str, query: dict[str, Any]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            page_query = {**query, "$limit": 500}
            if cursor is not None:
                page_query["$cursor"] = cursor
            result = await self.call(service, "find", query=page_query)
            if not result.ok:
                assert result.error is not None
                raise CallFailed(result.error.code, result.error.message)
            rows.extend(result.data["data"])
            cursor = result.data.get("next_cursor")
            if cursor is None:
                return rows

    # ------------------------------------------------------------------ calls

    async def call(
        self,
        service: str,
        method: str,
        *,
        id: str | None = None,
        data: Any = None,
        query: dict[str, Any] | None = None,
        wid: str | None = None,
        timeout_s: float = 30.0,
        base_rev: int | None = None,
    ) -> Result:
        """One call; its result (an error result ``timeout`` if none came in
        time: the call may still be answered later, and is recorded then).
        Raises :class:`NotConnected` if it cannot be sent now."""
        if not self.is_open:
            raise NotConnected(self.name)
        try:
            ref, frame = self.machine.call(
                service, method, id=id, data=data, query=query, temp_id=wid, base_rev=base_rev
            )
        except LocalProtocolError as exc:
            raise NotConnected(str(exc)) from None
        slot = _Slot(wid=wid)
        self._slots[ref] = slot
        self._enqueue(frame)
        with trio.move_on_after(timeout_s):
            await slot.done.wait()
        if slot.result is None:
            return Result(ref, False, error=ErrorInfo("timeout", "no answer in time"))
        return slot.result

    def next_stamp(self) -> tuple[int, int]:
        """A hybrid logical clock stamp from this client's (skewed) clock."""
        wall = self._wall.now_ms()
        last_wall, counter = self._hlc
        self._hlc = (wall, 0) if wall > last_wall else (last_wall, counter + 1)
        return self._hlc

    async def write(
        self,
        service: str,
        method: str,
        *,
        session_id: str | None,
        id: str | None = None,
        data: Any = None,
        stamped: bool = False,
        base_rev: int | None = None,
    ) -> WriteRecord:
        """A write, recorded for the invariants.  Raises :class:`NotConnected`."""
        if not self.is_open or self.connection_id is None:
            raise NotConnected(self.name)
        self._writes += 1
        wid = f"{self.name}-{self._writes}"
        query: dict[str, Any] | None = None
        stamp: tuple[int, int, str] | None = None
        if stamped:
            wall, counter = self.next_stamp()
            query = {"hlc": [wall, counter]}
            stamp = (wall, counter, f"{self.user_id}:{self.connection_id}")
        record = WriteRecord(wid, self.name, service, method, id, session_id, data, stamp)
        self._recorder.write_sent(record)
        self._trace.emit("write", f"{wid} {service}.{method} {id or ''}")
        result = await self.call(
            service, method, id=id, data=data, query=query, wid=wid, base_rev=base_rev
        )
        if result.error is not None and result.error.code == "timeout":
            record.outcome = "unknown" if record.outcome == "pending" else record.outcome
        return record

    # ------------------------------------------------------------------ rooms

    def want(self, room: str) -> None:
        """Be in ``room`` (joined now if connected, else on the next welcome)."""
        if room in self.wanted:
            return
        self.wanted[room] = None
        if self.is_open:
            track = self.machine.rooms.get(room)
            if track is None or track.status in (RoomStatus.LEAVING, RoomStatus.DETACHED):
                self._send([Join(room, None if track is None else track.since)])

    def unwant(self, room: str) -> None:
        if room not in self.wanted:
            return
        del self.wanted[room]
        track = self.machine.rooms.get(room)
        if self.is_open and track is not None and track.status is not RoomStatus.LEAVING:
            self._send([Leave(room)])

    def announce(self, board: str | None) -> None:
        """Look at ``board`` (None: at no board) and tell the server."""
        self.presence_board = board
        sent = self.presence(PresenceUpdate(board=board or ""))
        self._trace.emit("presence", f"{self.name} at board {board} {'sent' if sent else 'later'}")

    def presence(self, update: PresenceUpdate) -> bool:
        if not self.is_open:
            return False
        try:
            self._enqueue(self.machine.presence(update))
        except LocalProtocolError:
            return False
        return True
