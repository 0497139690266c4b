"""Actors: a behaviour (plain functions) driven by one async mailbox loop."""

from __future__ import annotations

import abc
import heapq
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import attrs
import outcome
import trio

from supervisors import Child, ChildSpec, ChildStartError, Restart

from ..marks import mark
from ..world import World
from ._effects import (
    Ask,
    Await,
    AwaitInline,
    CancelTimer,
    Down,
    Effects,
    ExitReason,
    Monitor,
    Reply,
    Request,
    Send,
    StartTimer,
    Stop,
    TrySend,
)
from ._mailbox import EMPTY, ActorDead, Mailbox, MailboxFull

if TYPE_CHECKING:
    from ._registry import Registry

__all__ = [
    "ActorContext",
    "ActorExited",
    "ActorRef",
    "ActorStats",
    "Behaviour",
    "CallTimeout",
    "FunctionBehaviour",
    "ReplyTo",
    "actor_child_spec",
    "spawn",
]

S = TypeVar("S")


class CallTimeout(Exception):
    """No reply within ``timeout_s``.  A reply that comes later is dropped
    and counted in the replying actor's ``late_replies``."""


class ActorExited(Exception):
    """The actor stopped before it answered."""

    def __init__(self, name: str, reason: ExitReason) -> None:
        super().__init__(f"actor {name!r} stopped before replying ({reason.describe()})")
        self.name = name
        self.reason = reason


@attrs.frozen
class ActorContext:
    """What ``Behaviour.init`` may use: its own ref, the world, the registry."""

    name: str
    self_ref: ActorRef
    world: World
    registry: Registry | None


class Behaviour(abc.ABC, Generic[S]):
    """How an actor behaves.  ``init`` builds the state (it may await the
    store); ``handle`` is a plain function of the state, one message and
    ``now`` that returns effects; it may mutate the state it owns.  An
    exception from ``handle`` crashes the actor."""

    mailbox_size: int = 1024
    """The bound of the mailbox (overflow policy: senders wait)."""
    idle_s: float | None = None
    """Stop after this long without a message (passivation); ``None``: never."""
    max_inflight: int = 64
    """Awaited effects running at once."""
    max_timers: int = 64

    async def init(self, ctx: ActorContext) -> S:
        raise NotImplementedError

    @abc.abstractmethod
    def handle(self, state: S, msg: Any, now: float) -> Effects: ...

    def terminate(self, state: S, reason: ExitReason) -> Effects:
        """Effects to perform on a graceful stop (not on a crash)."""
        return ()

    def caught_up(self, state: S, now: float) -> Effects:
        """Effects to perform when no message is waiting (the mailbox is
        drained): for work that should gather everything that arrived, such
        as a commit group.  Called only by behaviours that override it."""
        return ()

    def can_passivate(self, state: S) -> bool:
        return True

    def describe(self, state: S) -> Mapping[str, Any]:
        """Extra fields for snapshots."""
        return {}


class FunctionBehaviour(Behaviour[S]):
    """A behaviour from two functions."""

    def __init__(
        self,
        init: Callable[[ActorContext], S],
        handle: Callable[[S, Any, float], Effects],
        *,
        mailbox_size: int = 1024,
        idle_s: float | None = None,
    ) -> None:
        self._init = init
        self._handle = handle
        self.mailbox_size = mailbox_size
        self.idle_s = idle_s

    async def init(self, ctx: ActorContext) -> S:
        return self._init(ctx)

    def handle(self, state: S, msg: Any, now: float) -> Effects:
        return self._handle(state, msg, now)


@attrs.frozen
class ActorStats:
    name: str
    alive: bool
    mailbox_depth: int
    mailbox_bound: int
    system_depth: int
    handled: int
    inflight: int
    timers: int
    late_replies: int
    dead_letters: int
    restarts: int = 0


class ReplyTo:
    """A one-shot reply slot.  Made by ``call`` only."""

    __slots__ = ("_abandoned", "_error", "_event", "_notify", "_value")

    def __init__(self, _token: object) -> None:
        if _token is not _PRIVATE:
            raise TypeError("ReplyTo is made by ActorRef.call")
        self._event = trio.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self._abandoned = False
        # an asking actor's hook, called on the answer (no task waits for it)
        self._notify: Callable[[ReplyTo], None] | None = None

    @property
    def answered(self) -> bool:
        return self._event.is_set()

    def _answer(self, value: Any = None, error: BaseException | None = None) -> bool:
        if self._event.is_set():
            return True  # a second answer is a no-op
        if self._abandoned:
            return False
        self._value = value
        self._error = error
        self._event.set()
        if self._notify is not None:
            self._notify(self)
        return True


