"""The simulated broker: a pub/sub server on virtual time with Redis's
semantics, behind the daemon's own seam (:class:`agor_actors.broker.BrokerLink`).

- A node's link makes subscription sessions and publishes.  Every hop
  (node to broker, broker to node) takes the node's latency plus jitter
  (integer microseconds, from the node's own named stream), and what one
  session receives arrives in the order the broker took it.
- A session is one connection: its commands (subscribe, unsubscribe) reach
  the broker in the order they were sent, whatever their jitter, as
  Redis's commands on one TCP connection do (a command sent while another
  is on its way waits for it, then takes its own hop).
- At most once, as Redis pub/sub: a message goes to the sessions
  subscribed to its channel *when the broker takes it*; a session that is
  not there (cut, crashed, not yet subscribed) never gets it.
- Bounded: a session's undelivered messages are at most
  ``SESSION_QUEUE_MAX``; one more and the broker drops the session (Redis's
  ``client-output-buffer-limit pubsub``): its ``closed()`` raises and the
  node makes a new one.
- Message size: a seed may bound it as LISTEN/NOTIFY does
  (``max_message_bytes``, then a longer message makes ``publish`` raise
  ValueError, as :class:`~agor_actors.broker.PgNotifyLink` does), so the
  publisher's cutting and the "lost" marker run; unbounded is Redis.
- Faults: :meth:`SimBroker.cut` cuts a node from the broker for a while:
  its sessions end (``closed()`` raises), new ones and publishes fail after
  a connect timeout, and whatever was published meanwhile is lost for it;
  then it heals.  :meth:`SimBrokerLink.fence` is a crashed process: its
  sessions end and it never reaches the broker again.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Final

import trio

from agor_actors.broker import BrokerSession
from agor_actors.broker._link import Handler

from ._det import sleep
from ._trace import Trace, now_us

__all__ = ["BrokerCut", "SimBroker", "SimBrokerLink"]

SESSION_QUEUE_MAX: Final = 20_000
"""Messages a session may have waiting before the broker drops it."""
CONNECT_TIMEOUT_US: Final = 2_000_000
"""How long a connect or a publish to a broker that cannot be reached takes to fail."""


class BrokerCut(ConnectionError):
    """The broker cannot be reached (or the session was dropped)."""


class _Session:
    """One subscription connection of a node, as the broker holds it."""

    def __init__(self, link: SimBrokerLink, name: str) -> None:
        self.link = link
        self.name = name
        self.handlers: dict[str, Handler] = {}
        self.queue: deque[tuple[int, str, bytes]] = deque()
        self.wake = trio.Event()
        self.lost: str | None = None
        self.ended = trio.Event()
        self.way_there = trio.Lock()
        """Held by a command on its way to the broker: the next one, sent
        meanwhile, arrives after it (trio's lock is fair: first come, first
        served)."""

    def drop(self, why: str) -> None:
        if self.lost is None:
            self.lost = why
            self.queue.clear()
            self.ended.set()
            self.wake.set()

    # ------------------------------------------------------ BrokerSession

    async def subscribe(self, handlers: Mapping[str, Handler]) -> None:
        if not handlers:
            return
        async with self.way_there:
            await self.link._hop()
            self._alive()
            self.handlers.update(handlers)
        await self.link._hop()  # the confirmation's way back
        self._alive()

    async def unsubscribe(self, channels: Sequence[str]) -> None:
        if not channels:
            return
        async with self.way_there:
            await self.link._hop()
            self._alive()
            for channel in channels:
                self.handlers.pop(channel, None)
        await self.link._hop()

    async def closed(self) -> None:
        await self.ended.wait()
        raise BrokerCut(f"the broker's connection was lost: {self.lost}")

    def _alive(self) -> None:
        if self.lost is not None:
            raise BrokerCut(f"the broker's connection was lost: {self.lost}")

    async def deliver(self) -> None:
        """The connection's reading task: hands each message to its handler
        when it arrives, in order."""
        while self.lost is None:
            if not self.queue:
                self.wake = trio.Event()
                await self.wake.wait()
                continue
            at_us, channel, payload = self.queue[0]
            wait_us = at_us - now_us()
            if wait_us > 0:
                await sleep(wait_us / 1_000_000)
                continue
            self.queue.popleft()
            handler = self.handlers.get(channel)
            if handler is not None:
                handler(channel, payload)


class SimBrokerLink:
    """One daemon incarnation's :class:`~agor_actors.broker.BrokerLink`."""

    def __init__(self, broker: SimBroker, node: int, incarnation: int) -> None:
        self._broker = broker
        self.node = node
        self.name = f"n{node}.{incarnation}"
        self._rng = random.Random(f"{broker.seed}/broker/{self.name}")
        self._sessions = 0
        self.fenced = False
        self.live: list[_Session] = []

    @property
    def max_message_bytes(self) -> int | None:
        """The longest message ``publish`` takes (None: no bound, as Redis)."""
        return self._broker.max_message_bytes

    async def _hop(self) -> None:
        """One way between the node and the broker; fails (after the
        connect timeout) while the node is cut, never returns once fenced."""
        await self._alive()
        if self._broker.is_cut(self.node):
            await sleep(CONNECT_TIMEOUT_US / 1_000_000)
            raise BrokerCut(f"node {self.node} cannot reach the broker")
        latency, jitter = self._broker.latency_us
        await sleep((latency + self._rng.randint(0, jitter)) / 1_000_000)
        await self._alive()
        if self._broker.is_cut(self.node):  # cut on the way: lost
            raise BrokerCut(f"node {self.node} lost the broker")

    async def _alive(self) -> None:
        if self.fenced:  # a dead process waits for good
            await trio.sleep_forever()

    def fence(self) -> None:
        """The process died: its connections end, it sends nothing more."""
        self.fenced = True
        for session in list(self.live):
            session.drop("the process died")

    @asynccontextmanager
    async def session(self) -> AsyncIterator[BrokerSession]:
        await self._hop()
        await self._hop()  # the connect's answer
        self._sessions += 1
        session = _Session(self, f"{self.name}.s{self._sessions}")
        self.live.append(session)
        self._broker._sessions.append(session)
        self._broker.trace.emit("broker", f"{session.name} connected")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.deliver, name=f"broker:{session.name}")
                try:
                    yield session
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # the body's own error, as a real connection's context manager
            # would let it through (not wrapped by the delivery task's nursery)
            inner = group.exceptions[0] if len(group.exceptions) == 1 else None
            if isinstance(inner, Exception):
                raise inner from None
            raise
        finally:
            session.drop("closed")
            self.live.remove(session)
            self._broker._sessions.remove(session)

    async def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        bound = self._broker.max_message_bytes
        if bound is not None:
            for channel, message in messages:
                if len(message) > bound:
                    raise ValueError(f"a broker message of {len(message)} bytes on {channel!r}")
        await self._hop()
        self._broker._take(self, messages)
        await self._hop()  # the answer


