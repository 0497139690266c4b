"""Actor runtime figures: messages/s through send -> handle, call round
trips/s, spawn + stop/s, memory per idle actor.

    .venv/bin/python bench/actors.py [--repeat 3]

Run it alone on the machine; it prints the median of the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import trio

from agor_actors.runtime import (
    ActorContext,
    Behaviour,
    Effects,
    Kind,
    Reply,
    Request,
    open_system,
    spawn,
)
from agor_actors.world import real_world


class Sink(Behaviour[list[int]]):
    mailbox_size = 1024

    async def init(self, ctx: ActorContext) -> list[int]:
        return [0]

    def handle(self, state: list[int], msg: Any, now: float) -> Effects:
        state[0] += 1
        if isinstance(msg, Request):
            return [Reply(msg.reply_to, state[0])]
        return ()


async def sends(n: int) -> float:
    async with trio.open_nursery() as nursery:
        ref = await spawn(nursery, Sink(), name="sink", world=real_world())
        t0 = time.perf_counter()
        for i in range(n):
            await ref.send(i)
        await ref.call("flush")
        dt = time.perf_counter() - t0
        nursery.cancel_scope.cancel()
    return n / dt


async def calls(n: int) -> float:
    async with trio.open_nursery() as nursery:
        ref = await spawn(nursery, Sink(), name="sink", world=real_world())
        t0 = time.perf_counter()
        for _ in range(n):
            await ref.call("x")
        dt = time.perf_counter() - t0
        nursery.cancel_scope.cancel()
    return n / dt


async def spawn_stop(n: int) -> float:
    async with open_system(real_world()) as system:
        system.define(Kind("a:", lambda name: Sink()))
        t0 = time.perf_counter()
        for i in range(n):
            ref = await system.registry.get(f"a:{i}")
            await ref.stop()
        dt = time.perf_counter() - t0
    return n / dt


async def idle_memory(n: int) -> float:
    async with open_system(real_world()) as system:
        system.define(Kind("a:", lambda name: Sink()))
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        for i in range(n):
            await system.registry.get(f"a:{i}")
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    return grown / n


def run(fn: Callable[[int], Any], n: int, repeat: int) -> float:
    return statistics.median(trio.run(fn, n) for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    s = args.scale
    print(f"send -> handle      {run(sends, int(200_000 * s), args.repeat):>12,.0f} msgs/s")
    print(f"call round trips    {run(calls, int(50_000 * s), args.repeat):>12,.0f} calls/s")
    print(f"spawn + stop        {run(spawn_stop, int(5_000 * s), args.repeat):>12,.0f} actors/s")
    print(f"memory per idle actor {run(idle_memory, int(5_000 * s), args.repeat):>10,.0f} bytes")


if __name__ == "__main__":
    main()
