"""Erlang/OTP-style supervisors on trio nurseries.

A supervisor runs children described by :class:`ChildSpec`.  A child is any
async function ``start(child)`` that calls ``child.started()`` once ready,
runs until it returns (a normal exit) or raises (a crash), and should return
soon after ``child.stop_requested`` is set (else it is cancelled after the
spec's ``shutdown_s``).  Supervisors know nothing else about their children,
so they supervise actors, connection tasks and other supervisors alike.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

import attrs
import trio

from agor_actors.marks import mark

from ._policy import (
    Backoff,
    Intensity,
    Restart,
    Strategy,
    add_restart,
    children_to_restart,
    restart_delay_s,
    should_restart,
)

__all__ = [
    "Child",
    "ChildSnapshot",
    "ChildSpec",
    "ChildStartError",
    "DuplicateChild",
    "Exit",
    "Supervisor",
    "SupervisorGaveUp",
    "SupervisorSnapshot",
    "TooManyChildren",
]

log = logging.getLogger("agor_actors.supervisors")
"""Restarts at WARNING, a supervisor giving up at ERROR; each record has the
fields ``supervisor``, ``child_id`` and ``reason``.  Named under the
daemon's logger, whose records the simulator puts in its trace (rather than
on stderr)."""

StartFn = Callable[["Child"], Awaitable[None]]
ChildState = Literal["starting", "running", "stopping", "restarting", "stopped"]


class SupervisorGaveUp(Exception):
    """A supervisor exceeded its restart intensity and stopped its children."""

    def __init__(self, name: str, child_id: str, reason: str) -> None:
        super().__init__(f"supervisor {name!r} gave up after child {child_id!r} failed: {reason}")
        self.name = name
        self.child_id = child_id
        self.reason = reason


class ChildStartError(Exception):
    """A child failed before it was ready."""


class DuplicateChild(Exception):
    pass


class TooManyChildren(Exception):
    pass


@attrs.frozen
class ChildSpec:
    """A child, as data."""

    id: str
    start: StartFn
    restart: Restart = Restart.PERMANENT
    shutdown_s: float = 5.0
    """Grace given to the child to finish after ``stop_requested``; then it is cancelled."""
    kind: Literal["worker", "supervisor"] = "worker"
    on_removed: Callable[[], None] | None = attrs.field(default=None, eq=False)
    """Called once the supervisor drops the child for good (no restart to come)."""


@attrs.frozen
class Exit:
    """Why a child stopped."""

    kind: Literal["normal", "crash", "killed", "shutdown"]
    error: BaseException | None = attrs.field(default=None, eq=False)

    @property
    def abnormal(self) -> bool:
        return self.kind in ("crash", "killed")

    def describe(self) -> str:
        if self.error is None:
            return self.kind
        error = _leaf(self.error)
        return f"{self.kind}: {type(error).__name__}: {error}"


def _leaf(error: BaseException) -> BaseException:
    """The one exception inside nested single-member exception groups."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


@attrs.frozen
class ChildSnapshot:
    id: str
    kind: str
    state: ChildState
    restarts: int
    last_crash: str | None
    details: Mapping[str, Any] | SupervisorSnapshot | None


