"""Actors addressed by name, spawned on first use, passivated when idle."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import outcome
import trio

from supervisors import Backoff, Intensity, Restart, Supervisor

from ..marks import mark
from ..world import World
from ._actor import ActorRef, ActorStats, Behaviour, CallTimeout, actor_child_spec
from ._mailbox import ActorDead

__all__ = ["Kind", "Registry", "UnknownActorKind"]


class UnknownActorKind(LookupError):
    pass


@attrs.frozen
class Kind:
    """How to make the actors whose names start with ``prefix``."""

    prefix: str
    factory: Callable[[str], Behaviour[Any]]
    restart: Restart = Restart.TRANSIENT
    shutdown_s: float = 5.0


@attrs.define(eq=False)
class _Entry:
    ref: ActorRef | None = None
    ready: trio.Event = attrs.field(factory=trio.Event)
    removed: bool = False
    incarnations: int = 0


class Registry:
    """Names (``session:<id>``, ``room:board:<id>``, ``presence:user:<id>``)
    to actors.  The first :meth:`get` of a name spawns its actor under this
    registry's supervisor; concurrent first uses get the same actor.  An
    actor that crashes is restarted by the supervisor (``get`` waits for the
    new incarnation); one that stops normally or passivates is forgotten and
    spawned again on next use."""

    def __init__(
        self,
        world: World,
        *,
        name: str = "registry",
        intensity: Intensity = Intensity(max_restarts=50, period_s=5.0),
        backoff: Backoff = Backoff(),
        max_actors: int = 100_000,
    ) -> None:
        self.world = world
        self.supervisor = Supervisor(
            name,
            intensity=intensity,
            backoff=backoff,
            max_children=max_actors,
            now=world.clock.now_s,
        )
        self._kinds: list[Kind] = []
        self._entries: dict[str, _Entry] = {}
        self._of_kind: dict[str, dict[str, None]] = {}
        """Per kind (its prefix): the names in ``_entries``, in spawn order."""
        self._turns: dict[str, trio.Lock] = {}
        """Per name, while requests wait for its actor (see :meth:`request`)."""
        self.spawned = 0
        self.exit_hooks: list[Callable[[str, ActorRef], None]] = []
        """Called (never blocking) when an incarnation of a named actor stops."""

    def define(self, kind: Kind) -> None:
        self._kinds.append(kind)
        self._kinds.sort(key=lambda k: -len(k.prefix))

    def _kind_for(self, name: str) -> Kind:
        for kind in self._kinds:
            if name.startswith(kind.prefix):
                return kind
        raise UnknownActorKind(name)

    def lookup(self, name: str) -> ActorRef | None:
        """The live actor of that name, without spawning.  Never blocks."""
        entry = self._entries.get(name)
        if entry is None or entry.ref is None or not entry.ref.alive:
            return None
        return entry.ref

    async def get(self, name: str) -> ActorRef:
        """The live actor of that name, spawned if needed.  A checkpoint.
        Raises ``ChildStartError`` if its ``init`` fails."""
        while True:
            entry = self._entries.get(name)
            if entry is None:
                return await self._spawn(name)
            ref = entry.ref
            if ref is not None and ref.alive:
                # the ref may stop during the checkpoint; callers get a
                # (possibly dead) ref, never None, and retry on ActorDead
                await trio.lowlevel.checkpoint()
                return ref
            await entry.ready.wait()

    async def send(self, name: str, msg: Any) -> None:
        """Send to the named actor, spawning it if needed; retries once the
        actor passivated or restarted between look-up and send."""
        while True:
            ref = await self.get(name)
            try:
                await ref.send(msg)
                return
            except ActorDead:
                await self._wait_gone(name, ref)

    async def request(
        self,
        name: str,
        body: Any,
        on_reply: Callable[[outcome.Outcome[Any]], None],
        *,
        guard: Callable[[], None] | None = None,
    ) -> None:
        """:meth:`ActorRef.request` on the named actor, spawning it if
        needed: returns once the request is in its mailbox.  ``guard`` is
        called before sending whenever the actor was not there to take it
        at once (that can take long, and the request may no longer be
        wanted: its caller gone); what it raises ends the request, unsent.

        Requests to one name reach it in the order they were made, also
        across an actor's absence: one that has to wait for it (spawning,
        restarting, gone) waits its turn, and those made while any waits
        queue behind it (a :class:`trio.Lock` per name, FIFO, only while
        someone waits).  Woken all at once, trio would run the waiters in
        either order: a stream's chunk sent on a connection that was then
        lost could land after the next chunk, sent on the new one (the
        simulator's seed 2191 of ``medium``, a registry restarted after
        10 s)."""
        turn = self._turns.get(name)
        if turn is None:
            ref = self.lookup(name)
            if ref is not None:
                try:
                    await ref.request(body, on_reply)
                    return
                except ActorDead:
                    pass
            turn = self._turns.get(name)
            if turn is None:
                turn = self._turns[name] = trio.Lock()
        try:
            async with turn:
                while True:
                    ref = self.lookup(name) or await self.get(name)
                    if guard is not None:
                        guard()
                    try:
                        await ref.request(body, on_reply)
                        return
                    except ActorDead:
                        await self._wait_gone(name, ref)
        finally:
            if (
                self._turns.get(name) is turn
                and not turn.locked()
                and not turn.statistics().tasks_waiting
            ):
                del self._turns[name]

    async def call(
        self,
        name: str,
        body: Any,
        *,
        timeout_s: float = 5.0,
        guard: Callable[[], Awaitable[None]] | None = None,
    ) -> Any:
        """``call`` on the named actor, spawning it if needed.  ``guard`` is
        awaited before sending whenever the actor was not there to take it
        at once (spawned, restarting, or gone between look-up and send: that
        can take long, and the body may no longer be wanted); what it raises
        ends the call."""
        try:
            with trio.fail_after(timeout_s):
                waited = False
                while True:
                    ref = self.lookup(name)
                    if ref is None:
                        waited = True
                        ref = await self.get(name)
                    if waited and guard is not None:
                        await guard()
                    try:
                        return await ref._call(body)
                    except ActorDead:
                        waited = True
                        await self._wait_gone(name, ref)
        except trio.TooSlowError:
            raise CallTimeout(f"{name}: no reply within {timeout_s} s") from None

    async def _wait_gone(self, name: str, ref: ActorRef) -> None:
        entry = self._entries.get(name)
        if entry is not None and entry.ref is ref:
            await entry.ready.wait()
        else:
            await trio.lowlevel.checkpoint()

    async def _spawn(self, name: str) -> ActorRef:
        kind = self._kind_for(name)
        entry = _Entry()
        self._entries[name] = entry
        of_kind = self._of_kind.setdefault(kind.prefix, {})
        of_kind[name] = None

        def on_ready(ref: ActorRef) -> None:
            entry.ref = ref
            entry.incarnations += 1
            if entry.incarnations > 1:
                mark("actor.restarted")
            entry.ready.set()

        def on_exit(ref: ActorRef) -> None:
            if entry.ref is ref:
                entry.ref = None
                old, entry.ready = entry.ready, trio.Event()
                old.set()
            for hook in self.exit_hooks:
                hook(name, ref)

        def on_removed() -> None:
            entry.removed = True
            if self._entries.get(name) is entry:
                del self._entries[name]
                del of_kind[name]
            entry.ready.set()

        spec = actor_child_spec(
            name,
            kind.factory(name),
            world=self.world,
            registry=self,
            restart=kind.restart,
            shutdown_s=kind.shutdown_s,
            on_ready=on_ready,
            on_exit=on_exit,
            on_removed=on_removed,
        )
        self.spawned += 1
        try:
            ref = await self.supervisor.start_child(spec)
        except BaseException:
            # given up before the supervisor took the child (cancelled while
            # it waited for the supervisor's next run or for its lock, or
            # the supervisor stopping): no incarnation will ever be ready,
            # so the entry goes, and whoever waits on it spawns again.  (One
            # the supervisor took goes on starting; if that start fails,
            # the supervisor drops it and ``on_removed`` runs.)
            if (
                self._entries.get(name) is entry
                and entry.ref is None
                and name not in self.supervisor.which_children()
            ):
                on_removed()
            raise
        assert isinstance(ref, ActorRef)
        return ref

    def names(self) -> list[str]:
        return list(self._entries)

    def names_of(self, prefix: str) -> list[str]:
        """The names of the kind defined with ``prefix``, live or starting
        (as :meth:`names`, without walking every other kind's)."""
        return list(self._of_kind.get(prefix, ()))

    def statistics(self) -> list[ActorStats]:
        out = []
        for entry in self._entries.values():
            if entry.ref is not None:
                out.append(entry.ref.statistics())
        return out
