"""Test helpers: a client machine and a server machine wired back to back.

* :class:`ConnectionPair` (after h11's ``tests/helpers.py``): frames go from
  one machine to the other through plain calls; time is a number.
* :class:`MiniDaemon` plays the daemon's part for the server machine (rooms
  with a log, joins with replay, lagged, epoch resets) and :class:`SyncWorld`
  puts a client, a daemon, two in-flight queues with faults and an app mirror
  together, to check that every room event is applied once, in order.
"""

from __future__ import annotations

import random
from typing import Any

import attrs

from protocols import (
    CallReceived,
    ClientConnection,
    ClientEvent,
    ClientState,
    Codec,
    EventApplied,
    Frame,
    HelloReceived,
    JoinRequested,
    Lagged,
    LeaveRequested,
    Limits,
    PingReceived,
    PresenceReceived,
    ProtocolViolation,
    ReloadRequired,
    ResumeRequested,
    RoomJoined,
    RoomLeft,
    ServerConnection,
    ServerEvent,
    SubscriptionDropped,
    Welcomed,
    prepare_batch,
)
from protocols import Event as RoomEvent

DEFAULT = Limits()


class ConnectionPair:
    def __init__(
        self,
        codec: Codec = Codec.JSON,
        *,
        limits: Limits = DEFAULT,
        client: ClientConnection | None = None,
    ) -> None:
        self.codec = codec
        self.limits = limits
        self.client = client or ClientConnection(codec=codec, client_id="client-1")
        self.server = ServerConnection(codec=codec, limits=limits)
        self.now = 0.0

    def to_server(self, frame: Frame) -> list[ServerEvent]:
        return self.server.receive_data(frame, self.now)

    def to_client(self, frame: Frame) -> list[ClientEvent]:
        return self.client.receive_data(frame, self.now)

    def handshake(self, token: str = "token") -> None:
        events = self.to_server(self.client.hello(token))
        assert len(events) == 1 and isinstance(events[0], HelloReceived)
        assert events[0].hello.token == token
        welcome = self.server.welcome(connection_id="conn-1", user_id="user-1", heartbeat_ms=15000)
        client_events = self.to_client(welcome)
        assert len(client_events) == 1 and isinstance(client_events[0], Welcomed)

    def reconnect(self, token: str = "token") -> list[ClientEvent]:
        """Drop the connection and open a new one (the client machine stays)."""
        lost = self.client.connection_lost()
        self.server.connection_closed()
        self.server = ServerConnection(codec=self.codec, limits=self.limits)
        self.handshake(token)
        return lost


@attrs.define
class RoomLog:
    epoch: str
    events: list[RoomEvent] = attrs.Factory(list)
    retained_from: int = 1
    """Events before this seq can no longer be replayed."""

    @property
    def head(self) -> int:
        return len(self.events)


@attrs.define
class Outgoing:
    frame: Frame
    room: str | None = None
    first_seq: int | None = None