_PRIVATE = object()
_STOP = object()
_BURST = 16  # messages an actor takes between checkpoints


class ActorRef:
    """A handle on one incarnation of an actor.  Cannot be made by hand."""

    __slots__ = ("_actor", "name")

    def __init__(self, actor: _Actor, _token: object) -> None:
        if _token is not _PRIVATE:
            raise TypeError("actor refs are made by spawn()")
        self._actor = actor
        self.name = actor.name

    def __repr__(self) -> str:
        return f"<ActorRef {self.name!r}{'' if self.alive else ' (dead)'}>"

    @property
    def alive(self) -> bool:
        return not self._actor.mailbox.closed

    async def send(self, msg: Any) -> None:
        """Wait for room in the mailbox, then enqueue (backpressure).  A
        checkpoint; raises :class:`ActorDead` if the actor has stopped.  If
        cancelled while waiting, the message was not sent."""
        await self._actor.mailbox.put(msg)

    def try_send(self, msg: Any) -> bool:
        """Enqueue if there is room, else return False.  Never blocks; raises
        :class:`ActorDead` if the actor has stopped."""
        return self._actor.mailbox.try_put(msg)

    async def call(self, body: Any, *, timeout_s: float = 5.0) -> Any:
        """Send ``Request(body, reply_to)`` and wait for the reply; the time
        spent waiting for room in the mailbox counts.  Raises
        :class:`CallTimeout`, :class:`ActorDead`, :class:`ActorExited` (it
        stopped or crashed before answering), or the error it replied with.
        If cancelled, the request may still be handled; its reply is dropped."""
        try:
            with trio.fail_after(timeout_s):
                return await self._call(body)
        except trio.TooSlowError:
            raise CallTimeout(f"{self.name}: no reply within {timeout_s} s") from None

    async def request(self, body: Any, on_reply: Callable[[outcome.Outcome[Any]], None]) -> None:
        """Send ``Request(body, reply_to)`` and return once it is in the
        mailbox (waiting for room: backpressure; senders keep their order);
        the reply is handed to ``on_reply`` in the answering task, which it
        must not block (an actor that stops first answers ``ActorExited``).
        No task waits for the reply and there is no timeout: the target
        answers every request.  A checkpoint if it has to wait; raises
        :class:`ActorDead` (then ``on_reply`` is never called).  If
        cancelled while waiting, nothing was sent."""
        reply = ReplyTo(_PRIVATE)

        def answered(slot: ReplyTo) -> None:
            if slot._error is not None:
                assert isinstance(slot._error, Exception)
                on_reply(outcome.Error(slot._error))
            else:
                on_reply(outcome.Value(slot._value))

        reply._notify = answered
        await self._actor.mailbox.push(Request(body, reply))

    async def _call(self, body: Any) -> Any:
        """``call`` without a deadline of its own (the caller's scope has one)."""
        reply = ReplyTo(_PRIVATE)
        try:
            await self._actor.mailbox.push(Request(body, reply))
            await reply._event.wait()
        finally:
            if not reply._event.is_set():
                reply._abandoned = True
        if reply._error is not None:
            raise reply._error
        return reply._value

    def monitor(self, watcher: ActorRef) -> int:
        """Deliver :class:`Down` to ``watcher`` when this actor stops (at
        once, with reason ``noproc``, if it already has).  Returns an id for
        :meth:`demonitor`."""
        return self._actor.add_monitor(watcher)

    def demonitor(self, monitor_id: int) -> None:
        self._actor.monitors.pop(monitor_id, None)

    async def wait_stopped(self) -> ExitReason:
        """Wait until the actor has stopped; returns why.  A checkpoint."""
        await self._actor.exited.wait()
        assert self._actor.exit_reason is not None
        return self._actor.exit_reason

    async def stop(self) -> ExitReason:
        """Ask the actor to stop after the message it is handling, run its
        ``terminate``, and wait until it has stopped.  A checkpoint."""
        self._actor.mailbox.put_system(_STOP)
        return await self.wait_stopped()

    def statistics(self) -> ActorStats:
        return self._actor.statistics()

    @property
    def exit_reason(self) -> ExitReason | None:
        """Why it stopped; None while it runs."""
        return self._actor.exit_reason

    @property
    def started(self) -> bool:
        """Whether this incarnation's ``init`` completed: False while it
        starts, and for good if its start failed (it never ran)."""
        return self._actor.started


