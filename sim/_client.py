"""A simulated client: the real :class:`agor_actors.client.Client` over the
simulated network, driven by the workloads and watched by the checks.

The real client does the work: it connects through the network's dialer,
reconnects with backoff drawn from its seeded entropy, pings at the
announced heartbeat and gives a silent server up, rejoins its rooms where it
left off, sends the resumes its protocol machine asks for (after a gap or a
``lagged``), applies each event once, and reloads a room when the server
answers ``recovered: false`` (through the loader given here, which also
builds this driver's model of the room).  The driver observes it
(:class:`agor_actors.client.ClientObserver`) and checks what only a client
can see: that events come gap-free and in order, and that the server never
breaks the protocol; it records writes and their answers for the checks,
and keeps a model mirror of every room it is in (``sim/_model.py``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import attrs
import trio

from agor_actors.client import REJOIN_CODES, CallError, Client, ClientObserver, Resources, connect
from agor_actors.world import SeededEntropy, VirtualWallClock
from protocols import (
    CallResult,
    ClientConnection,
    ClientEvent,
    Codec,
    ErrorInfo,
    EventApplied,
    PongReceived,
    PresenceChanged,
    ProtocolViolation,
    ReloadRequired,
    Result,
    ResumeRequested,
    RoomJoined,
    RoomLeft,
    RoomStatus,
    ServerError,
    Welcomed,
)
from protocols import Event as WireEvent

from ._config import ClientSpec
from ._det import sleep
from ._model import (
    ModelError,
    View,
    activity_view,
    apply_event,
    board_view,
    room_kind,
    session_view,
)
from ._net import Network
from ._record import Recorder, WriteRecord
from ._trace import Trace

__all__ = ["CallFailed", "NotConnected", "RoomMirror", "SimClient"]


def _appends(event: WireEvent) -> bool:
    """Whether ``event`` appends a streamed chunk."""
    return isinstance(event.data, dict) and "chunk" in event.data


CALL_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
RELOAD_RETRY_S = 0.25


class NotConnected(Exception):
    """The client has no open connection (or cannot send another call now)."""


class CallFailed(Exception):
    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


@attrs.define
class RoomMirror:
    """The client's model of one room."""

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


