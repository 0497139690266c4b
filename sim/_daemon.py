"""The simulated daemon: the real hub (``open_hub``) on a database kept
across crashes, and the real WebSocket connection code
(:class:`agor_actors.server.Connection`, what ``agor-actors serve``
runs for ``/ws``) on simulated links.

Each incarnation of the daemon is a task with its own world (a new entropy
stream), its own ``SqlStore`` object on the shared in-memory engine (a new
process has empty caches) and its own store seam.  A crash is abrupt: the
links are reset, the incarnation's store seam is fenced (a dead process
touches nothing any more) and its scope is cancelled; its teardown, which a
real crash would not run, finishes in the background while the next
incarnation starts after the configured delay.

In a multi-node run (``node`` and ``broker`` given) there are several of
these on one engine: each incarnation's store is ``shared`` (seqs taken
under the rooms' head rows, as on PostgreSQL), its hub a cluster node on
its own link to the simulated broker (fenced when it crashes), its store
seam can be cut from the store (``store_cut``), its commits are
transactions that hold their rows' locks for a while against the other
nodes' (``sim/_locks.py``: a crash or a cut mid-transaction leaves them
locked until the store notices), and it accepts the connections the
network routes to it.
"""

from __future__ import annotations

from typing import Any

import attrs
import sqlalchemy as sa
import trio

from agor_actors.daemon import Hub, open_hub
from agor_actors.server import AppState, Connection, ServerSettings
from agor_actors.store import SqlStore
from agor_actors.world import InlineBlocking, SeededEntropy, VirtualWallClock, simulated_world
from protocols import negotiate
from supervisors import SupervisorGaveUp

from ._broker import SimBroker, SimBrokerLink
from ._det import sleep
from ._faults import FaultyBlocking, SimPoison, StoreFaults
from ._locks import SimStore, StoreLocks
from ._net import Conn, Network, ServerSide
from ._record import Recorder
from ._trace import Trace, now_us

__all__ = ["SimDaemon"]

RESTART_AFTER_FAILED_START_S = 1.0


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


@attrs.define(eq=False)
class _Incarnation:
    number: int
    blocking: FaultyBlocking
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    hub: Hub | None = None
    state: AppState | None = None
    link: SimBrokerLink | None = None
    crashed: bool = False
    ended: trio.Event = attrs.field(factory=trio.Event)