class _Timer:
    """A started timer: its effect and when it fires next."""

    __slots__ = ("due_s", "effect", "key")

    def __init__(self, effect: StartTimer, due_s: float) -> None:
        self.effect = effect
        self.key = effect.key
        self.due_s = due_s


class _Actor:
    def __init__(
        self,
        name: str,
        behaviour: Behaviour[Any],
        world: World,
        registry: Registry | None,
        restarts: int = 0,
    ) -> None:
        self.name = name
        self.behaviour = behaviour
        self.world = world
        self.registry = registry
        self.mailbox = Mailbox(
            behaviour.mailbox_size,
            system_bound=behaviour.max_inflight + behaviour.max_timers + 1024 + 1,
        )
        self.ref = ActorRef(self, _PRIVATE)
        self.monitors: dict[int, ActorRef] = {}
        self._next_monitor = 0
        self.pending: dict[ReplyTo, None] = {}
        self.timers: dict[str, _Timer] = {}
        # the timers by due time, with stale entries (replaced or cancelled
        # timers, skipped when they come up; compacted when they outnumber
        # the live ones): one task fires them all (_fire_timers)
        self._timer_heap: list[tuple[float, int, _Timer]] = []
        self._timer_seq = 0
        self._timer_scope: trio.CancelScope | None = None
        self.inflight = 0
        self.handled = 0
        self.late_replies = 0
        self.dead_letters = 0
        self.restarts = restarts
        self.exited = trio.Event()
        self.exit_reason: ExitReason | None = None
        self.started = False
        """Its ``init`` completed (it ran, if only briefly)."""
        self.state: Any = None
        self._nursery: trio.Nursery | None = None
        # asks awaiting their reply: the effect, its deadline, the target's name
        self._asks: dict[ReplyTo, tuple[Ask, float, str]] = {}
        self._ask_timer: trio.CancelScope | None = None
        self._unyielded = 0
        # the outcome of an AwaitInline: the next message handled
        self._next: Any = EMPTY
        self._catches_up = type(behaviour).caught_up is not Behaviour.caught_up

    # ------------------------------------------------------------- lifecycle

    async def run(self, on_ready: Callable[[ActorRef], None]) -> ExitReason:
        """Run until stopped; returns the reason, or raises what crashed it."""
        reason = ExitReason("shutdown")
        crash: Exception | None = None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    self.state = await self.behaviour.init(
                        ActorContext(self.name, self.ref, self.world, self.registry)
                    )
                    self.started = True
                    on_ready(self.ref)
                    reason = await self._loop()
                    if reason.kind in ("normal", "shutdown"):
                        await self._perform(self.behaviour.terminate(self.state, reason))
                except Exception as exc:
                    crash = exc
                    reason = ExitReason("crash", exc)
                nursery.cancel_scope.cancel()
        finally:
            self._finish(reason)
        if crash is not None:
            raise crash
        return reason

    def _finish(self, reason: ExitReason) -> None:
        self.exit_reason = reason
        left = self.mailbox.close()
        self.timers.clear()
        self._timer_heap.clear()
        for reply in self._asks:
            reply._notify = None
            reply._abandoned = True
        self._asks.clear()
        if self._ask_timer is not None:
            self._ask_timer.cancel()
        error = ActorExited(self.name, reason)
        for reply in list(self.pending):
            reply._answer(error=error)
        self.pending.clear()
        for msg in left:
            if isinstance(msg, Request):
                msg.reply_to._answer(error=error)
        for monitor_id, watcher in list(self.monitors.items()):
            _deliver_down(watcher, Down(self.ref, reason, monitor_id))
        self.monitors.clear()
        self.exited.set()

    def add_monitor(self, watcher: ActorRef) -> int:
        self._next_monitor += 1
        monitor_id = self._next_monitor
        if self.exited.is_set():
            _deliver_down(watcher, Down(self.ref, ExitReason("noproc"), monitor_id))
        else:
            if len(self.monitors) >= 1024:
                raise MailboxFull(f"{self.name}: at most 1024 monitors")
            self.monitors[monitor_id] = watcher
        return monitor_id

    # ------------------------------------------------------------- the loop

    async def _loop(self) -> ExitReason:
        behaviour = self.behaviour
        clock = self.world.clock
        mailbox = self.mailbox
        while True:
            take_user = self.inflight < behaviour.max_inflight
            # Up to _BURST messages that are already waiting are taken without
            # a checkpoint (each checkpoint is a trip through trio's run
            # loop); then the loop yields, so that a busy actor cannot starve
            # the others, and notices cancellation.
            msg: Any = self._next
            if msg is not EMPTY:
                self._next = EMPTY
            elif self._unyielded >= _BURST:
                # the turn is over: yield, then look again (not a wait on
                # the mailbox: emptied by this turn, it would skip
                # ``caught_up`` until some later message came, if any did)
                self._unyielded = 0
                await trio.lowlevel.checkpoint()
                continue
            else:
                msg = mailbox.get_nowait(user=take_user)
                if msg is EMPTY and self._catches_up:
                    caught = list(behaviour.caught_up(self.state, clock.now_s()))
                    if caught:
                        stop = await self._perform(caught)
                        if stop is not None:
                            return ExitReason(stop.kind)
                        continue
            if msg is not EMPTY:
                self._unyielded += 1
            else:
                self._unyielded = 0
                idle_s = behaviour.idle_s
                if idle_s is not None and not self.timers and not self.inflight:
                    msg = _STOP  # replaced unless the idle deadline passes
                    got = False
                    with trio.move_on_after(idle_s):
                        msg = await mailbox.get(user=take_user)
                        got = True
                    if not got:
                        if len(mailbox) == 0 and behaviour.can_passivate(self.state):
                            mark("actor.passivated")
                            return ExitReason("idle")
                        continue
                else:
                    msg = await mailbox.get(user=take_user)
            if msg is _STOP:
                return ExitReason("shutdown")
            if isinstance(msg, Request):
                self.pending[msg.reply_to] = None
            effects = behaviour.handle(self.state, msg, clock.now_s())
            self.handled += 1
            stop = await self._perform(effects)
            if stop is not None:
                return ExitReason(stop.kind)

    async def _perform(self, effects: Effects) -> Stop | None:
        stop: Stop | None = None
        for effect in effects:
            if isinstance(effect, Reply):
                self.pending.pop(effect.to, None)
                if not effect.to._answer(effect.value, effect.error):
                    self.late_replies += 1
            elif isinstance(effect, Send):
                # a target that cannot start now (its init failed: the store
                # away) is a dead letter, as a dead one: it starts from the
                # store when it can; this actor does not crash in a loop
                try:
                    target = await self._resolve(effect.to)
                    await target._actor.mailbox.push(effect.msg)
                except (ActorDead, ChildStartError):
                    self.dead_letters += 1
            elif isinstance(effect, TrySend):
                try:
                    target = await self._resolve(effect.to)
                    if not target.try_send(effect.msg):
                        self.dead_letters += 1
                except (ActorDead, ChildStartError):
                    self.dead_letters += 1
            elif isinstance(effect, StartTimer):
                self._start_timer(effect)
            elif isinstance(effect, CancelTimer):
                self.timers.pop(effect.key, None)  # its heap entry is stale now
            elif isinstance(effect, Await):
                assert self._nursery is not None
                self.inflight += 1
                self._nursery.start_soon(self._await, effect)
            elif isinstance(effect, AwaitInline):
                assert self._next is EMPTY, "one AwaitInline per step"
                result: outcome.Outcome[Any]
                try:
                    result = outcome.Value(await effect.fn())
                except Exception as exc:
                    result = outcome.Error(exc)
                self._next = effect.then(result)
            elif isinstance(effect, Ask):
                await self._ask(effect)
            elif isinstance(effect, Monitor):
                effect.target.monitor(self.ref)
            elif isinstance(effect, Stop):
                stop = effect
            else:
                raise TypeError(f"{self.name}: not an effect: {effect!r}")
        return stop

    async def _resolve(self, to: ActorRef | str) -> ActorRef:
        if isinstance(to, ActorRef):
            return to
        if self.registry is None:
            raise RuntimeError(f"{self.name}: no registry to resolve {to!r}")
        ref = self.registry.lookup(to)  # the common case: alive, no checkpoint
        if ref is not None:
            return ref
        return await self.registry.get(to)

    def _start_timer(self, effect: StartTimer) -> None:
        assert self._nursery is not None
        self.timers.pop(effect.key, None)  # replaced: its heap entry is stale now
        if len(self.timers) >= self.behaviour.max_timers:
            raise MailboxFull(f"{self.name}: at most {self.behaviour.max_timers} timers")
        # trio's time, as trio.sleep's: the deadline is a cancel scope's
        due_s = trio.current_time() + effect.delay_s if effect.at_s is None else effect.at_s
        timer = _Timer(effect, due_s)
        self.timers[effect.key] = timer
        heap = self._timer_heap
        if len(heap) >= 2 * len(self.timers) + 16:
            heap[:] = [entry for entry in heap if self.timers.get(entry[2].key) is entry[2]]
            heapq.heapify(heap)
        self._push_timer(timer)
        scope = self._timer_scope
        if scope is None:
            self._timer_scope = scope = trio.CancelScope(deadline=due_s)
            self._nursery.start_soon(self._fire_timers, scope)
        elif due_s < scope.deadline:
            scope.deadline = due_s

    def _push_timer(self, timer: _Timer) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timer_heap, (timer.due_s, self._timer_seq, timer))

    async def _fire_timers(self, scope: trio.CancelScope) -> None:
        """Deliver the timers that are due; one task for all of an actor's
        timers (started with its first), sleeping until the earliest.  Timers
        due at one instant fire in the order they were started."""
        heap = self._timer_heap
        timers = self.timers
        while True:
            with scope:
                await trio.sleep_forever()
            now = trio.current_time()
            again: list[_Timer] = []
            while heap and heap[0][0] <= now:
                timer = heapq.heappop(heap)[2]
                if timers.get(timer.key) is not timer:
                    continue  # replaced or cancelled
                effect = timer.effect
                if effect.repeat and effect.at_s is None:
                    timer.due_s = now + effect.delay_s
                    again.append(timer)  # after this round, even with no delay
                else:
                    del timers[timer.key]
                self.mailbox.put_system(effect.msg)
            for timer in again:
                self._push_timer(timer)
            while heap and timers.get(heap[0][2].key) is not heap[0][2]:
                heapq.heappop(heap)
            scope = trio.CancelScope(deadline=heap[0][0] if heap else math.inf)
            self._timer_scope = scope

    async def _ask(self, effect: Ask) -> None:
        """Send the request; the reply comes back through the reply slot's
        hook (no task waits for it), a timeout through :meth:`_expire`."""
        assert self._nursery is not None
        reply = ReplyTo(_PRIVATE)
        request = Request(effect.body, reply)
        try:
            target = await self._resolve(effect.to)
            deadline = self.world.clock.now_s() + effect.timeout_s
            # registered before the send: the target may answer during it
            self._asks[reply] = (effect, deadline, target.name)
            reply._notify = self._answered
            self.inflight += 1
            await target._actor.mailbox.push(request)
        except Exception as exc:
            if self._asks.pop(reply, None) is not None:
                self.inflight -= 1
            reply._notify = None
            self.mailbox.put_system(effect.then(outcome.Error(exc)))
            return
        if self._ask_timer is None:
            self._ask_timer = trio.CancelScope(deadline=deadline)
            self._nursery.start_soon(self._expire, self._ask_timer)
        elif deadline < self._ask_timer.deadline:
            self._ask_timer.deadline = deadline

    def _answered(self, reply: ReplyTo) -> None:
        """A reply slot's hook: runs in the answering task, never blocks."""
        entry = self._asks.pop(reply, None)
        if entry is None:
            return
        self.inflight -= 1
        result: outcome.Outcome[Any]
        if reply._error is not None:
            assert isinstance(reply._error, Exception)
            result = outcome.Error(reply._error)
        else:
            result = outcome.Value(reply._value)
        try:
            self.mailbox.put_system(entry[0].then(result))
        except MailboxFull:
            # cannot happen within the bounds (an ask counts in max_inflight,
            # which the system lane's bound includes); never the answerer's
            # problem
            self.dead_letters += 1

    async def _expire(self, scope: trio.CancelScope) -> None:
        """Time out asks whose deadline passed; one task for all of an
        actor's asks, sleeping until the earliest deadline, gone when none
        is left."""
        while True:
            with scope:
                await trio.sleep_forever()
            now = self.world.clock.now_s()
            for reply, (effect, deadline, target) in list(self._asks.items()):
                if deadline <= now:
                    del self._asks[reply]
                    self.inflight -= 1
                    reply._notify = None
                    reply._abandoned = True
                    error = CallTimeout(f"{target}: no reply within {effect.timeout_s} s")
                    self.mailbox.put_system(effect.then(outcome.Error(error)))
            if not self._asks:
                self._ask_timer = None
                return
            scope = trio.CancelScope(deadline=min(d for _, d, _ in self._asks.values()))
            self._ask_timer = scope

    async def _await(self, effect: Await) -> None:
        result: outcome.Outcome[Any]
        try:
            result = outcome.Value(await effect.fn())
        except Exception as exc:
            result = outcome.Error(exc)
        finally:
            self.inflight -= 1
        self.mailbox.put_system(effect.then(result))

    def statistics(self) -> ActorStats:
        return ActorStats(
            name=self.name,
            alive=not self.mailbox.closed,
            mailbox_depth=len(self.mailbox),
            mailbox_bound=self.mailbox.bound,
            system_depth=self.mailbox.system_depth,
            handled=self.handled,
            inflight=self.inflight,
            timers=len(self.timers),
            late_replies=self.late_replies,
            dead_letters=self.dead_letters,
            restarts=self.restarts,
        )

    def describe(self) -> dict[str, Any]:
        stats = self.statistics()
        out: dict[str, Any] = {
            "name": stats.name,
            "mailbox_depth": stats.mailbox_depth,
            "mailbox_bound": stats.mailbox_bound,
            "handled": stats.handled,
            "inflight": stats.inflight,
            "late_replies": stats.late_replies,
            "dead_letters": stats.dead_letters,
        }
        if self.state is not None:
            out.update(self.behaviour.describe(self.state))
        return out