class _Watch(ClientObserver):
    def __init__(self, driver: SimClient) -> None:
        self._driver = driver

    def frame_received(self, frame: bytes | str) -> None:
        self._driver._frame_in(frame)

    def protocol_event(self, event: ClientEvent) -> None:
        self._driver._handle(event)


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
        self.rng = random.Random(f"{seed}/client/{spec.name}/workload")
        self._entropy = SeededEntropy(f"{seed}/client/{spec.name}/client")
        self._wall = VirtualWallClock(skew_ms=spec.skew_ms)
        self._hlc: tuple[int, int] = (0, 0)
        self.client: Client | None = None
        """The real client (once :meth:`run` started)."""
        self.mirrors: dict[str, RoomMirror] = {}
        self.wanted: dict[str, None] = {}
        self._nursery: trio.Nursery | None = None
        self._writes = 0
        self.presence_frames = 0
        self.presence_board: str | None = None
        """The board this client looks at: announced after every welcome."""
        self.facepiles: dict[str, dict[str, Any]] = {}
        """Per board: the last facepile received (user id -> entry)."""
        self.on_frame: Callable[[str, ClientConnection, bytes | str], None] | None = None
        """Also shown every frame received (the access workload's watch)."""

    # ------------------------------------------------------------------ state

    @property
    def is_open(self) -> bool:
        return self.client is not None and self.client.connected

    @property
    def machine(self) -> ClientConnection:
        """The real client's protocol machine (its rooms' tracks)."""
        assert self.client is not None
        return self.client.machine

    @property
    def connection_id(self) -> str | None:
        return None if self.client is None else self.client.connection_id

    @property
    def pending_calls(self) -> bool:
        return self.client is not None and self.client.statistics().pending_calls > 0

    def backoff_state(self) -> object:
        return self._entropy.rng.getstate()

    def stall(self, until_us: int) -> None:
        """Stop reading until ``until_us`` (a frozen tab, a slow consumer)."""
        self._net.stall(self.name, until_us)

    def converged_rooms(self) -> dict[str, str]:
        """Rooms wanted but not (yet) in a checkable state, with why."""
        out: dict[str, str] = {}
        rooms = {} if self.client is None else self.client.machine.rooms
        for room in self.wanted:
            track = rooms.get(room)
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
        async with (
            trio.open_nursery() as nursery,
            connect(
                "ws://sim/ws",
                token=self._token,
                codec=self.codec,
                client_id=self.name,
                entropy=self._entropy,
                wall=self._wall,
                connect_timeout_s=CONNECT_TIMEOUT_S,
                call_timeout_s=CALL_TIMEOUT_S,
                backoff_base_s=0.5,
                backoff_cap_s=30.0,
                loader=self._load_room,
                read_retries=0,
                idempotent_writes=self.spec.keyed,
                write_retries=2,
                dialer=self._net.dialer(self.name),
                observer=_Watch(self),
                retry_first=True,
            ) as client,
        ):
            self._nursery = nursery
            self.client = client
            for room in self.wanted:
                nursery.start_soon(self._join, room)
            if self.presence_board is not None:
                nursery.start_soon(self._announce, self.presence_board)
            task_status.started()
            await trio.sleep_forever()

    # ------------------------------------------------------------------ observing

    def _frame_in(self, frame: bytes | str) -> None:
        assert self.client is not None
        self._recorder.frame_in(self.name, self.client.machine, frame)
        if self.on_frame is not None:
            self.on_frame(self.name, self.client.machine, frame)

    def _handle(self, event: ClientEvent) -> None:
        if isinstance(event, EventApplied):
            self._on_applied(event.event)
        elif isinstance(event, CallResult):
            pass  # answered to the caller (see :meth:`write`)
        elif isinstance(event, RoomJoined):
            self._on_joined(event)
        elif isinstance(event, ReloadRequired):
            self._on_reload(event)
        elif isinstance(event, ResumeRequested):
            self._on_resume(event)
        elif isinstance(event, Welcomed):
            self._trace.emit("welcome", f"{self.name} as {event.welcome.connection_id}")
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
                        + " ".join(f"{u[-4:]}:{e.get('status')}" for u, e in sorted(pile.items())),
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
        """The real client reloads the room next, through :meth:`_load_room`."""
        mirror = self.mirrors.setdefault(event.room, RoomMirror(event.room))
        mirror.generation += 1
        mirror.reloading = True
        mirror.buffer.clear()
        mirror.view = None
        mirror.expected_next = event.seq + 1
        mirror.just_recovered = False
        mirror.reloads += 1

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

    def _on_left(self, event: RoomLeft) -> None:
        self._trace.emit("left", f"{self.name} {event.room} {event.reason}")
        kind, ident = room_kind(event.room)
        if kind == "board":
            self.facepiles.pop(ident, None)
        if event.reason in REJOIN_CODES and event.room in self.wanted:
            # the real client keeps the room's mirror and joins it again
            # after a backoff, from where the mirror stands
            self._recorder.count(f"left:{event.reason}")
            return
        self.mirrors.pop(event.room, None)
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
        assert self.client is not None
        track = self.client.machine.rooms.get(room)
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

    async def _load_room(self, client: Client, room: str) -> Resources:
        """The real client's loader: loads this driver's model of ``room``
        (retrying until it can), installs it and applies the events that
        arrived meanwhile.  The real client's mirror gets no resources: the
        simulator checks its own model."""
        mirror = self.mirrors.get(room)
        generation = mirror.generation if mirror is not None else 0
        while True:
            mirror = self.mirrors.get(room)
            if mirror is None or mirror.generation != generation:
                return {}
            try:
                view = await self._load(client, room)
            except CallFailed as exc:
                self._trace.emit("reload", f"{self.name} {room} failed: {exc}")
                await sleep(RELOAD_RETRY_S)
                continue
            mirror = self.mirrors.get(room)
            if mirror is None or mirror.generation != generation:
                return {}
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
            return {}

    async def _load(self, client: Client, room: str) -> View:
        kind, ident = room_kind(room)
        if kind == "activity":
            newest = await self._read(
                client, "activity", "find", query={"board_id": ident, "$limit": 1}
            )
            entries = newest["data"]
            return activity_view(entries[0] if entries else None)
        if kind == "session":
            session = await self._get(client, "sessions", ident)
            tasks = await self._find_all(client, "tasks", {"session_id": ident})
            messages = await self._find_all(client, "messages", {"session_id": ident})
            return session_view(session, tasks, messages)
        board = await self._get(client, "boards", ident)
        sessions = await self._find_all(client, "sessions", {"board_id": ident})
        return board_view(board, sessions)

    async def _read(self, client: Client, service: str, method: str, **kw: Any) -> Any:
        try:
            return await client.call(service, method, **kw)
        except CallError as exc:
            raise CallFailed(exc.code, exc.message) from None
        except trio.TooSlowError:
            raise CallFailed("timeout", "no answer in time") from None

    async def _get(self, client: Client, service: str, ident: str) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = await self._read(client, service, "get", id=ident)
        except CallFailed as exc:
            if exc.code == "not_found":
                return None
            raise
        return data

    async def _find_all(
        self, client: Client, service: str, query: dict[str, Any]
    ) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            page_query = {**query, "$limit": 500}
            if cursor is not None:
                page_query["$cursor"] = cursor
            page = await self._read(client, service, "find", query=page_query)
            rows.extend(page["data"])
            cursor = page.get("next_cursor")
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
        base_rev: int | None = None,
    ) -> Result:
        """One call through the real client; its result (an error result
        ``timeout`` if none came within :data:`CALL_TIMEOUT_S`, and
        ``connection_lost`` if the connection dropped meanwhile: the call
        may have run).  Raises :class:`NotConnected` if not connected now."""
        client = self.client
        if client is None or not client.connected:
            raise NotConnected(self.name)
        try:
            value = await client.call(
                service, method, id=id, data=data, query=query, temp_id=wid, base_rev=base_rev
            )
        except CallError as exc:
            return Result(0, False, error=ErrorInfo(exc.code, exc.message, exc.data))
        except trio.TooSlowError:
            return Result(0, False, error=ErrorInfo("timeout", "no answer in time"))
        return Result(0, True, value)

    def stream_progress(
        self, message_id: str, chunks: list[str], landed: int, *, resent: int = 0
    ) -> None:
        """A :class:`~agor_actors.client.MessageWriter` streaming
        ``chunks`` saw the first ``landed`` of them land, after sending
        ``resent`` more of them again (for the checks and the counters)."""
        self._recorder.exact_streams[message_id] = (chunks, landed)
        if resent:
            self._recorder.count("chunks_resent", resent)

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
        connection_id = self.connection_id
        if not self.is_open or connection_id is None:
            raise NotConnected(self.name)
        self._writes += 1
        wid = f"{self.name}-{self._writes}"
        query: dict[str, Any] | None = None
        stamp: tuple[int, int, str] | None = None
        if stamped:
            wall, counter = self.next_stamp()
            query = {"hlc": [wall, counter]}
            stamp = (wall, counter, f"{self.user_id}:{connection_id}")
        record = WriteRecord(wid, self.name, service, method, id, session_id, data, stamp)
        self._recorder.write_sent(record)
        self._trace.emit("write", f"{wid} {service}.{method} {id or ''}")
        result = await self.call(
            service, method, id=id, data=data, query=query, wid=wid, base_rev=base_rev
        )
        error = result.error
        self._recorder.write_answered(
            wid,
            result.ok,
            result.data,
            None if error is None else error.code,
            None if error is None else error.data,
        )
        return record

    # ------------------------------------------------------------------ rooms

    def want(self, room: str) -> None:
        """Be in ``room`` (joined as soon as connected)."""
        if room in self.wanted:
            return
        self.wanted[room] = None
        if self._nursery is not None:
            self._nursery.start_soon(self._join, room)

    async def _join(self, room: str) -> None:
        assert self.client is not None
        try:
            await self.client.join(room)
        except CallError as exc:
            self._trace.emit("refused", f"{self.name} join {room}: {exc}")
        except trio.TooSlowError:
            pass  # still joining: the real client keeps at it

    def unwant(self, room: str) -> None:
        if room not in self.wanted:
            return
        del self.wanted[room]
        if self._nursery is not None:
            self._nursery.start_soon(self._leave, room)

    async def _leave(self, room: str) -> None:
        assert self.client is not None
        try:
            await self.client.leave(room)
        except (CallError, trio.TooSlowError) as exc:
            self._trace.emit("refused", f"{self.name} leave {room}: {exc!r}")

    def announce(self, board: str | None) -> None:
        """Look at ``board`` (None: at no board) and tell the server."""
        self.presence_board = board
        if self._nursery is not None:
            self._nursery.start_soon(self._announce, board)
        self._trace.emit(
            "presence", f"{self.name} at board {board} {'sent' if self.is_open else 'later'}"
        )

    async def _announce(self, board: str | None) -> None:
        assert self.client is not None
        try:
            await self.client.set_presence(board or "")
        except CallError as exc:
            self._trace.emit("refused", f"{self.name} presence: {exc}")

    def move_cursor(self, board: str, x: float, y: float) -> None:
        """The cursor moved (sent throttled by the real client, newest last)."""
        if self.client is not None:
            self.client.cursor_sender(board).move(x, y)
