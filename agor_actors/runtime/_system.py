"""The actor system: a root supervisor, a registry, and ``spawn``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from supervisors import ChildSpec, Intensity, Restart, Strategy, Supervisor, SupervisorSnapshot

from ..world import World
from ._actor import ActorRef, Behaviour, actor_child_spec
from ._registry import Kind, Registry

__all__ = ["ActorSystem", "open_system"]


class ActorSystem:
    """Owns the root of the supervision tree.  Made by :func:`open_system`."""

    def __init__(self, world: World, registry: Registry, root: Supervisor, spawned: Supervisor):
        self.world = world
        self.registry = registry
        self.root = root
        self._spawned = spawned

    def define(self, kind: Kind) -> None:
        self.registry.define(kind)

    async def spawn(
        self,
        behaviour: Behaviour[Any],
        *,
        name: str,
        restart: Restart = Restart.TEMPORARY,
        shutdown_s: float = 5.0,
    ) -> ActorRef:
        """Start an actor under the system's supervisor; returns once its
        ``init`` is done.  Raises ``ChildStartError`` if ``init`` fails."""
        spec = actor_child_spec(
            name,
            behaviour,
            world=self.world,
            registry=self.registry,
            restart=restart,
            shutdown_s=shutdown_s,
        )
        ref = await self._spawned.start_child(spec)
        assert isinstance(ref, ActorRef)
        return ref

    async def start_child(self, spec: ChildSpec) -> object:
        """Add any supervised child (a trio task) to the system."""
        return await self._spawned.start_child(spec)

    def snapshot(self) -> SupervisorSnapshot:
        return self.root.snapshot()


@asynccontextmanager
async def open_system(
    world: World,
    *,
    children: tuple[ChildSpec, ...] = (),
    name: str = "root",
    registry_intensity: Intensity | None = None,
) -> AsyncIterator[ActorSystem]:
    """Run an actor system for the duration of the block; on exit every
    actor is stopped in reverse start order (each given its ``shutdown_s``).
    ``children`` are started first, in order, under the root (one_for_one).
    ``registry_intensity``: how many restarts the registry's supervisor
    allows in how long before it gives up (stops every actor and fails to
    the root, which starts it again empty); the registry's own default
    otherwise."""
    registry = (
        Registry(world)
        if registry_intensity is None
        else Registry(world, intensity=registry_intensity)
    )
    spawned = Supervisor("spawned", now=world.clock.now_s)
    root = Supervisor(
        name,
        [*children, spawned.child_spec(), registry.supervisor.child_spec()],
        strategy=Strategy.ONE_FOR_ONE,
        now=world.clock.now_s,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(root.run)
        try:
            yield ActorSystem(world, registry, root, spawned)
        finally:
            with trio.CancelScope(shield=True):
                await root.stop()