class MiniDaemon:
    """The daemon's side of one client, reduced to what the protocol needs."""

    def __init__(self, codec: Codec, rng: random.Random, *, merge_probability: float = 0.0):
        self.codec = codec
        self.rng = rng
        self.merge_probability = merge_probability
        self.rooms: dict[str, RoomLog] = {}
        self.server = ServerConnection(codec=codec)
        self.outbox: list[Outgoing] = []
        self.lagging: set[str] = set()
        self.epochs = 0
        self.connections = 0

    def new_connection(self) -> None:
        self.server.connection_closed()
        self.server = ServerConnection(codec=self.codec)
        self.outbox.clear()
        self.lagging.clear()
        self.connections += 1

    def room(self, name: str) -> RoomLog:
        if name not in self.rooms:
            self.epochs += 1
            self.rooms[name] = RoomLog(epoch=f"e{self.epochs}")
        return self.rooms[name]

    def receive(self, frame: Frame, now: float) -> list[ServerEvent]:
        events = self.server.receive_data(frame, now)
        for event in events:
            self.handle(event)
        return events

    def handle(self, event: ServerEvent) -> None:
        server = self.server
        if isinstance(event, HelloReceived):
            self.outbox.append(
                Outgoing(
                    server.welcome(
                        connection_id=f"conn-{self.connections}", user_id="u1", heartbeat_ms=15000
                    )
                )
            )
        elif isinstance(event, JoinRequested):
            self.join(event)
        elif isinstance(event, LeaveRequested):
            self.lagging.discard(event.room)
            self.outbox.append(Outgoing(server.left(event.room)))
        elif isinstance(event, CallReceived):
            self.outbox.append(
                Outgoing(server.result(event.call.ref, data={"echo": event.call.data}))
            )
        elif isinstance(event, PingReceived):
            self.outbox.append(Outgoing(server.pong(event.ping.t)))
        elif isinstance(event, ProtocolViolation):
            if event.reply is not None:
                self.outbox.append(Outgoing(event.reply))
        elif isinstance(event, SubscriptionDropped):
            self.lagging.discard(event.room)
        else:
            assert isinstance(event, PresenceReceived)

    def join(self, event: JoinRequested) -> None:
        name = event.join.room
        log = self.room(name)
        since = event.join.since
        self.lagging.discard(name)
        recoverable = (
            since is not None
            and since.epoch == log.epoch
            and log.retained_from - 1 <= since.seq <= log.head
        )
        self.outbox.append(
            Outgoing(self.server.joined(name, epoch=log.epoch, seq=log.head, recovered=recoverable))
        )
        if recoverable:
            assert since is not None
            self.send_events(name, log.events[since.seq :])

    def send_events(self, name: str, events: list[RoomEvent]) -> None:
        """Send events in frames of 1 to 3, merging runs of consecutive events
        with ``merge_probability``."""
        pending = list(events)
        while pending:
            size = self.rng.randint(1, 3)
            chunk, pending = pending[:size], pending[size:]
            if len(chunk) > 1 and self.rng.random() < self.merge_probability:
                first, last = chunk[0], chunk[-1]
                merged = RoomEvent(
                    name,
                    first.seq,
                    "task:message",
                    data={"chunks": [e.data for e in chunk]},
                    last_seq=last.seq,
                )
                chunk = [merged]
            batch = prepare_batch(chunk)
            self.outbox.append(Outgoing(batch.frame(self.codec), name, chunk[0].seq))

    def publish(self, name: str, count: int) -> None:
        log = self.room(name)
        new = [
            RoomEvent(name, log.head + i + 1, "task:message", data={"n": log.head + i + 1})
            for i in range(count)
        ]
        log.events.extend(new)
        if self.server.is_subscribed(name) and name not in self.lagging:
            self.send_events(name, new)

    def lag(self, name: str) -> None:
        """The client's outbox for ``name`` overflowed: drop what was not sent
        and tell it where to resume."""
        if not self.server.is_subscribed(name) or name in self.lagging:
            return
        dropped = [o for o in self.outbox if o.room == name and o.first_seq is not None]
        self.outbox = [o for o in self.outbox if o not in dropped]
        resume_from = min((o.first_seq for o in dropped if o.first_seq), default=None)
        if resume_from is None:
            resume_from = self.room(name).head + 1
        self.lagging.add(name)
        self.outbox.append(Outgoing(self.server.lagged(name, resume_from)))

    def reset_epoch(self, name: str) -> None:
        """The room's log is reset: a new epoch, seqs from 1 again; subscribers
        are told with an unsolicited ``joined`` (recovered false)."""
        self.epochs += 1
        log = self.rooms[name] = RoomLog(epoch=f"e{self.epochs}")
        if self.server.is_subscribed(name):
            self.lagging.discard(name)
            self.outbox.append(
                Outgoing(self.server.joined(name, epoch=log.epoch, seq=0, recovered=False))
            )

    def forget(self, name: str, upto: int) -> None:
        log = self.room(name)
        log.retained_from = max(log.retained_from, min(upto, log.head + 1))


