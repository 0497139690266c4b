"""An actor's timers: when they fire, replacing, cancelling, repeating, and
one task for all of them, on the auto-jumping clock."""

from __future__ import annotations

from typing import Any

import trio
from trio.testing import MockClock

from agor_actors.runtime import (
    ActorContext,
    Behaviour,
    CancelTimer,
    Effects,
    Reply,
    Request,
    StartTimer,
    spawn,
)
from agor_actors.world import simulated_world

WORLD = simulated_world(1)


class Timed(Behaviour[list[tuple[Any, float]]]):
    """``("start", key, delay_s, repeat, at_s)`` starts a timer whose message
    is ``key``; ``("cancel", key)`` cancels it; ``"fired"`` answers what fired
    and when."""

    max_timers = 64

    async def init(self, ctx: ActorContext) -> list[tuple[Any, float]]:
        return []

    def handle(self, state: list[tuple[Any, float]], msg: Any, now: float) -> Effects:
        if isinstance(msg, Request):
            body = msg.body
            if body == "fired":
                return [Reply(msg.reply_to, list(state))]
            if body[0] == "start":
                _, key, delay_s, repeat, at_s = body
                return [
                    StartTimer(key, delay_s, key, repeat=repeat, at_s=at_s),
                    Reply(msg.reply_to, None),
                ]
            if body[0] == "cancel":
                return [CancelTimer(body[1]), Reply(msg.reply_to, None)]
        state.append((msg, trio.current_time()))
        return ()


async def _start(
    ref: Any, key: str, delay_s: float, *, repeat: bool = False, at_s: float | None = None
) -> None:
    await ref.call(("start", key, delay_s, repeat, at_s))


async def test_timers_fire_when_due_and_a_replaced_or_cancelled_one_never(
    autojump_clock: MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        ref = await spawn(nursery, Timed(), name="t", world=WORLD)
        t0 = trio.current_time()
        await _start(ref, "a", 3.0)
        await _start(ref, "b", 1.0)
        await _start(ref, "c", 2.0)
        await _start(ref, "b", 5.0)  # replaces b: fires at 5 only
        await ref.call(("cancel", "c"))
        await trio.sleep(10)
        fired = [(key, round(at - t0, 6)) for key, at in await ref.call("fired")]
        assert fired == [("a", 3.0), ("b", 5.0)]
        assert ref.statistics().timers == 0
        nursery.cancel_scope.cancel()


async def test_a_repeating_timer_fires_every_period_until_cancelled(
    autojump_clock: MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        ref = await spawn(nursery, Timed(), name="t", world=WORLD)
        t0 = trio.current_time()
        await _start(ref, "tick", 0.5, repeat=True)
        await trio.sleep(2.25)
        assert ref.statistics().timers == 1
        await ref.call(("cancel", "tick"))
        await trio.sleep(5)
        fired = [round(at - t0, 6) for _, at in await ref.call("fired")]
        assert fired == [0.5, 1.0, 1.5, 2.0]
        nursery.cancel_scope.cancel()


async def test_timers_due_at_one_instant_fire_in_the_order_started(
    autojump_clock: MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        ref = await spawn(nursery, Timed(), name="t", world=WORLD)
        at = trio.current_time() + 4.0
        for key in ("x", "y", "z"):
            await _start(ref, key, 0.0, at_s=at)
        await _start(ref, "w", at - trio.current_time())  # due then too, started last
        await trio.sleep(5)
        fired = await ref.call("fired")
        assert [key for key, _ in fired] == ["x", "y", "z", "w"]
        assert {when for _, when in fired} == {at}
        nursery.cancel_scope.cancel()


async def test_one_task_fires_all_timers_and_restarts_leave_no_garbage(
    autojump_clock: MockClock,
) -> None:
    spawned: list[str] = []

    class Spawns(trio.abc.Instrument):
        def task_spawned(self, task: trio.lowlevel.Task) -> None:
            spawned.append(task.name)

    async with trio.open_nursery() as nursery:
        ref = await spawn(nursery, Timed(), name="t", world=WORLD)
        trio.lowlevel.add_instrument(Spawns())
        for i in range(40):
            await _start(ref, f"k{i}", 30.0 + i)
        for _ in range(500):  # a debounce: the same timer started again and again
            await _start(ref, "k0", 30.0)
        # one task for all (it started with the first timer); none per timer
        assert len(spawned) <= 1, spawned
        assert ref.statistics().timers == 40
        # replaced timers' entries are dropped, not kept until they come due
        assert len(ref._actor._timer_heap) <= 2 * 40 + 16
        await trio.sleep(100)
        assert len(await ref.call("fired")) == 40
        nursery.cancel_scope.cancel()


async def test_a_repeating_timer_without_delay_lets_the_others_run(
    autojump_clock: MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        ref = await spawn(nursery, Timed(), name="t", world=WORLD)
        await _start(ref, "spin", 0.0, repeat=True)
        with trio.fail_after(1):  # the caller still gets its answers
            assert await ref.call("fired") is not None
            await ref.call(("cancel", "spin"))
        nursery.cancel_scope.cancel()