class SimDaemon:
    def __init__(
        self,
        *,
        seed: int,
        engine: sa.Engine,
        store_faults: StoreFaults,
        net: Network,
        settings: ServerSettings,
        store_latency_us: int,
        owner_token: str,
        trace: Trace,
        recorder: Recorder,
        limits: dict[str, Any] | None = None,
        node: int | None = None,
        broker: SimBroker | None = None,
        store_cut_wait_us: int = 0,
        locks: StoreLocks | None = None,
    ) -> None:
        self._seed = seed
        self._locks = locks
        """The run's row locks (several nodes): this node's commits are
        transactions that wait for the other nodes' (``sim/_locks.py``)."""
        self._store_cut_wait_us = store_cut_wait_us
        self._engine = engine
        self._store_faults = store_faults
        self._net = net
        self.settings = settings
        self._store_latency_us = store_latency_us
        self._token = owner_token
        self._trace = trace
        self._recorder = recorder
        self._limits = dict(limits or {})
        """Keyword arguments for ``open_hub``: sim-sized limits."""
        self._current: _Incarnation | None = None
        self._up_lot = trio.lowlevel.ParkingLot()
        self._crashed = trio.Event()
        self._down_for_s = 0.0
        self.node = node
        """This daemon's number in a multi-node run (None: the one daemon)."""
        self._broker = broker
        self._cut_until_us = 0
        self.ending = False
        """Set by the runner once the run is over (its checks made): a
        multi-node daemon's teardown under the run's cancellation is then
        not a finding (its actors are cancelled while its drain waits)."""
        self._epochs = SeededEntropy(
            f"{seed}/store/epochs" if node is None else f"{seed}/node{node}/store/epochs"
        )
        self.incarnations = 0
        self.crashes = 0
        self.served = 0

    @property
    def hub(self) -> Hub | None:
        current = self._current
        return None if current is None or current.crashed else current.hub

    @property
    def state(self) -> AppState | None:
        current = self._current
        return None if current is None or current.crashed else current.state

    @property
    def up(self) -> bool:
        return self.hub is not None

    async def wait_up(self) -> Hub:
        await trio.lowlevel.checkpoint()
        while True:
            hub = self.hub
            if hub is not None:
                return hub
            await self._up_lot.park()

    def new_store(self) -> SqlStore:
        """A store object on the shared database, as a new process opens it."""
        wall = VirtualWallClock()
        epochs = self._epochs
        kind = SqlStore if self._locks is None else SimStore
        return kind(
            self._engine,
            new_epoch=lambda: epochs.new_id(wall.now_ms()),
            shared=self.node is not None,
        )

    @property
    def _who(self) -> str:
        return "daemon" if self.node is None else f"node {self.node}"

    def cut_store(self, duration_us: int) -> None:
        """Cut this node from the store for ``duration_us``: its store
        calls fail as unavailable meanwhile (at once, as when refused, or
        after the seed's ``store_cut_wait_us``, as when the packets are
        dropped)."""
        self._cut_until_us = max(self._cut_until_us, now_us() + duration_us)
        self._trace.emit(
            "fault", f"{self._who} cut from the store until {self._cut_until_us / 1e6:.3f}s"
        )

    def heal_store(self) -> None:
        self._cut_until_us = 0

    def _store_cut(self) -> bool:
        return now_us() < self._cut_until_us

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the daemon, again after each crash, until cancelled."""
        started = False
        async with trio.open_nursery() as nursery:
            while True:
                self.incarnations += 1
                blocking = FaultyBlocking(
                    InlineBlocking(),
                    self._store_faults,
                    latency_us=self._store_latency_us,
                    cut=None if self.node is None else self._store_cut,
                    cut_wait_us=self._store_cut_wait_us,
                    locks=self._locks,
                    who=f"{self._who} (incarnation {self.incarnations})",
                )
                incarnation = _Incarnation(self.incarnations, blocking)
                if self._broker is not None:
                    incarnation.link = self._broker.link(self.node or 0, incarnation.number)
                self._current = incarnation
                self._crashed = trio.Event()
                prefix = "" if self.node is None else f"node{self.node}:"
                nursery.start_soon(
                    self._incarnation, incarnation, name=f"{prefix}daemon:{incarnation.number}"
                )
                if not started:
                    started = True
                    task_status.started()
                await self._crashed.wait()
                await sleep(self._down_for_s)

    async def _incarnation(self, incarnation: _Incarnation) -> None:
        stream = f"{self._seed}/daemon/{incarnation.number}"
        if self.node is not None:
            stream = f"{self._seed}/node{self.node}/daemon/{incarnation.number}"
        world = attrs.evolve(simulated_world(stream), blocking=incarnation.blocking)
        cluster: dict[str, Any] = {}
        if incarnation.link is not None:
            cluster["broker"] = incarnation.link
        failed_start = False
        with incarnation.scope:
            try:
                store = self.new_store()
                async with open_hub(
                    world, store=store, owner_token=self._token, **self._limits, **cluster
                ) as hub:
                    state = AppState(hub=hub, world=world, settings=self.settings)
                    async with trio.open_nursery() as connections:

                        def accept(conn: Conn) -> bool:
                            try:
                                connections.start_soon(
                                    self._serve, state, conn, name=f"serve:{conn.name}"
                                )
                            except RuntimeError:
                                # this incarnation is ending (it gave up):
                                # its listener is gone, the dial refused
                                return False
                            return True

                        incarnation.hub, incarnation.state = hub, state
                        self._net.set_accept(self.node or 0, accept)
                        up = f"up (incarnation {incarnation.number})"
                        self._trace.emit(
                            "daemon", up if self.node is None else f"node {self.node} {up}"
                        )
                        self._up_lot.unpark_all()
                        await trio.sleep_forever()
            except* Exception as group:
                failed_start = incarnation.hub is None and not incarnation.crashed
                self._failed(incarnation, group)
        incarnation.ended.set()
        if not incarnation.crashed:
            # a daemon that stopped or could not start exits; its service
            # manager starts it again
            if failed_start:
                self._trace.emit("daemon", "restarting after a failed start")
            self._down_for_s = RESTART_AFTER_FAILED_START_S
            self._net.set_accept(self.node or 0, None)
            if incarnation.link is not None:
                incarnation.link.fence()
            self._crashed.set()

    def _failed(self, incarnation: _Incarnation, group: ExceptionGroup[Exception]) -> None:
        for exc in _leaves(group):
            if incarnation.crashed or (self.ending and self.node is not None):
                # A real crash runs no teardown: what failed in this one is a
                # finding for the trace, not a violation.
                self._recorder.count(f"crash_teardown_error:{type(exc).__name__}")
                self._trace.emit("daemon", f"teardown after the crash raised {exc!r}")
            elif incarnation.hub is None:
                self._recorder.count(f"start_failed:{type(exc).__name__}")
                self._trace.emit("daemon", f"start failed: {exc!r}")
            elif isinstance(exc, SupervisorGaveUp) and repr(SimPoison()) in str(exc):
                # the injected crashes came faster than the supervision
                # tree's intensities allow (a seed's registry may give up
                # after one restart in 10 s, the root after three in 5 s):
                # the root gave up, the last straw one of those crashes, and
                # the daemon exits as designed; its service manager starts
                # it again (below), and the run's checks hold across it
                self._recorder.count("daemon_gave_up")
                self._trace.emit("daemon", f"gave up: {exc!r}")
            else:
                self._recorder.violate("daemon", self._who, f"the daemon failed: {exc!r}")

    def crash(self, down_for_us: int) -> bool:
        """Kill the daemon now; the next one starts ``down_for_us`` later."""
        current = self._current
        if current is None or current.crashed or current.hub is None:
            return False
        self.crashes += 1
        current.crashed = True
        current.blocking.fence()
        if current.link is not None:
            current.link.fence()
        self._down_for_s = down_for_us / 1_000_000
        self._net.set_accept(self.node or 0, None)
        self._net.reset_all("daemon crash", self.node)
        self._trace.emit("fault", f"{self._who} crash (incarnation {current.number})")
        current.scope.cancel()
        self._crashed.set()
        return True

    async def _serve(self, state: AppState, conn: Conn) -> None:
        """One WebSocket, served by the daemon's own connection code over the
        link's end of the transport seam; it stops when the peer goes away."""
        codec = negotiate([conn.codec.subprotocol])
        assert codec is conn.codec
        connection = Connection(state, ServerSide(conn), codec)
        state.connections.add(connection)
        self.served += 1
        try:
            await connection.run()
        except Exception as exc:
            self._recorder.violate("server", conn.name, f"the connection code raised: {exc!r}")
        finally:
            state.connections.discard(connection)
            conn.up.abandon()  # nothing reads it any more: the client's sends fail
