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

from ._faults import FaultyBlocking, StoreFaults
from ._net import Conn, Network, ServerSide
from ._record import Recorder
from ._trace import Trace

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
    ) -> None:
        self._seed = seed
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
        self._epochs = SeededEntropy(f"{seed}/store/epochs")
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
        return SqlStore(self._engine, new_epoch=lambda: epochs.new_id(wall.now_ms()))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the daemon, again after each crash, until cancelled."""
        started = False
        async with trio.open_nursery() as nursery:
            while True:
                self.incarnations += 1
                blocking = FaultyBlocking(
                    InlineBlocking(), self._store_faults, latency_us=self._store_latency_us
                )
                incarnation = _Incarnation(self.incarnations, blocking)
                self._current = incarnation
                self._crashed = trio.Event()
                nursery.start_soon(
                    self._incarnation, incarnation, name=f"daemon:{incarnation.number}"
                )
                if not started:
                    started = True
                    task_status.started()
                await self._crashed.wait()
                await trio.sleep(self._down_for_s)

    async def _incarnation(self, incarnation: _Incarnation) -> None:
        world = attrs.evolve(
            simulated_world(f"{self._seed}/daemon/{incarnation.number}"),
            blocking=incarnation.blocking,
        )
        failed_start = False
        with incarnation.scope:
            try:
                store = self.new_store()
                async with open_hub(
                    world, store=store, owner_token=self._token, **self._limits
                ) as hub:
                    state = AppState(hub=hub, world=world, settings=self.settings)
                    async with trio.open_nursery() as connections:

                        def accept(conn: Conn) -> bool:
                            connections.start_soon(
                                self._serve, state, conn, name=f"serve:{conn.name}"
                            )
                            return True

                        incarnation.hub, incarnation.state = hub, state
                        self._net.accept = accept
                        self._trace.emit("daemon", f"up (incarnation {incarnation.number})")
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
            self._net.accept = None
            self._crashed.set()

    def _failed(self, incarnation: _Incarnation, group: ExceptionGroup[Exception]) -> None:
        for exc in _leaves(group):
            if incarnation.crashed:
                # A real crash runs no teardown: what failed in this one is a
                # finding for the trace, not a violation.
                self._recorder.count(f"crash_teardown_error:{type(exc).__name__}")
                self._trace.emit("daemon", f"teardown after the crash raised {exc!r}")
            elif incarnation.hub is None:
                self._recorder.count(f"start_failed:{type(exc).__name__}")
                self._trace.emit("daemon", f"start failed: {exc!r}")
            else:
                self._recorder.violate("daemon", "daemon", f"the daemon failed: {exc!r}")

    def crash(self, down_for_us: int) -> bool:
        """Kill the daemon now; the next one starts ``down_for_us`` later."""
        current = self._current
        if current is None or current.crashed or current.hub is None:
            return False
        self.crashes += 1
        current.crashed = True
        current.blocking.fence()
        self._down_for_s = down_for_us / 1_000_000
        self._net.accept = None
        self._net.reset_all("daemon crash")
        self._trace.emit("fault", f"daemon crash (incarnation {current.number})")
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