@attrs.frozen
class SupervisorSnapshot:
    name: str
    strategy: str
    children: tuple[ChildSnapshot, ...]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the whole tree (for ``/debug/actors``)."""

        def child(c: ChildSnapshot) -> dict[str, Any]:
            out: dict[str, Any] = {
                "id": c.id,
                "kind": c.kind,
                "state": c.state,
                "restarts": c.restarts,
                "last_crash": c.last_crash,
            }
            if isinstance(c.details, SupervisorSnapshot):
                out["supervisor"] = c.details.to_json()
            elif c.details is not None:
                out.update(c.details)
            return out

        return {
            "name": self.name,
            "strategy": self.strategy,
            "children": [child(c) for c in self.children],
        }


class Child:
    """What a running child sees of its supervisor.  Made by the supervisor only."""

    def __init__(self, running: _Running) -> None:
        self._running = running

    @property
    def id(self) -> str:
        return self._running.spec.id

    @property
    def stop_requested(self) -> trio.Event:
        """Set when the supervisor wants the child to finish."""
        return self._running.stop_event

    def started(self, value: object = None) -> None:
        """Tell the supervisor the child is ready; ``value`` is returned by
        :meth:`Supervisor.start_child`."""
        run = self._running
        if not run.ready.is_set():
            run.value = value
            run.started_ok = True
            run.state = "running"
            run.ready.set()

    def expose(self, inspect: Callable[[], Mapping[str, Any] | SupervisorSnapshot]) -> None:
        """Give the supervisor a way to describe this child in snapshots."""
        self._running.inspect = inspect


@attrs.define(eq=False)
class _Running:
    spec: ChildSpec
    restarts: int = 0
    last_crash: str | None = None
    history: tuple[float, ...] = ()
    state: ChildState = "starting"
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    stop_event: trio.Event = attrs.field(factory=trio.Event)
    ready: trio.Event = attrs.field(factory=trio.Event)
    done: trio.Event = attrs.field(factory=trio.Event)
    exit: Exit | None = None
    value: object = None
    stopping: bool = False
    started_ok: bool = False
    orphaned: bool = False
    """Whoever started it stopped waiting for its start (cancelled): how the
    start ends is the supervisor loop's to handle."""
    inspect: Callable[[], Mapping[str, Any] | SupervisorSnapshot] | None = None

    def renew(self) -> None:
        self.scope = trio.CancelScope()
        self.stop_event = trio.Event()
        self.ready = trio.Event()
        self.done = trio.Event()
        self.exit = None
        self.value = None
        self.stopping = False
        self.started_ok = False
        self.orphaned = False
        self.state = "starting"
        self.inspect = None


