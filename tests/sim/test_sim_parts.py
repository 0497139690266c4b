"""The simulator's parts, in process: the network links, the mirror model
against the daemon's own events, the configuration draw and the
deterministic-run machinery."""

from __future__ import annotations

import functools
import gc
import random
import uuid
from typing import Any

import pytest
import trio
import trio.testing

from agor_actors.daemon import Principal, open_hub
from agor_actors.store import open_store
from agor_actors.world import SeededEntropy, TransportClosed, simulated_world
from protocols import Event
from sim import FAULT_KINDS, draw_config, draw_faults
from sim._det import (
    RUN_GC_THRESHOLDS,
    SimLeak,
    StepRecorder,
    new_clock,
    park_until,
    run_deterministic,
    self_test,
)
from sim._det import sleep as sim_sleep
from sim._model import apply_event, empty_view, server_view
from sim._net import Link, _Hold
from sim._trace import Trace, now_us

OWNER = Principal("owner", "owner", True)


def _link(hold: _Hold | None = None, *, bytes_max: int = 1 << 20, jitter_us: int = 0) -> Link:
    return Link(
        "test",
        random.Random(7),
        latency_us=1_000,
        jitter_us=jitter_us,
        bytes_max=bytes_max,
        hold=hold or _Hold(),
        trace=Trace(),
    )


async def test_a_link_delivers_in_order_after_its_latency(
    autojump_clock: trio.testing.MockClock,
) -> None:
    link = _link(jitter_us=5_000)
    for i in range(50):
        await link.send(f"m{i}")
    got = []
    for _ in range(50):
        got.append(await link.receive())
        assert now_us() >= 1_000
    assert got == [f"m{i}" for i in range(50)]