class Mirror:
    """The app's copy of the rooms: the seqs it applied, which must always be
    1..n in the room's current epoch."""

    def __init__(self) -> None:
        self.applied: dict[str, list[int]] = {}
        self.epoch: dict[str, str] = {}
        self.reloads = 0

    def apply(self, events: list[ClientEvent]) -> None:
        for event in events:
            if isinstance(event, ReloadRequired):
                self.reloads += 1
                self.epoch[event.room] = event.epoch
                self.applied[event.room] = list(range(1, event.seq + 1))
            elif isinstance(event, EventApplied):
                room = event.event.room
                seqs = self.applied[room]
                assert event.event.seq == len(seqs) + 1, (room, event.event, seqs[-3:])
                seqs.extend(range(event.event.seq, event.event.end_seq + 1))
            elif isinstance(event, RoomLeft):
                self.applied.pop(event.room, None)
            elif isinstance(event, RoomJoined | ResumeRequested | Welcomed | Lagged):
                pass


class SyncWorld:
    """One client, one mini daemon, the frames in flight both ways, and faults."""

    def __init__(self, codec: Codec, seed: int, *, merge_probability: float = 0.0) -> None:
        self.rng = random.Random(seed)
        self.daemon = MiniDaemon(codec, self.rng, merge_probability=merge_probability)
        self.client = ClientConnection(codec=codec, client_id="c")
        self.to_server: list[Frame] = []
        self.mirror = Mirror()
        self.now = 0.0
        self.client_log: list[Any] = []
        self.stale: list[Frame] = []
        self.to_server.append(self.client.hello("t"))

    # --------------------------------------------------------------- transport

    def _client_events(self, events: list[ClientEvent]) -> None:
        self.client_log.extend(events)
        for event in events:
            assert not isinstance(event, ProtocolViolation), event
            if isinstance(event, ResumeRequested):
                self.to_server.append(event.data)
            elif isinstance(event, Welcomed):
                joins = self.client.rejoin_all()
                if joins:
                    self.to_server.append(self.client.send(joins))
        self.mirror.apply(events)

    def deliver_to_server(self) -> bool:
        if not self.to_server:
            return False
        self.now += 0.001
        self.daemon.receive(self.to_server.pop(0), self.now)
        return True

    def deliver_to_client(self) -> bool:
        outbox = self.daemon.outbox
        if not outbox:
            return False
        self.now += 0.001
        self._client_events(self.client.receive_data(outbox.pop(0).frame, self.now))
        return True

    def fault(self, kind: str) -> bool:
        """Damage the first event frame in flight to the client: ``drop`` it,
        ``duplicate`` it, or ``swap`` it with the next frame when that is an
        event frame too.  (Events carry no epoch: the protocol relies on an
        ordered transport to never move an event across a ``joined`` that
        changes the epoch, so neither do these faults.)"""
        outbox = self.daemon.outbox
        events = [i for i, o in enumerate(outbox) if o.first_seq is not None]
        if not events:
            return False
        first = events[0]
        if kind == "drop":
            del outbox[first]
        elif kind == "duplicate":
            outbox.insert(first + 1, outbox[first])
        elif kind == "swap" and len(events) > 1 and events[1] == first + 1:
            outbox[first], outbox[first + 1] = outbox[first + 1], outbox[first]
        else:
            return False
        return True

    def join(self, room: str) -> None:
        self.to_server.append(self.client.join(room))

    def deliver_stale(self) -> bool:
        """Deliver an event frame left over from the previous connection (a
        transport would not, but the client must cope)."""
        if not self.stale or self.client.state is not ClientState.OPEN:
            return False
        self.now += 0.001
        self._client_events(self.client.receive_data(self.stale.pop(0), self.now))
        return True

    def disconnect(self) -> None:
        self.stale = [o.frame for o in self.daemon.outbox if o.first_seq is not None][:3]
        self.to_server.clear()
        self._client_events(self.client.connection_lost())
        self.daemon.new_connection()
        self.to_server.append(self.client.hello("t"))

    def settle(self, limit: int = 10_000) -> None:
        """Deliver everything faithfully until nothing is in flight."""
        for _ in range(limit):
            if not (self.deliver_to_server() or self.deliver_to_client()):
                return
        raise AssertionError("no quiescence")