class SimBroker:
    """The one broker of a multi-node run."""

    def __init__(
        self,
        seed: int,
        trace: Trace,
        *,
        latency_us: tuple[int, int],
        max_message_bytes: int | None = None,
    ) -> None:
        self.seed = seed
        self.max_message_bytes = max_message_bytes
        """Messages longer than this are refused (None: no bound)."""
        self.trace = trace
        self.latency_us = latency_us
        """Each hop's latency and jitter (us)."""
        self._sessions: list[_Session] = []
        self._cut_until_us: dict[int, int] = {}
        self._rng = random.Random(f"{seed}/broker/arrivals")
        self.published = 0
        self.delivered = 0
        self.lost_cut = 0
        """Messages a cut node's sessions would have got (none: a cut ends
        them; counted in case one outlives it)."""
        self.overflows = 0

    def link(self, node: int, incarnation: int) -> SimBrokerLink:
        return SimBrokerLink(self, node, incarnation)

    def is_cut(self, node: int) -> bool:
        return now_us() < self._cut_until_us.get(node, 0)

    def cut(self, node: int, duration_us: int) -> None:
        """Cut ``node`` from the broker for ``duration_us``: its sessions end now."""
        until = now_us() + duration_us
        self._cut_until_us[node] = max(self._cut_until_us.get(node, 0), until)
        self.trace.emit("fault", f"node {node} cut from the broker until {until / 1e6:.3f}s")
        for session in list(self._sessions):
            if session.link.node == node:
                session.drop("cut from the broker")

    def heal_all(self) -> None:
        self._cut_until_us.clear()

    def _take(self, sender: SimBrokerLink, messages: Sequence[tuple[str, bytes]]) -> None:
        """The broker took ``messages`` from ``sender``: each to every
        session subscribed to its channel now."""
        latency, jitter = self.latency_us
        for channel, payload in messages:
            self.published += 1
            for session in self._sessions:
                if session.lost is not None or channel not in session.handlers:
                    continue
                if self.is_cut(session.link.node):
                    self.lost_cut += 1
                    continue
                if len(session.queue) >= SESSION_QUEUE_MAX:
                    self.overflows += 1
                    self.trace.emit("broker", f"{session.name} dropped: output buffer full")
                    session.drop("output buffer full")
                    continue
                arrive = now_us() + latency + self._rng.randint(0, jitter)
                if session.queue:
                    arrive = max(arrive, session.queue[-1][0])
                session.queue.append((arrive, channel, payload))
                session.wake.set()
                self.delivered += 1