async def test_a_partition_holds_frames_until_it_heals(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hold = _Hold()
    link = _link(hold)
    hold.hold(now_us(), now_us() + 5_000_000)
    await link.send("held")
    with trio.move_on_after(4.9):
        await link.receive()
        pytest.fail("a frame crossed a partition")
    assert await link.receive() == "held"
    assert trio.current_time() == pytest.approx(5.0)


async def test_a_reset_loses_what_is_in_flight(autojump_clock: trio.testing.MockClock) -> None:
    link = _link()
    await link.send("lost")
    link.reset()
    with pytest.raises(TransportClosed):
        await link.receive()
    with pytest.raises(TransportClosed):
        await link.send("too late")


async def test_a_full_link_blocks_its_sender(autojump_clock: trio.testing.MockClock) -> None:
    link = _link(bytes_max=10)
    await link.send("12345678")
    sent = trio.Event()

    async def sender() -> None:
        await link.send("abcdefgh")
        sent.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await trio.sleep(1)
        assert not sent.is_set()
        assert link.within_bound()
        assert await link.receive() == "12345678"
        await sent.wait()
    assert await link.receive() == "abcdefgh"


async def test_a_frame_longer_than_the_link_and_its_close_are_within_its_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # (cluster seed 49: the server closed a connection after a heartbeat
    # timeout behind a 34 KB frame on a 2 KB link, and the bound check
    # counted the close marker as a second frame)
    link = _link(bytes_max=10)
    await link.send("a frame of 26 bytes, alone")
    link.close(4000, "heartbeat timeout")
    assert link.within_bound()


async def test_a_close_arrives_after_the_frames_before_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    link = _link()
    await link.send("last words")
    link.close(1001, "going away")
    assert await link.receive() == "last words"
    with pytest.raises(TransportClosed) as caught:
        await link.receive()
    assert caught.value.code == 1001


async def test_the_mirror_model_rebuilds_the_store_from_the_daemons_events(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Applying a room's logged events to an empty view gives the view read
    from the store: the model agrees with the daemon's own event rules."""
    world = simulated_world("parts")
    epochs = SeededEntropy("parts/epochs")
    store = open_store("sqlite://", new_epoch=lambda: epochs.new_id(world.wall.now_ms()))
    try:
        async with open_hub(world, store=store, owner_token="t") as hub:

            async def call(service: str, method: str, **kw: Any) -> dict[str, Any]:
                result = await hub.call(
                    OWNER, connection_id="c", service=service, method=method, **kw
                )
                assert isinstance(result, dict)
                return result

            board = await call("boards", "create", data={"name": "B"})
            session = await call("sessions", "create", data={"title": "S", "board_id": board["id"]})
            sid = str(session["id"])
            task = await call("tasks", "create", data={"session_id": sid, "prompt": "p"})
            await call("tasks", "start", id=task["id"], data={})
            message = await call(
                "messages",
                "create",
                data={"session_id": sid, "task_id": task["id"], "streaming": True},
            )
            for chunk in ("Hel", "lo ", "world"):
                await call("messages", "stream", id=message["id"], data={"chunk": chunk})
            await call("messages", "finish", id=message["id"], data={})
            await call("sessions", "patch", id=sid, data={"title": "T", "agent": "x"})
            await call("sessions", "set_status", id=sid, data={"status": "running"})
            await call("boards", "patch", id=board["id"], data={"description": "d"})
            await hub.drain()
            for room in (f"session:{sid}", f"board:{board['id']}"):
                view = empty_view(room)
                for stored in store.events_since(room, 0, 1000):
                    apply_event(
                        view,
                        room,
                        Event(
                            room=stored.room,
                            seq=stored.seq,
                            event=stored.event,
                            data=stored.data,
                            last_seq=stored.last_seq,
                        ),
                    )
                assert view == server_view(store, room)
            messages = server_view(store, f"session:{sid}")["messages"]
            assert messages[message["id"]]["content"] == "Hello world"
    finally:
        store.close()


def test_a_seed_draws_one_configuration() -> None:
    assert draw_config(11) == draw_config(11)
    assert draw_faults(draw_config(11)) == draw_faults(draw_config(11))
    configs = {draw_config(seed).describe() for seed in range(20)}
    assert len(configs) == 20
    config = draw_config(11, exclude=FAULT_KINDS)
    assert config.faults == ()
    assert draw_faults(config) == ()
    for seed in range(20):
        faults = draw_faults(draw_config(seed))
        assert list(faults) == sorted(faults, key=lambda f: f.at_us)
        end_us = draw_config(seed).fault_s * 1_000_000
        assert all(0 < f.at_us < end_us for f in faults)
    with pytest.raises(ValueError):
        draw_config(1, exclude=("no_such_fault",))


def test_deterministic_runs_repeat_and_guard_real_randomness() -> None:
    self_test()

    async def workload() -> list[str]:
        order: list[str] = []

        async def worker(name: str) -> None:
            for _ in range(5):
                await trio.sleep(0)
                order.append(name)

        async with trio.open_nursery() as nursery:
            for name in "abcdef":
                nursery.start_soon(worker, name)
        return order

    first = run_deterministic(workload, seed=1)
    assert run_deterministic(workload, seed=1) == first
    assert any(run_deterministic(workload, seed=s) != first for s in range(2, 6))

    async def leak() -> None:
        uuid.uuid4()

    with pytest.raises(SimLeak):
        run_deterministic(leak, seed=1)
    uuid.uuid4()  # restored after the run


class _Passes(trio.abc.Instrument):
    """Counts the passes of trio's run loop (one I/O wait each)."""

    def __init__(self) -> None:
        self.passes = 0

    def before_io_wait(self, timeout: float) -> None:
        self.passes += 1


class _StepsOf(trio.abc.Instrument):
    def __init__(self, name: str) -> None:
        self.name = name
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += task.name == self.name


def _receiver_steps(frames: int, *, burst: bool) -> tuple[list[str], list[float], int]:
    async def run() -> tuple[list[str], list[float]]:
        link = _link(jitter_us=3_000)
        got: list[str] = []
        at: list[float] = []

        async def receiver() -> None:
            while True:
                got.append(str(await link.receive()))
                at.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver, name="receiver")
            for i in range(frames):
                if not burst:
                    await sim_sleep(0.01)  # each arrives 1-4 ms later, the receiver waiting
                await link.send(f"m{i}")
            await sim_sleep(1)
            with trio.move_on_after(0.5):  # a receive cancelled while it waits
                await link.receive()
            nursery.cancel_scope.cancel()
        return got, at

    counter = _StepsOf("receiver")
    got, at = run_deterministic(run, seed=2, clock=new_clock(), instruments=(counter,))
    return got, at, counter.steps


def test_a_waiting_receiver_takes_one_task_step_per_frame() -> None:
    # A frame sent on an empty link used to wake its parked receiver at
    # once, only for it to park again until the frame arrived, after a
    # checkpoint of its own: three steps a frame, the most common step of
    # a seed.  Now it wakes when the frame arrives, and a frame taken
    # without waiting costs its one checkpoint.
    for burst in (False, True):
        got, at, steps = _receiver_steps(20, burst=burst)
        assert got == [f"m{i}" for i in range(20)]
        assert at == sorted(at)
        if not burst:
            assert all(round((t - 0.01 * (i + 1)) * 1e6) >= 1_000 for i, t in enumerate(at))
        # the first step starts the task, the last one is its cancellation
        assert steps == 20 + 2, (burst, steps)


def test_the_sim_clock_reaches_mock_clocks_instants_in_fewer_passes() -> None:
    async def workload() -> list[tuple[str, float]]:
        seen: list[tuple[str, float]] = []

        async def sleeper(name: str, delays: tuple[float, ...]) -> None:
            for delay in delays:
                await trio.sleep(delay)
                seen.append((name, trio.current_time()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sleeper, "a", (0.25, 0.5, 0.125))
            nursery.start_soon(sleeper, "b", (0.5, 0.25, 1.0))
            nursery.start_soon(sleeper, "c", (0.0, 3.0))
            with trio.move_on_after(0.6):
                await trio.sleep_forever()
            seen.append(("timeout", trio.current_time()))
        return seen

    runs = []
    for clock in (trio.testing.MockClock(autojump_threshold=0), new_clock()):
        passes = _Passes()
        runs.append(
            (run_deterministic(workload, seed=3, clock=clock, instruments=(passes,)), passes)
        )
    (mock_seen, mock_passes), (sim_seen, sim_passes) = runs
    assert sim_seen == mock_seen
    assert [t for _, t in sim_seen] == sorted(t for _, t in sim_seen)
    assert ("c", 3.0) in sim_seen and ("timeout", 0.6) in sim_seen
    assert sim_passes.passes < mock_passes.passes
    clock = new_clock()
    clock.jump(0.5)
    assert clock.current_time() == 0.5
    with pytest.raises(ValueError):
        clock.jump(-1)


def test_the_sim_clocks_own_sleeps_wake_the_same_tasks_in_the_same_passes_as_trios() -> None:
    def workload(sleep: Any) -> Any:
        async def run() -> list[tuple[str, float]]:
            seen: list[tuple[str, float]] = []

            async def sleeper(name: str, delays: tuple[float, ...]) -> None:
                for delay in delays:
                    await sleep(delay)
                    seen.append((name, trio.current_time()))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sleeper, "a", (0.25, 0.5, 0.125))
                nursery.start_soon(sleeper, "b", (0.5, 0.25, 1.0))
                nursery.start_soon(sleeper, "c", (0.0, 3.0))
                with trio.move_on_after(0.6):  # a sleep cancelled from outside
                    await sleep(10)
                seen.append(("timeout", trio.current_time()))
            return seen

        return run

    runs = []
    for sleep in (trio.sleep, sim_sleep):
        passes, steps = _Passes(), StepRecorder()
        seen = run_deterministic(
            workload(sleep), seed=3, clock=new_clock(), instruments=(passes, steps)
        )
        runs.append((seen, passes.passes, steps.steps, steps.checksum))
    assert runs[0] == runs[1]
    assert ("c", 3.0) in runs[1][0] and ("timeout", 0.6) in runs[1][0]


def test_a_parked_task_wakes_when_woken_or_at_its_instant_on_either_clock() -> None:
    async def run() -> list[float]:
        woke: list[float] = []
        waiters: list[Any] = []

        async def parked() -> None:
            await park_until(5.0, waiters)
            woke.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(parked)
            await trio.sleep(1.0)
            for sleeper in waiters:
                sleeper.wake()
                sleeper.wake()  # a second wake does nothing
            waiters.clear()
            await trio.sleep(0.5)
            nursery.start_soon(parked)  # nobody wakes this one
        return woke

    for clock in (new_clock(), trio.testing.MockClock(autojump_threshold=0)):
        assert run_deterministic(run, seed=1, clock=clock) == [1.0, 5.0]


def test_a_run_collects_garbage_less_often_and_restores_the_setting() -> None:
    before = gc.get_threshold()

    async def thresholds() -> tuple[int, ...]:
        await trio.sleep(1)
        return gc.get_threshold()

    assert run_deterministic(thresholds, seed=1) == RUN_GC_THRESHOLDS != before
    assert gc.get_threshold() == before


def test_a_busy_loop_moves_the_virtual_clock_and_is_reported() -> None:
    async def spin_until(deadline_s: float) -> None:
        while trio.current_time() < deadline_s:
            await trio.lowlevel.checkpoint()

    for deadline_s, expect_livelock in ((2e-6, False), (1e-5, True)):
        spins: list[str] = []
        livelocks: list[str] = []
        clock = new_clock()
        steps = StepRecorder(
            clock,
            spin_steps=1024,
            max_nudges=3,
            on_spin=spins.append,
            on_livelock=livelocks.append,
        )
        run_deterministic(
            functools.partial(spin_until, deadline_s), seed=1, instruments=(steps,), clock=clock
        )
        assert spins
        assert bool(livelocks) is expect_livelock
