"""The simulated network: one in-order link per direction of each connection.

Each link has its own named random stream (so the order in which links send
does not change what any link draws), a latency and a jitter in integer
microseconds, and a bound in bytes: a sender waits while the link is full,
as on a TCP connection whose peer stopped reading.  A partition (both ways
or one way) holds what would arrive in its window until it heals; a reset
loses whatever is in flight and closes both ends.

The server end is a :class:`agor_actors.world.PeerTransport`, what the
daemon's :class:`agor_actors.server.Connection` drives: ``receive`` (raises
``TransportClosed`` once the peer is gone), ``try_send`` (never waits; drops
frames once the peer is gone), ``wait_writable`` and ``close``.  The client
end is a :class:`agor_actors.world.MessageTransport`, opened through
:class:`NetDialer` (an :class:`agor_actors.world.Dialer`): what the real
:class:`agor_actors.client.Client` drives.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Literal

import attrs
import trio

from agor_actors.world import DialFailed, OutFrame, TransportClosed
from protocols import CLIENT_LIMITS, Codec, Event, ProtocolError, decode_server_frame

from ._det import SimClock, Sleeper, park_until, sleep
from ._trace import Trace, now_us, reached

__all__ = ["ClientSide", "Conn", "Link", "NetDialer", "Network", "PathState", "ServerSide"]

Frame = bytes | str
Direction = Literal["both", "up", "down"]

CONNECT_TIMEOUT_US = 5_000_000


@attrs.define
class _Hold:
    """What arrives in ``[start_us, until_us)`` waits until ``until_us``."""

    start_us: int = 0
    until_us: int = 0

    def deliverable_at(self, at_us: int) -> int:
        if self.start_us <= at_us < self.until_us:
            return self.until_us
        return at_us

    def hold(self, start_us: int, until_us: int) -> None:
        if self.start_us <= start_us < self.until_us:
            self.until_us = max(self.until_us, until_us)
        else:
            self.start_us, self.until_us = start_us, until_us

    def active(self, at_us: int) -> bool:
        return self.start_us <= at_us < self.until_us


@attrs.define
class PathState:
    """One client's path to the server; outlives its connections."""

    up: _Hold = attrs.field(factory=_Hold)
    down: _Hold = attrs.field(factory=_Hold)
    stalled_until_us: int = 0
    """The client reads nothing before this instant (a frozen tab)."""
    stall_lot: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)

    async def wait_unstalled(self) -> None:
        while not reached(self.stalled_until_us):
            with trio.move_on_at(self.stalled_until_us / 1_000_000):
                await self.stall_lot.park()


@attrs.define
class _Item:
    at_us: int
    frame: Frame | None  # None: the close marker
    code: int = 1000
    reason: str = ""