class Supervisor:
    """Runs children and restarts them by ``strategy``.

    Use :meth:`run` inside a nursery (``await nursery.start(sup.run)``), or as
    a child of another supervisor through :meth:`child_spec`.  :meth:`run`
    returns after :meth:`request_stop` once every child stopped (in reverse
    start order), and raises :class:`SupervisorGaveUp` when the restart
    intensity is exceeded.
    """

    def __init__(
        self,
        name: str,
        children: tuple[ChildSpec, ...] | list[ChildSpec] = (),
        *,
        strategy: Strategy = Strategy.ONE_FOR_ONE,
        intensity: Intensity = Intensity(),
        backoff: Backoff = Backoff(),
        max_children: int = 100_000,
        now: Callable[[], float] = trio.current_time,
    ) -> None:
        self.name = name
        self.strategy = strategy
        self.intensity = intensity
        self.backoff = backoff
        self.max_children = max_children
        self._now = now
        self._initial = list(children)
        self._children: dict[str, _Running] = {}
        self._exits_send, self._exits_recv = trio.open_memory_channel[tuple[_Running, Exit]](
            max_children + 1
        )
        self._nursery: trio.Nursery | None = None
        self._lock = trio.Lock()
        self._stop = trio.Event()
        self._stopped = trio.Event()
        self._running = trio.Event()
        """Set while :meth:`run` supervises (a new one between runs)."""
        self._giving_up = False
        """This run gave up: its children are being stopped, its nursery
        closes; a child asked for now is for the next run."""
        self._runs = 0
        self.total_restarts = 0

    # ------------------------------------------------------------------ public

    async def run(
        self, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Start the children in order, then supervise.  A checkpoint; returns
        once stopped.  If cancelled, the children are cancelled at once.  A
        supervisor that gave up may be run again (its own supervisor
        restarts it): it starts empty."""
        if self._stopped.is_set():
            self._stopped = trio.Event()  # this run's end, not the last one's
        self._runs += 1
        self._giving_up = False
        gave_up: SupervisorGaveUp | None = None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    for spec in self._initial:
                        await self._start_new(spec, initial=True)
                except ChildStartError:
                    await self._stop_all()
                    raise
                task_status.started(self)
                self._running.set()
                gave_up = await self._supervise()
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # a start failure of an initial child: raise it bare
            if len(group.exceptions) == 1 and isinstance(group.exceptions[0], ChildStartError):
                raise group.exceptions[0] from None
            raise
        finally:
            self._nursery = None
            self._giving_up = False
            if self._running.is_set():  # (one made when it gave up is waited on)
                self._running = trio.Event()
            self._stopped.set()
        if gave_up is not None:
            raise gave_up

    def request_stop(self) -> None:
        """Ask the supervisor to stop its children (reverse order) and return."""
        self._stop.set()
        self._wake()

    @property
    def stopping(self) -> bool:
        """Asked to stop (its children going down for good, not for a restart)."""
        return self._stop.is_set()

    async def stop(self) -> None:
        """Stop and wait until every child is down.  A checkpoint."""
        self.request_stop()
        await self._stopped.wait()

    async def start_child(self, spec: ChildSpec) -> object:
        """Add a dynamic child and start it after the existing ones.  Returns
        the value the child passed to ``started``.  Raises
        :class:`ChildStartError` if it failed before it was ready (it is then
        not kept), :class:`DuplicateChild` or :class:`TooManyChildren`.
        While the supervisor is between two runs (it gave up and its own
        supervisor is starting it again) this waits for the next run; a
        supervisor asked to stop raises RuntimeError."""
        while True:
            while self._between_runs():
                await self._running.wait()
            async with self._lock:
                if self._between_runs():
                    continue  # it gave up while this waited for the lock
                if self._nursery is None or self._stop.is_set():
                    raise RuntimeError(f"supervisor {self.name!r} is not running")
                return await self._start_new(spec, initial=False)

    def _between_runs(self) -> bool:
        """It ran and gave up (or is giving up), and may be run again (not
        asked to stop)."""
        return (
            self._runs > 0
            and (self._nursery is None or self._giving_up)
            and not self._stop.is_set()
        )

    async def terminate_child(self, child_id: str) -> None:
        """Stop a child gracefully and drop it (it is not restarted)."""
        async with self._lock:
            run = self._children.get(child_id)
            if run is None:
                return
            await self._stop_child(run)
            self._remove(run)

    def which_children(self) -> list[str]:
        return list(self._children)

    def snapshot(self) -> SupervisorSnapshot:
        children = []
        for run in self._children.values():
            details: Mapping[str, Any] | SupervisorSnapshot | None = None
            if run.inspect is not None and run.state == "running":
                details = run.inspect()
            children.append(
                ChildSnapshot(
                    id=run.spec.id,
                    kind=run.spec.kind,
                    state=run.state,
                    restarts=run.restarts,
                    last_crash=run.last_crash,
                    details=details,
                )
            )
        return SupervisorSnapshot(self.name, self.strategy.value, tuple(children))

    def child_spec(
        self, id: str | None = None, *, restart: Restart = Restart.PERMANENT
    ) -> ChildSpec:
        """A spec that runs this supervisor as a child of another one."""

        async def start(child: Child) -> None:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.run)
                child.expose(self.snapshot)
                child.started(self)
                nursery.start_soon(self._watch_parent_stop, child)
                await self._stopped.wait()
                nursery.cancel_scope.cancel()

        return ChildSpec(
            id=id or self.name,
            start=start,
            restart=restart,
            shutdown_s=math.inf,
            kind="supervisor",
        )

    # ------------------------------------------------------------------ internals

    async def _watch_parent_stop(self, child: Child) -> None:
        await child.stop_requested.wait()
        self.request_stop()

    def _wake(self) -> None:
        # a sentinel exit record wakes the loop; it is recognised by identity
        # if the queue is full the loop has work queued and will see the flag
        with contextlib.suppress(trio.WouldBlock):
            self._exits_send.send_nowait((_WAKE, Exit("normal")))

    async def _start_new(self, spec: ChildSpec, *, initial: bool) -> object:
        if spec.id in self._children:
            raise DuplicateChild(spec.id)
        if len(self._children) >= self.max_children:
            raise TooManyChildren(f"{self.name}: at most {self.max_children} children")
        run = _Running(spec)
        self._children[spec.id] = run
        try:
            return await self._launch(run)
        except ChildStartError:
            self._children.pop(spec.id, None)
            if spec.on_removed is not None:
                spec.on_removed()
            raise

    async def _launch(self, run: _Running) -> object:
        """Start one incarnation and wait until it is ready.  Raises
        :class:`ChildStartError` if it exits first."""
        assert self._nursery is not None
        run.renew()
        self._nursery.start_soon(self._child_task, run, name=f"{self.name}/{run.spec.id}")
        try:
            await run.ready.wait()
        except BaseException:
            # the caller gave up waiting (cancelled; the start has not ended,
            # as the wait began before the child ran): a start that fails
            # now would be reported to nobody, and the child kept for good,
            # neither running nor removed; the loop drops it instead
            run.orphaned = True
            raise
        if not run.started_ok:
            # it finished before calling started(): a start failure
            assert run.exit is not None
            raise ChildStartError(f"{run.spec.id}: {run.exit.describe()}") from run.exit.error
        return run.value

    async def _child_task(self, run: _Running) -> None:
        exit_ = Exit("normal")
        with run.scope:
            try:
                await run.spec.start(Child(run))
            except Exception as exc:
                exit_ = Exit("crash", exc)
        if run.scope.cancelled_caught:
            exit_ = Exit("shutdown") if run.stopping else Exit("killed")
        elif run.stopping and exit_.kind == "normal":
            exit_ = Exit("shutdown")
        run.exit = exit_
        if exit_.abnormal:
            run.last_crash = exit_.describe()
        started = run.started_ok
        run.state = "stopped"
        run.done.set()
        if not run.ready.is_set():
            run.ready.set()  # wakes _launch, which reports a start failure
            if run.orphaned:  # ... unless it stopped waiting: then the loop
                self._exits_send.send_nowait((run, exit_))
            return
        if not run.stopping and started:
            self._exits_send.send_nowait((run, exit_))

    async def _stop_child(self, run: _Running) -> None:
        if run.done.is_set():
            return
        run.stopping = True
        run.state = "stopping"
        run.stop_event.set()
        with trio.move_on_after(run.spec.shutdown_s):
            await run.done.wait()
        if not run.done.is_set():
            run.scope.cancel()
            await run.done.wait()

    def _remove(self, run: _Running) -> None:
        if self._children.get(run.spec.id) is run:
            del self._children[run.spec.id]
            if run.spec.on_removed is not None:
                run.spec.on_removed()

    async def _stop_all(self) -> None:
        for run in reversed(list(self._children.values())):
            await self._stop_child(run)

    async def _supervise(self) -> SupervisorGaveUp | None:
        while True:
            if self._stop.is_set():
                async with self._lock:
                    await self._stop_all()
                    for run in reversed(list(self._children.values())):
                        self._remove(run)
                return None
            run, exit_ = await self._exits_recv.receive()
            if run is _WAKE or self._children.get(run.spec.id) is not run:
                continue
            async with self._lock:
                gave_up = await self._handle_exit(run, exit_)
            if gave_up is not None:
                return gave_up

    async def _handle_exit(self, run: _Running, exit_: Exit) -> SupervisorGaveUp | None:
        if run.orphaned and not run.started_ok:
            # a start that failed with no one waiting for it: dropped, as
            # :meth:`_start_new` drops one it reports to its caller
            self._remove(run)
            return None
        if not should_restart(run.spec.restart, abnormal=exit_.abnormal):
            self._remove(run)
            return None
        history, exceeded = add_restart(run.history, self._now(), self.intensity)
        run.history = history
        reason = exit_.describe()
        if exceeded:
            mark("supervisor.gave_up")
            # from now on a child asked for waits for the next run (this
            # one's nursery will take none)
            self._giving_up = True
            self._running = trio.Event()
            log.error(
                "supervisor %s gives up: %s exited (%s) more than %d times in %g s",
                self.name,
                run.spec.id,
                reason,
                self.intensity.max_restarts,
                self.intensity.period_s,
                extra={"supervisor": self.name, "child_id": run.spec.id, "reason": reason},
            )
            await self._stop_all()
            for other in reversed(list(self._children.values())):
                self._remove(other)
            return SupervisorGaveUp(self.name, run.spec.id, reason)
        order = list(self._children)
        to_restart = [
            self._children[i] for i in children_to_restart(self.strategy, order, run.spec.id)
        ]
        for other in reversed(to_restart):
            if other is not run:
                await self._stop_child(other)
        for other in to_restart:
            other.state = "restarting"
        delay = restart_delay_s(history, self.backoff)
        mark("supervisor.restart")
        for other in to_restart:
            why = reason if other is run else f"{self.strategy.value} after {run.spec.id}: {reason}"
            log.warning(
                "supervisor %s restarts %s (%s)",
                self.name,
                other.spec.id,
                why,
                extra={
                    "supervisor": self.name,
                    "child_id": other.spec.id,
                    "reason": why,
                    "restarts": other.restarts + 1,
                    "delay_s": delay,
                },
            )
        if delay > 0:
            await trio.sleep(delay)
        for other in to_restart:
            if self._stop.is_set():
                return None
            if other is not run and other.spec.restart is Restart.TEMPORARY:
                self._remove(other)
                continue
            other.restarts += 1
            self.total_restarts += 1
            try:
                await self._launch(other)
            except ChildStartError as exc:
                other.last_crash = str(exc)
                # a failed restart counts as another exit of that child
                self._exits_send.send_nowait((other, Exit("crash", exc)))
                return None
        return None


_WAKE: Any = object()