def _deliver_down(watcher: ActorRef, down: Down) -> None:
    try:
        watcher._actor.mailbox.put_system(down)
    except MailboxFull:
        watcher._actor.dead_letters += 1


async def spawn(
    nursery: trio.Nursery,
    behaviour: Behaviour[Any],
    *,
    name: str,
    world: World,
    registry: Registry | None = None,
) -> ActorRef:
    """Start an unsupervised actor in ``nursery``; returns once ``init`` is
    done.  A crash stops only the actor (see ``wait_stopped`` and
    ``monitor``); an exception from ``init`` is raised here."""
    actor = _Actor(name, behaviour, world, registry)

    async def run(task_status: trio.TaskStatus[ActorRef] = trio.TASK_STATUS_IGNORED) -> None:
        ready = False

        def on_ready(ref: ActorRef) -> None:
            nonlocal ready
            ready = True
            task_status.started(ref)

        try:
            await actor.run(on_ready)
        except Exception:
            if not ready:
                raise

    ref: ActorRef = await nursery.start(run, name=f"actor:{name}")
    return ref


def actor_child_spec(
    name: str,
    behaviour: Behaviour[Any],
    *,
    world: World,
    registry: Registry | None = None,
    restart: Restart = Restart.PERMANENT,
    shutdown_s: float = 5.0,
    on_ready: Callable[[ActorRef], None] | None = None,
    on_exit: Callable[[ActorRef], None] | None = None,
    on_removed: Callable[[], None] | None = None,
) -> ChildSpec:
    """A supervisor child that runs ``behaviour`` as the actor ``name``.
    Every (re)start is a new incarnation with a new ref and a fresh state
    from ``init``; ``on_ready``/``on_exit`` see each incarnation."""
    incarnation = -1

    async def start(child: Child) -> None:
        nonlocal incarnation
        incarnation += 1
        actor = _Actor(name, behaviour, world, registry, restarts=incarnation)

        def ready(ref: ActorRef) -> None:
            child.expose(actor.describe)
            if on_ready is not None:
                on_ready(ref)
            child.started(ref)

        crash: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_forward_stop, child, actor)
            try:
                await actor.run(ready)
            except Exception as exc:
                crash = exc
            finally:
                nursery.cancel_scope.cancel()
                if on_exit is not None:
                    on_exit(actor.ref)
        if crash is not None:
            raise crash

    return ChildSpec(
        id=name,
        start=start,
        restart=restart,
        shutdown_s=shutdown_s if math.isfinite(shutdown_s) else math.inf,
        on_removed=on_removed,
    )


async def _forward_stop(child: Child, actor: _Actor) -> None:
    await child.stop_requested.wait()
    actor.mailbox.put_system(_STOP)
