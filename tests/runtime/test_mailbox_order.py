"""The mailbox keeps its senders' order under backpressure: a freed place
goes to the first waiting sender, and a newcomer cannot jump the queue (a
pipelined stream's chunks would be appended out of order)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from agor_actors.runtime._mailbox import ActorDead, Mailbox


async def test_waiting_senders_keep_their_order_and_newcomers_queue_behind() -> None:
    box = Mailbox(2)
    got: list[int] = []
    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(box.put, i)
            await trio.testing.wait_all_tasks_blocked()
        assert len(box) == 2
        # a place frees up; a newcomer arrives before the woken sender runs
        got.append(box.get_nowait())
        assert box.try_put(99) is False  # senders wait: it must queue behind them
        nursery.start_soon(box.put, 10)
        while len(got) < 11:
            got.append(await box.get())
            await trio.testing.wait_all_tasks_blocked()
    assert got == list(range(11))


async def test_a_cancelled_waiting_sender_enqueues_nothing_and_keeps_the_others_order() -> None:
    box = Mailbox(1)
    box.try_put("first")
    scope = trio.CancelScope()

    async def cancelled_put() -> None:
        with scope:
            await box.put("cancelled")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.put, "a")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(cancelled_put)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(box.put, "b")
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        got = [await box.get() for _ in range(3)]
    assert got == ["first", "a", "b"]


async def test_closing_wakes_waiting_senders_with_actor_dead() -> None:
    box = Mailbox(1)
    box.try_put("x")
    with pytest.RaisesGroup(ActorDead):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(box.put, "y")
            await trio.testing.wait_all_tasks_blocked()
            assert box.close() == ["x"]
