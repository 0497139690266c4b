"""The multi-node store's row locks (``sim/_locks.py``), in process on
virtual time: two nodes' store seams on one in-memory engine, each with its
own shared ``SimStore``.  A commit to a room another node's transaction
holds waits for it and lands after it; a node that dies or is cut off
mid-transaction writes nothing and holds its locks until the store
notices; reads never wait."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from agor_actors.store import (
    EventDraft,
    Mutation,
    StoreUnavailable,
    WriteRequest,
    WriteResult,
    open_store,
)
from agor_actors.store._backend import SqlStore
from agor_actors.world import InlineBlocking, SeededEntropy
from sim._faults import FaultyBlocking, StoreFaults
from sim._locks import SimStore, StoreLocks, lock_names
from sim._record import Recorder
from sim._trace import Trace

ROOM = "board:b1"
HOLD_US = 10_000
"""A transaction holds its locks 10 ms after its first statement."""
LATENCY_US = 2_000
"""A store call's way there and back: 1 ms each."""
DETECT_US = 2_000_000
"""The store notices a dead or cut connection after 2 s."""


@attrs.define
class Nodes:
    store: SqlStore
    """The test's own store object (reads only)."""
    seams: list[FaultyBlocking]
    stores: list[SimStore]
    cut: list[bool]
    recorder: Recorder

    async def commit(self, node: int, room: str = ROOM) -> WriteResult:
        """One event in ``room``, committed through ``node``'s seam."""
        store = self.stores[node]
        request = WriteRequest(events=(EventDraft(room, "test:e", {"node": node}, 0),))
        [result] = await self.seams[node].run(lambda: store.commit([request]), local=True)
        assert isinstance(result, WriteResult), result
        return result

    def logged(self, room: str = ROOM) -> list[tuple[int, Any]]:
        return [(e.seq, e.data["node"]) for e in self.store.events_since(room, 0)]


@contextmanager
def nodes(count: int = 2) -> Iterator[Nodes]:
    trace = Trace()
    recorder = Recorder(trace)
    epochs = SeededEntropy("locks/epochs")
    store = open_store("sqlite://", new_epoch=lambda: epochs.new_id(0))
    faults = StoreFaults(store, trace)
    locks = StoreLocks(hold_us=HOLD_US, detect_us=DETECT_US, recorder=recorder, trace=trace)
    cut = [False] * count

    def is_cut(node: int) -> Callable[[], bool]:
        return lambda: cut[node]

    seams = [
        FaultyBlocking(
            InlineBlocking(),
            faults,
            latency_us=LATENCY_US,
            cut=is_cut(n),
            locks=locks,
            who=f"node {n}",
        )
        for n in range(count)
    ]
    stores = [
        SimStore(store.engine, new_epoch=lambda: epochs.new_id(0), shared=True)
        for _ in range(count)
    ]
    try:
        yield Nodes(store, seams, stores, cut, recorder)
    finally:
        store.close()


async def test_a_commit_waits_for_another_nodes_transaction_on_its_room(
    autojump_clock: trio.testing.MockClock,
) -> None:
    answered: dict[int, tuple[float, int]] = {}
    with nodes() as n:

        async def commit(node: int) -> None:
            result = await n.commit(node)
            answered[node] = (trio.current_time(), result.events[0].seq)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(commit, 0)  # locks the room at 1 ms, commits at 11 ms
            await trio.sleep(0.001)
            nursery.start_soon(commit, 1)  # asks at 2 ms: waits until 11 ms
        # the first: 1 ms there, its 10 ms hold, 1 ms back; the second's
        # hold starts at the first's COMMIT
        assert answered[0] == (pytest.approx(0.012), 1)
        assert answered[1] == (pytest.approx(0.022), 2)
        assert n.logged() == [(1, 0), (2, 1)]
        assert n.recorder.counters == {"locks:waited": 1}