class Link:
    """One direction of one connection."""

    def __init__(
        self,
        name: str,
        rng: random.Random,
        *,
        latency_us: int,
        jitter_us: int,
        bytes_max: int,
        hold: _Hold,
        trace: Trace,
        dup_per_mille: int = 0,
        codec: Codec | None = None,
    ) -> None:
        self.name = name
        self._rng = rng
        self._latency_us = latency_us
        self._jitter_us = jitter_us
        self.bytes_max = bytes_max
        self._hold = hold
        self._trace = trace
        self._dup_per_mille = dup_per_mille
        self._codec = codec
        self._queue: deque[_Item] = deque()
        self._bytes = 0
        self._last_at_us = 0
        self._reset = False
        self._closing = False
        self._eof: tuple[int, str] | None = None
        self._receivers: list[Sleeper] = []  # parked in receive
        self._send_lot = trio.lowlevel.ParkingLot()
        self.frames = 0
        self.duplicates = 0
        self.peak_bytes = 0

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    @property
    def gone(self) -> bool:
        return self._reset or self._eof is not None

    def within_bound(self) -> bool:
        """A link holds at most ``bytes_max`` bytes, or a single frame (and
        the close marker, which is no frame: a peer closing after a frame
        too long to share the link does not overfill it)."""
        closing = bool(self._queue) and self._queue[-1].frame is None
        return self._bytes <= self.bytes_max or len(self._queue) - closing <= 1

    def _delay_us(self) -> int:
        jitter = self._rng.randint(0, self._jitter_us) if self._jitter_us else 0
        return self._latency_us + jitter

    def _push(self, frame: Frame | None, code: int = 1000, reason: str = "") -> None:
        at = max(self._last_at_us, now_us() + self._delay_us())
        self._last_at_us = at
        was_empty = not self._queue
        self._queue.append(_Item(at, frame, code, reason))
        if frame is not None:
            self._bytes += len(frame)
            self.peak_bytes = max(self.peak_bytes, self._bytes)
            self.frames += 1
            dup = self._dup_per_mille and self._rng.randrange(1000) < self._dup_per_mille
            fits = self._bytes + len(frame) <= self.bytes_max
            if dup and fits and self._events_only(frame):
                self._queue.append(_Item(at, frame))
                self._bytes += len(frame)
                self.duplicates += 1
                self._trace.emit("dup", f"{self.name} {len(frame)}B")
        if was_empty:  # else receivers already wait for an earlier head
            self._arrives(self._hold.deliverable_at(at))

    def _events_only(self, frame: Frame) -> bool:
        """Whether a server frame holds room events only (the at-least-once
        part of the protocol, which a client must deduplicate)."""
        if self._codec is None:
            return False
        try:
            messages = decode_server_frame(self._codec, frame, CLIENT_LIMITS)
        except ProtocolError:
            return False
        return bool(messages) and all(isinstance(m, Event) for m in messages)

    async def send(self, frame: Frame) -> None:
        """Queue ``frame``; waits while the link is full.  A checkpoint.
        Raises :class:`TransportClosed` once the link is reset or closed."""
        await trio.lowlevel.checkpoint()
        while True:
            if self._reset or self._closing:
                raise TransportClosed(1006, f"{self.name} is gone")
            if not self._queue or self._bytes + len(frame) <= self.bytes_max:
                break
            await self._send_lot.park()
        self._push(frame)

    def try_send(self, frame: Frame) -> bool:
        """Queue ``frame`` if the link has room (True), else False.  Never
        blocks.  Raises :class:`TransportClosed` once the link is reset or closed."""
        if self._reset or self._closing:
            raise TransportClosed(1006, f"{self.name} is gone")
        if self._queue and self._bytes + len(frame) > self.bytes_max:
            return False
        self._push(frame)
        return True

    async def wait_room(self, size: int) -> None:
        """Wait until a frame of ``size`` bytes fits (or the link is gone).  A checkpoint."""
        await trio.lowlevel.checkpoint()
        while (
            self._queue
            and self._bytes + size > self.bytes_max
            and not (self._reset or self._closing)
        ):
            await self._send_lot.park()

    def close(self, code: int, reason: str) -> None:
        """Queue the close marker: the receiver gets what was sent before it,
        then :class:`TransportClosed` with ``code``."""
        if self._reset or self._closing:
            return
        self._closing = True
        self._push(None, code, reason)
        self._send_lot.unpark_all()

    async def receive(self) -> Frame:
        """The next frame once it has arrived.  A checkpoint (one task step
        whether it waits or not, as trio's memory channels).  Raises
        :class:`TransportClosed` after a reset or the close marker."""
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            if self._reset:
                if not waited:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                raise TransportClosed(1006, "connection reset")
            if self._queue:
                head = self._queue[0]
                at = self._hold.deliverable_at(head.at_us)
                if reached(at):
                    self._queue.popleft()
                    self._send_lot.unpark_all()
                    if head.frame is not None:
                        self._bytes -= len(head.frame)
                    if not waited:  # taken first, so a cancel here loses nothing
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    if head.frame is None:
                        self._eof = (head.code, head.reason)
                        raise TransportClosed(head.code, head.reason)
                    return head.frame
                if len(self._receivers) > 4:  # woken by the clock: drop them
                    self._receivers = [s for s in self._receivers if s.live]
                await park_until(at / 1_000_000, self._receivers)
            elif self._eof is not None:
                if not waited:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                raise TransportClosed(*self._eof)
            else:
                await park_until(math.inf, self._receivers)
            waited = True

    def close_arrived(self) -> bool:
        """Reset, or the close marker has arrived (a receiver would get it
        after the frames before it)."""
        if self._reset or self._eof is not None:
            return True
        return any(
            item.frame is None and reached(self._hold.deliverable_at(item.at_us))
            for item in self._queue
        )

    def _wake_receivers(self) -> None:
        receivers = self._receivers
        if receivers:
            for sleeper in receivers:
                sleeper.wake()
            receivers.clear()

    def _arrives(self, at_us: int) -> None:
        """A frame reaches an empty link, deliverable at ``at_us``: a
        receiver parked for ever (for want of one) wakes then, not now, so
        that a frame in flight costs its receiver one task step."""
        receivers = self._receivers
        if not receivers:
            return
        clock = trio.lowlevel.current_clock()
        if reached(at_us) or not isinstance(clock, SimClock):
            self._wake_receivers()
            return
        for sleeper in receivers:
            if sleeper.live:
                clock.park(at_us / 1_000_000, sleeper)

    def wake(self) -> None:
        """Something about the hold changed: receivers look again."""
        self._wake_receivers()

    def abandon(self) -> None:
        """The receiving end closed for good (the server's handler ended:
        its socket is closed): what was queued is dropped and the sender's
        sends fail from now on, as a TCP peer's reset makes them."""
        self._closing = True
        self._queue.clear()
        self._bytes = 0
        self._send_lot.unpark_all()

    def reset(self) -> None:
        self._reset = True
        self._queue.clear()
        self._bytes = 0
        self._wake_receivers()
        self._send_lot.unpark_all()


