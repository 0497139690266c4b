"""The gate's cache against loads that straddle a change: a read begun
before a session's access changed must not land over what was read after
(a real SQLite store; the blocking seam holds a read's answer back, as a
worker thread's hop back to the loop does)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import trio

from agor_actors.services import Gate
from agor_actors.store import Mutation, WriteRequest, WriteResult, open_store
from agor_actors.world import simulated_world

T = TypeVar("T")


class HeldBlocking:
    """Runs the work at once; while ``hold`` is set, its answer comes back
    only once ``release`` is set."""

    def __init__(self) -> None:
        self.hold = False
        self.release = trio.Event()

    async def run(self, fn: Callable[[], T], *, local: bool = False) -> T:
        await trio.lowlevel.checkpoint()
        result = fn()
        if self.hold:
            await self.release.wait()
        return result


def _session(viewers: list[str], rev: int) -> Mutation:
    values: dict[str, Any] = {
        "permissions": {"viewers": viewers},
        "updated_at": rev,
        "rev": rev,
    }
    if rev == 1:
        return Mutation("insert", "sessions", {"id": "s-1"}, {**values, "created_at": 1})
    return Mutation("update", "sessions", {"id": "s-1"}, values)


async def test_a_load_begun_before_a_change_does_not_land_over_a_later_one() -> None:
    store = open_store("sqlite://", new_epoch=lambda: "epoch-1")
    blocking = HeldBlocking()
    gate = Gate(attrs.evolve(simulated_world(1), blocking=blocking), store)
    assert isinstance(
        store.commit([WriteRequest(mutations=[_session(["u-1"], 1)])])[0], WriteResult
    )
    early: list[Any] = []
    async with trio.open_nursery() as nursery:
        blocking.hold = True

        async def load_early() -> None:
            early.append(await gate.session("s-1"))

        nursery.start_soon(load_early)
        await trio.testing.wait_all_tasks_blocked()  # it read the row; its answer is held
        blocking.hold = False
        # the viewer's access is taken away; the change's own read follows
        changed = store.commit([WriteRequest(mutations=[_session([], 2)])])[0]
        assert isinstance(changed, WriteResult)
        gate.forget_session("s-1")
        now = await gate.session("s-1")
        assert now is not None and now.viewers == frozenset()
        blocking.release.set()  # the early read's answer comes back
    assert early[0] is not None and early[0].viewers == frozenset({"u-1"})  # its own answer
    cached = await gate.session("s-1")  # from the cache: the later read's
    assert cached is not None and cached.viewers == frozenset()
    store.close()