async def test_commits_to_other_rooms_do_not_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with nodes() as n:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(n.commit, 0, "board:b1")
            nursery.start_soon(n.commit, 1, "board:b2")
        assert trio.current_time() == pytest.approx(0.012)  # side by side
        assert n.logged("board:b1") == [(1, 0)] and n.logged("board:b2") == [(1, 1)]
        assert n.recorder.counters == {}


async def test_a_node_that_dies_mid_transaction_writes_nothing_and_holds_its_locks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    answered: list[float] = []
    with nodes() as n:

        async def doomed() -> None:
            with trio.CancelScope() as scope:
                dying.append(scope)
                await n.commit(0)
            assert scope.cancelled_caught  # a dead node's commit never returns

        async def other() -> None:
            await n.commit(1)
            answered.append(trio.current_time())

        dying: list[trio.CancelScope] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(doomed)  # holds the room from 1 ms
            await trio.sleep(0.001)
            nursery.start_soon(other)  # waits from 2 ms
            await trio.sleep(0.004)
            n.seams[0].fence()  # 5 ms: the process dies, its commit at 11 ms never comes
            dying[0].cancel()
        # the other node's transaction starts once the store noticed (5 ms + 2 s)
        assert answered == [pytest.approx(0.005 + DETECT_US / 1e6 + 0.011)]
        assert n.logged() == [(1, 1)]  # nothing of the dead node's commit
        assert n.recorder.counters == {
            "locks:held_crashed": 1,
            "locks:waited": 1,
            "locks:waited_dead": 1,
        }


async def test_a_node_cut_off_mid_transaction_writes_nothing_and_fails_unavailable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    answered: dict[int, float] = {}
    with nodes() as n:

        async def cut_off() -> None:
            with pytest.raises(StoreUnavailable):
                await n.commit(0)
            answered[0] = trio.current_time()

        async def other() -> None:
            await n.commit(1)
            answered[1] = trio.current_time()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cut_off)
            await trio.sleep(0.001)
            nursery.start_soon(other)
            await trio.sleep(0.004)
            n.cut[0] = True  # 5 ms: its COMMIT (at 11 ms) goes unanswered
        # the cut node's client gives up (no answer comes back) as the
        # store notices: 11 ms + 2 s
        assert answered[0] == pytest.approx(0.011 + DETECT_US / 1e6)
        assert answered[1] == pytest.approx(0.011 + DETECT_US / 1e6 + 0.011)
        assert n.logged() == [(1, 1)]
        assert n.recorder.counters == {
            "locks:held_cut": 1,
            "locks:waited": 1,
            "locks:waited_dead": 1,
        }


async def test_reads_do_not_wait_for_a_held_lock_and_see_what_was_committed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with nodes() as n:
        reader = n.stores[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(n.commit, 0)  # the room locked from 1 ms to 11 ms
            await trio.sleep(0.005)
            started = trio.current_time()
            head = await n.seams[1].run(lambda: reader.room_head(ROOM), local=True)
            events = await n.seams[1].run(lambda: reader.events_since(ROOM, 0), local=True)
            # two plain calls (1 ms there, 1 ms back), each answered at once...
            assert trio.current_time() - started == pytest.approx(0.004)
            # ... with what was committed then: not the transaction in flight
            assert head is None and events == []
        head = await n.seams[1].run(lambda: reader.room_head(ROOM), local=True)
        assert head is not None and head[1] == 1
        assert n.recorder.counters == {}


def test_a_commit_locks_its_rooms_first_then_its_rows() -> None:
    requests = [
        WriteRequest(
            mutations=(Mutation("update", "sessions", {"id": "s2"}, {"title": "t"}),),
            events=(EventDraft("session:s2", "session:updated", {}, 0),),
        ),
        WriteRequest(
            mutations=(Mutation("insert", "tasks", {"id": "t1"}, {"session_id": "s1"}),),
            events=(
                EventDraft("session:s1", "task:created", {}, 0),
                EventDraft("board:b", "task:created", {}, 0),
            ),
        ),
    ]
    assert lock_names(requests) == (
        "room board:b",
        "room session:s1",
        "room session:s2",
        "row sessions [('id', 's2')]",
        "row tasks [('id', 't1')]",
    )
