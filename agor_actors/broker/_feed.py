"""The feed: the other daemons' commits (and, on board rooms, their
users' presence), for the rooms this daemon's clients joined.

The hub tells it which rooms are wanted (:meth:`RoomFeed.watch` when a
connection joins, :meth:`RoomFeed.unwatch` when it leaves); it holds one
subscription connection to the broker with one channel per wanted room,
and hands each message to its room actor as a ``Committed``.  The room
takes events in seq order: a duplicate (its own, or one it read from the
log) is dropped, a hole (a message lost or overtaken) makes it read the
log from its head, so no client ever sees a gap.

Bounds and overflow policies:

- messages received wait in a queue of ``queue_max``; one that finds it
  full is dropped and its room is marked behind;
- a room actor whose mailbox is full is marked behind too;
- a lost marker (another daemon's events too long for the link) marks its
  room behind;
- a room marked behind is sent ``Resync`` (it reads its log from its head)
  by the repair task: at most one mark per wanted room;
- a lost subscription connection is made again (backoff up to
  ``reconnect_max_s``), and every wanted room is marked behind, since what
  was published meanwhile never arrived.  Access changes of other rooms
  may be among it (a member removed from a board, read by the board's room
  only once it catches up, while a session room of that board catches up
  too): nothing received on the new connection reaches a room, and no room
  reads its log, until the hub's :attr:`RoomFeed.gap_check` has checked
  every subscription against the store (again after a second while it
  fails: closed, not open).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..domain.cluster_presence import RemotePresence
from ..runtime import ActorDead, Registry
from ..store import Committed, Resync
from ._link import BrokerLink, BrokerSession
from ._wire import BrokerMessageError, Lost, channel_for, decode_message

__all__ = ["FeedStats", "RoomFeed"]

log = logging.getLogger("agor_actors.broker")


class FeedStats:
    """Counters of a feed (read by the metrics and the tests)."""

    def __init__(self) -> None:
        self.received = 0
        self.delivered = 0
        self.own = 0
        self.dropped = 0
        self.malformed = 0
        self.resyncs = 0
        self.sessions = 0
        self.presence = 0
        """Presence messages of other daemons handed to their board rooms."""
        self.presence_dropped = 0
        self.lost = 0
        """Lost markers (events no broker message could hold) of other daemons."""
        self.gap_checks = 0
        """Access checks run after the subscription connection came back."""
        self.gap_checks_failed = 0


class RoomFeed:
    """Made by the hub; :meth:`run` in its nursery (``nursery.start``)."""

    queue_max = 4096
    reconnect_min_s = 0.1
    reconnect_max_s = 5.0

    def __init__(
        self, link: BrokerLink, registry: Registry, node: str, *, prefix: str = "agor:"
    ) -> None:
        self._link = link
        self._registry = registry
        self._node = node
        self._prefix = prefix
        self._watchers: dict[str, set[str]] = {}
        """Per wanted room (its log's name): the subscription keys wanting it."""
        self._keys_of: dict[str, set[tuple[str, str]]] = {}
        """Per connection: its ``(room, key)`` pairs, to forget them at once."""
        self._room_of: dict[str, str] = {}
        """Channel -> room, for the wanted rooms."""
        self._session: BrokerSession | None = None
        self._send, self._receive = trio.open_memory_channel[tuple[str, bytes]](self.queue_max)
        self._behind: dict[str, None] = {}
        self._behind_wanted = trio.Event()
        self._unwanted: dict[str, None] = {}
        self._unwanted_wanted = trio.Event()
        self.connected = trio.Event()
        """Set while a subscription connection is up (a new one when lost)."""
        self.lost = trio.Event()
        """Set while none is up after one was (a new one when connected)."""
        self.gap_check: Callable[[], Awaitable[None]] | None = None
        """Set by the hub: run once a lost subscription connection is back,
        before anything reaches the rooms (see the module's docstring)."""
        self._open = trio.Event()
        self._open.set()
        """Clear while a gap check runs: deliveries and resyncs wait."""
        self.stats = FeedStats()

    # ------------------------------------------------------------ the hub's side

    async def watch(self, room: str, connection_id: str, key: str) -> bool:
        """Want ``room``'s events for the subscription ``key``.  Returns
        True if the room was not wanted before: once the broker confirmed
        the channel (or the connection is down: then it is subscribed when
        the connection is made again), so the caller has the room read its
        log after joining, for what was published before."""
        keys = self._watchers.get(room)
        self._keys_of.setdefault(connection_id, set()).add((room, key))
        if keys is not None:
            keys.add(key)
            return False
        self._watchers[room] = {key}
        channel = channel_for(self._prefix, room)
        self._room_of[channel] = room
        self._unwanted.pop(channel, None)
        session = self._session
        if session is not None:
            try:
                await session.subscribe({channel: self._on_message})
            except Exception as exc:  # the connection is failing: its successor subscribes it
                log.info("subscribing to %s failed: %s", channel, exc)
        return True

    def unwatch(self, room: str, connection_id: str, key: str) -> None:
        """The subscription ``key`` no longer wants ``room``; the channel is
        given up (in the feed's own task) once nobody here wants it."""
        mine = self._keys_of.get(connection_id)
        if mine is not None:
            mine.discard((room, key))
            if not mine:
                del self._keys_of[connection_id]
        keys = self._watchers.get(room)
        if keys is None:
            return
        keys.discard(key)
        if keys:
            return
        del self._watchers[room]
        channel = channel_for(self._prefix, room)
        self._room_of.pop(channel, None)
        self._unwanted[channel] = None
        self._unwanted_wanted.set()

    def forget(self, connection_id: str) -> None:
        """Everything ``connection_id`` wanted (it disconnected)."""
        for room, key in list(self._keys_of.get(connection_id, ())):
            self.unwatch(room, connection_id, key)

    def wanted(self) -> list[str]:
        return sorted(self._watchers)

    # ------------------------------------------------------------ its tasks

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._deliver)
            nursery.start_soon(self._repair)
            nursery.start_soon(self._give_up_channels)
            task_status.started()
            await self._connect()

    async def _connect(self) -> None:
        """Keep one subscription connection, with every wanted channel."""
        backoff_s = self.reconnect_min_s
        failing = False
        lost = False  # a connection was up before: what came meanwhile is missed
        while True:
            try:
                async with self._link.session() as session:
                    # from here on, a room wanted meanwhile subscribes itself
                    self._session = session
                    gap = lost and self.gap_check is not None
                    if gap:
                        self._open = trio.Event()
                    try:
                        await session.subscribe({c: self._on_message for c in self._room_of})
                        self.stats.sessions += 1
                        if failing:
                            log.info("the broker's subscription connection is back")
                        failing = False
                        if self.lost.is_set():
                            self.lost = trio.Event()
                        self.connected.set()
                        backoff_s = self.reconnect_min_s
                        if gap:
                            await self._check_gap()
                    finally:
                        self._open.set()
                    lost = True
                    # what was published while no connection was up never arrives
                    for room in self._watchers:
                        self._mark_behind(room)
                    await session.closed()
            except Exception as exc:
                if not failing:
                    log.warning("the broker's subscription connection failed: %s", exc)
                failing = True
            finally:
                self._session = None
                if self.connected.is_set():
                    self.connected = trio.Event()
                    self.lost.set()
            await trio.sleep(backoff_s)
            backoff_s = min(self.reconnect_max_s, backoff_s * 2)

    async def _check_gap(self) -> None:
        """The hub's gap check, again after a second while it fails."""
        assert self.gap_check is not None
        while True:
            try:
                await self.gap_check()
            except Exception as exc:
                self.stats.gap_checks_failed += 1
                log.warning("checking access after the broker's gap failed: %s", exc)
                await trio.sleep(1.0)
                continue
            self.stats.gap_checks += 1
            return

    def _on_message(self, channel: str, payload: bytes) -> None:
        """In the connection's reading task: queue, never wait."""
        self.stats.received += 1
        room = self._room_of.get(channel)
        if room is None:
            return  # given up meanwhile
        try:
            self._send.send_nowait((room, payload))
        except trio.WouldBlock:
            self.stats.dropped += 1
            self._mark_behind(room)

    async def _deliver(self) -> None:
        async for room, payload in self._receive:
            if not self._open.is_set():
                await self._open.wait()
            try:
                remote = decode_message(room, payload)
            except BrokerMessageError as exc:
                self.stats.malformed += 1
                log.warning("a broker message on %s was refused: %s", room, exc)
                self._mark_behind(room)
                continue
            if remote.node == self._node:
                self.stats.own += 1
                continue
            if isinstance(remote, Lost):
                self.stats.lost += 1  # events too long for the link: read the log
                self._mark_behind(room)
                continue
            if isinstance(remote, RemotePresence):
                self._presence(room, remote)
                continue
            if not remote.events:
                continue
            ref = self._registry.lookup(f"room:{room}")
            if ref is None:
                continue  # no room actor: it reads its head when it starts
            try:
                if ref.try_send(Committed(room, remote.events)):
                    self.stats.delivered += 1
                    continue
            except ActorDead:
                continue
            self.stats.dropped += 1
            self._mark_behind(room)

    def _presence(self, room: str, remote: RemotePresence) -> None:
        """Another daemon's users on a board, to its room actor.  Lossy:
        dropped (and counted) when the room is busy or not running, since
        that daemon's next heartbeat says it all again."""
        ref = self._registry.lookup(f"room:{room}")
        try:
            if ref is not None and ref.try_send(remote):
                self.stats.presence += 1
                return
        except ActorDead:
            pass
        self.stats.presence_dropped += 1

    def _mark_behind(self, room: str) -> None:
        if room in self._watchers:
            self._behind[room] = None
            self._behind_wanted.set()

    async def _repair(self) -> None:
        """Rooms marked behind read their logs (waiting for room in their
        mailboxes: this task alone waits, not the delivery)."""
        while True:
            await self._behind_wanted.wait()
            if not self._open.is_set():
                await self._open.wait()
            self._behind_wanted = trio.Event()
            behind, self._behind = self._behind, {}
            for room in behind:
                ref = self._registry.lookup(f"room:{room}")
                if ref is None:
                    continue
                self.stats.resyncs += 1
                with contextlib.suppress(ActorDead):
                    await ref.send(Resync())

    async def _give_up_channels(self) -> None:
        while True:
            await self._unwanted_wanted.wait()
            self._unwanted_wanted = trio.Event()
            channels = [c for c in self._unwanted if c not in self._room_of]
            self._unwanted.clear()
            session = self._session
            if session is None or not channels:
                continue  # a new connection subscribes only what is wanted
            try:
                await session.unsubscribe(channels)
            except Exception as exc:
                log.info("unsubscribing failed: %s", exc)

    def describe(self) -> dict[str, Any]:
        return {
            "rooms": len(self._watchers),
            "connected": self.connected.is_set(),
            **vars(self.stats),
        }