class Conn:
    """One connection between a client and the server."""

    def __init__(self, name: str, client: str, codec: Codec, up: Link, down: Link) -> None:
        self.name = name
        self.client = client
        self.codec = codec
        self.up = up
        self.down = down
        self.gone = trio.Event()
        """Set when the server's handler must stop: reset, or the client's close arrived."""
        self.reset_by: str | None = None
        self.node = 0
        """The node (daemon) that accepted it."""

    def reset(self, why: str, trace: Trace) -> None:
        if self.reset_by is not None:
            return
        self.reset_by = why
        self.up.reset()
        self.down.reset()
        self.gone.set()
        trace.emit("reset", f"{self.name} ({why})")


class ServerSide:
    """The transport that the server's connection code drives
    (:class:`agor_actors.world.PeerTransport`)."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self._refused = 0  # the size of the last frame the link had no room for

    async def receive(self) -> bytes | str:
        try:
            return await self.conn.up.receive()
        except TransportClosed:
            self.conn.gone.set()
            raise

    def try_send(self, frame: OutFrame) -> bool:
        try:
            if self.conn.down.try_send(frame.payload):
                return True
        except TransportClosed:
            return True  # the peer is gone: dropped; the receive side reports it
        self._refused = len(frame.payload)
        return False

    @property
    def pending(self) -> bool:
        return False  # a link takes a frame whole or not at all

    async def wait_writable(self) -> None:
        await self.conn.down.wait_room(self._refused)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await trio.lowlevel.checkpoint()
        self.conn.down.close(code, reason)

    def peer_gone(self) -> bool:
        return self.conn.gone.is_set() or self.conn.up.close_arrived()


class ClientSide:
    """The client's end of a connection
    (:class:`agor_actors.world.MessageTransport`).  Its sends go out one at a
    time in the order they were made (as a WebSocket's do)."""

    def __init__(self, conn: Conn, trace: Trace, path: PathState) -> None:
        self.conn = conn
        self._trace = trace
        self._path = path
        self._send_lock = trio.StrictFIFOLock()

    @property
    def subprotocol(self) -> str:
        return self.conn.codec.subprotocol

    async def receive(self) -> Frame:
        """The next frame (none while the client is stalled).  A checkpoint;
        raises :class:`TransportClosed`."""
        await self._path.wait_unstalled()
        return await self.conn.down.receive()

    async def send(self, frame: Frame) -> None:
        """Queue ``frame``; waits while the link is full.  A checkpoint;
        raises :class:`TransportClosed`."""
        async with self._send_lock:
            await self.conn.up.send(frame)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send the close marker: the server reads what came before it."""
        await trio.lowlevel.checkpoint()
        self.conn.up.close(code, reason)

    def abort(self, why: str) -> None:
        """Drop the connection (what is in flight is lost)."""
        self.conn.reset(why, self._trace)


class Network:
    """Every client's path to the one server, and the live connections."""

    def __init__(
        self,
        seed: int,
        trace: Trace,
        *,
        bytes_max: int,
        dup_per_mille: int,
        latency_us: dict[str, tuple[int, int]],
    ) -> None:
        self._seed = seed
        self._trace = trace
        self._bytes_max = bytes_max
        self._dup_per_mille = dup_per_mille
        self._latency_us = latency_us
        self.paths: dict[str, PathState] = {name: PathState() for name in latency_us}
        self.conns: dict[str, Conn] = {}
        self._ordinals: dict[str, int] = dict.fromkeys(latency_us, 0)
        self.accepts: dict[int, Callable[[Conn], bool]] = {}
        """Per node: set by its daemon while it accepts connections."""
        self.nodes = 1
        """Daemons a client may reach (more than one: each connect picks one
        of those accepting, from the client's own stream)."""
        self._routes: dict[str, random.Random] = {}
        self.connects = 0
        self.refused = 0
        self._links: list[Link] = []

    @property
    def frames(self) -> int:
        """Frames sent on every link so far."""
        return sum(link.frames for link in self._links)

    async def connect(self, client: str, codec: Codec) -> ClientSide:
        """Open a connection to the server (about one and a half round trips).
        Raises :class:`TransportClosed` if it is refused or times out."""
        latency, _ = self._latency_us[client]
        path = self.paths[client]
        await sleep(3 * latency / 1_000_000)
        now = now_us()
        if path.up.active(now) or path.down.active(now):
            await sleep(CONNECT_TIMEOUT_US / 1_000_000)
            self.refused += 1
            self._trace.emit("connect", f"{client} timed out")
            raise TransportClosed(1006, "connect timed out")
        self._ordinals[client] += 1
        ordinal = self._ordinals[client]
        name = f"{client}.{ordinal}"
        jitter = self._latency_us[client][1]

        def link(direction: str, hold: _Hold, dup: int, link_codec: Codec | None) -> Link:
            return Link(
                f"{name}.{direction}",
                random.Random(f"{self._seed}/link/{name}/{direction}"),
                latency_us=latency,
                jitter_us=jitter,
                bytes_max=self._bytes_max,
                hold=hold,
                trace=self._trace,
                dup_per_mille=dup,
                codec=link_codec,
            )

        conn = Conn(
            name,
            client,
            codec,
            up=link("up", path.up, 0, None),
            down=link("down", path.down, self._dup_per_mille, codec),
        )
        self._links += (conn.up, conn.down)
        accept = self._route(conn) if self.nodes > 1 else self.accepts.get(0)
        if accept is None or not accept(conn):
            self.refused += 1
            self._trace.emit("connect", f"{name} refused")
            raise TransportClosed(1006, "connection refused")
        old = self.conns.get(client)
        if old is not None:
            old.reset("replaced", self._trace)
        self.conns[client] = conn
        self.connects += 1
        self._trace.emit("connect", f"{name} {codec.value}")
        return ClientSide(conn, self._trace, path)

    @property
    def accept(self) -> Callable[[Conn], bool] | None:
        """The one daemon's acceptor (node 0)."""
        return self.accepts.get(0)

    def set_accept(self, node: int, accept: Callable[[Conn], bool] | None) -> None:
        if accept is None:
            self.accepts.pop(node, None)
        else:
            self.accepts[node] = accept

    def _route(self, conn: Conn) -> Callable[[Conn], bool] | None:
        """A node for ``conn`` among those accepting (a load balancer that
        sends each new connection to any node that is up)."""
        rng = self._routes.get(conn.client)
        if rng is None:
            rng = self._routes[conn.client] = random.Random(f"{self._seed}/route/{conn.client}")
        nodes = sorted(self.accepts)
        if not nodes:
            return None
        conn.node = nodes[rng.randrange(len(nodes))]
        self._trace.emit("route", f"{conn.name} to node {conn.node}")
        return self.accepts[conn.node]

    def dialer(self, client: str) -> NetDialer:
        """``client``'s way to the server, for :class:`agor_actors.client.Client`."""
        return NetDialer(self, client)

    def stall(self, client: str, until_us: int) -> None:
        """``client`` reads nothing until ``until_us`` (a frozen tab, a slow consumer)."""
        path = self.paths[client]
        path.stalled_until_us = max(path.stalled_until_us, until_us)
        self._trace.emit("stall", f"{client} until {until_us / 1e6:.3f}s")

    def unstall_all(self) -> None:
        for path in self.paths.values():
            path.stalled_until_us = 0
            path.stall_lot.unpark_all()

    def partition(self, clients: list[str], direction: Direction, duration_us: int) -> None:
        start = now_us()
        for client in clients:
            path = self.paths[client]
            if direction in ("both", "up"):
                path.up.hold(start, start + duration_us)
            if direction in ("both", "down"):
                path.down.hold(start, start + duration_us)
        self._wake()

    def heal_all(self) -> None:
        for path in self.paths.values():
            path.up.until_us = path.down.until_us = 0
        self._wake()

    def _wake(self) -> None:
        for conn in self.conns.values():
            conn.up.wake()
            conn.down.wake()

    def reset(self, client: str, why: str) -> bool:
        conn = self.conns.get(client)
        if conn is None or conn.reset_by is not None:
            return False
        conn.reset(why, self._trace)
        return True

    def reset_all(self, why: str, node: int | None = None) -> None:
        """Reset every connection (of ``node`` only, if given)."""
        for conn in self.conns.values():
            if node is None or conn.node == node:
                conn.reset(why, self._trace)


class NetDialer:
    """One client's :class:`agor_actors.world.Dialer` on the network: the URL
    is ignored (there is one server); the codec is the first of
    ``subprotocols`` the server speaks.  Leaving the connection drops it
    (what is in flight is lost), as a client that goes away does."""

    def __init__(self, net: Network, client: str) -> None:
        self._net = net
        self.client = client

    @asynccontextmanager
    async def dial(
        self,
        url: str,
        *,
        subprotocols: Sequence[str],
        headers: Sequence[tuple[str, str]] = (),
        connect_timeout_s: float = 10.0,
    ) -> AsyncIterator[ClientSide]:
        codec = next((c for c in Codec if c.subprotocol in subprotocols), None)
        if codec is None:
            raise DialFailed(
                "refused", f"no subprotocol spoken of {list(subprotocols)}", status=400
            )
        try:
            side = await self._net.connect(self.client, codec)
        except TransportClosed as exc:
            kind: Literal["timeout", "unreachable"] = (
                "timeout" if "timed out" in exc.reason else "unreachable"
            )
            raise DialFailed(kind, exc.reason) from None
        try:
            yield side
        finally:
            side.abort(f"{self.client} closed")
