"""Supervision semantics on the auto-jumping clock."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
from trio.testing import MockClock

from supervisors import (
    Backoff,
    Child,
    ChildSpec,
    ChildStartError,
    Intensity,
    Restart,
    Strategy,
    Supervisor,
    SupervisorGaveUp,
    add_restart,
    children_to_restart,
    restart_delay_s,
    should_restart,
)


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.start_times: list[float] = []
        self.crash: dict[str, trio.Event] = {}
        self.finish: dict[str, trio.Event] = {}

    def worker(
        self,
        cid: str,
        *,
        restart: Restart = Restart.PERMANENT,
        shutdown_s: float = 5.0,
        cleanup_s: float = 0.0,
    ) -> ChildSpec:
        async def start(child: Child) -> None:
            self.lines.append(f"start {cid}")
            self.start_times.append(trio.current_time())
            crash = self.crash[cid] = trio.Event()
            finish = self.finish[cid] = trio.Event()
            child.started(cid)
            try:
                async with trio.open_nursery() as nursery:

                    async def wait_stop() -> None:
                        await child.stop_requested.wait()
                        nursery.cancel_scope.cancel()

                    async def wait_finish() -> None:
                        await finish.wait()
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(wait_stop)
                    nursery.start_soon(wait_finish)
                    await crash.wait()
                    raise RuntimeError(f"{cid} crashed")
            finally:
                if child.stop_requested.is_set():
                    await trio.sleep(cleanup_s)  # cleanup; cancelled past shutdown_s
                    self.lines.append(f"stop {cid}")

        return ChildSpec(id=cid, start=start, restart=restart, shutdown_s=shutdown_s)


async def wait_for(pred: Callable[[], bool]) -> None:
    """Wait until ``pred()`` holds, re-checking whenever a log line is added
    or time passes (the clock auto-jumps, so a virtual tick costs nothing)."""
    with trio.fail_after(60):
        while not pred():
            await trio.sleep(0.01)


async def test_policies_are_pure(autojump_clock: MockClock) -> None:
    assert should_restart(Restart.PERMANENT, abnormal=False)
    assert should_restart(Restart.TRANSIENT, abnormal=True)
    assert not should_restart(Restart.TRANSIENT, abnormal=False)
    assert not should_restart(Restart.TEMPORARY, abnormal=True)
    intensity = Intensity(max_restarts=3, period_s=5.0)
    hist: tuple[float, ...] = ()
    for t in (0.0, 1.0, 2.0):
        hist, exceeded = add_restart(hist, t, intensity)
        assert not exceeded
    _, exceeded = add_restart(hist, 3.0, intensity)
    assert exceeded
    hist2, exceeded = add_restart(hist, 5.5, intensity)  # 0.0 fell out of the window
    assert not exceeded and hist2 == (1.0, 2.0, 5.5)
    backoff = Backoff(base_s=0.1, factor=2.0, max_s=0.25)
    assert restart_delay_s((1.0,), backoff) == 0.0
    assert restart_delay_s((1.0, 2.0), backoff) == pytest.approx(0.1)
    assert restart_delay_s((1.0, 2.0, 3.0), backoff) == pytest.approx(0.2)
    assert restart_delay_s((1.0, 2.0, 3.0, 4.0), backoff) == pytest.approx(0.25)
    order = ["a", "b", "c"]
    assert children_to_restart(Strategy.ONE_FOR_ONE, order, "b") == ["b"]
    assert children_to_restart(Strategy.ONE_FOR_ALL, order, "b") == ["a", "b", "c"]
    assert children_to_restart(Strategy.REST_FOR_ONE, order, "b") == ["b", "c"]


@pytest.mark.parametrize(
    ("strategy", "restarted"),
    [
        (Strategy.ONE_FOR_ONE, ["b"]),
        (Strategy.ONE_FOR_ALL, ["a", "b", "c"]),
        (Strategy.REST_FOR_ONE, ["b", "c"]),
    ],
)
async def test_strategies(
    autojump_clock: MockClock, strategy: Strategy, restarted: list[str]
) -> None:
    log = Log()
    sup = Supervisor("s", [log.worker("a"), log.worker("b"), log.worker("c")], strategy=strategy)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        assert log.lines == ["start a", "start b", "start c"]
        log.lines.clear()
        log.crash["b"].set()
        await wait_for(
            lambda: len([x for x in log.lines if x.startswith("start")]) == len(restarted)
        )
        # others are stopped in reverse order, then all restart in start order
        stopped = [x for x in restarted if x != "b"]
        assert [x for x in log.lines if x.startswith("stop")] == [
            f"stop {c}" for c in reversed(stopped)
        ]
        assert [x for x in log.lines if x.startswith("start")] == [f"start {c}" for c in restarted]
        snap = {c.id: c for c in sup.snapshot().children}
        assert snap["b"].restarts == 1 and "b crashed" in (snap["b"].last_crash or "")
        for c in "ac":
            assert snap[c].restarts == (1 if c in restarted else 0)
        await sup.stop()


async def test_restart_types(autojump_clock: MockClock) -> None:
    log = Log()
    sup = Supervisor(
        "s",
        [
            log.worker("perm", restart=Restart.PERMANENT),
            log.worker("trans", restart=Restart.TRANSIENT),
            log.worker("temp", restart=Restart.TEMPORARY),
        ],
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        log.finish["perm"].set()  # a normal exit: permanent restarts anyway
        await wait_for(lambda: log.lines.count("start perm") == 2)
        log.finish["trans"].set()  # normal exit: transient is dropped
        await wait_for(lambda: "trans" not in sup.which_children())
        log.crash["temp"].set()  # crash: temporary is dropped
        await wait_for(lambda: "temp" not in sup.which_children())
        assert sup.which_children() == ["perm"]
        assert log.lines.count("start trans") == 1 and log.lines.count("start temp") == 1
        sup2_log = Log()
        sup2 = Supervisor("s2", [sup2_log.worker("t", restart=Restart.TRANSIENT)])
        await nursery.start(sup2.run)
        sup2_log.crash["t"].set()  # crash: transient restarts
        await wait_for(lambda: sup2_log.lines.count("start t") == 2)
        await sup.stop()
        await sup2.stop()


async def test_intensity_escalates_through_two_levels(autojump_clock: MockClock) -> None:
    log = Log()
    inner = Supervisor(
        "inner",
        [log.worker("w")],
        intensity=Intensity(max_restarts=2, period_s=10.0),
        backoff=Backoff(base_s=0.0),
    )
    outer_log = Log()
    middle = Supervisor(
        "middle",
        [inner.child_spec(), outer_log.worker("sibling")],
        strategy=Strategy.ONE_FOR_ALL,
        intensity=Intensity(max_restarts=0, period_s=10.0),
    )
    with pytest.RaisesGroup(SupervisorGaveUp) as info:
        async with trio.open_nursery() as nursery:
            await nursery.start(middle.run)
            for n in range(1, 4):
                await wait_for(lambda n=n: log.lines.count("start w") == n)  # type: ignore[misc]
                log.crash["w"].set()
            with trio.fail_after(60):
                await trio.sleep_forever()
    # the inner supervisor gave up after 3 crashes (2 allowed); the middle one
    # (0 restarts allowed) then gave up too, after stopping the sibling
    err = info.value.exceptions[0]
    assert isinstance(err, SupervisorGaveUp)
    assert err.name == "middle" and err.child_id == "inner"
    assert "SupervisorGaveUp" in err.reason and "inner" in err.reason
    assert "stop sibling" in outer_log.lines
    assert log.lines.count("start w") == 3


async def test_a_supervisor_that_gave_up_runs_again_and_takes_children_meanwhile(
    autojump_clock: MockClock,
) -> None:
    """The inner supervisor gives up (its intensity passed); the outer one,
    which allows it, starts it again.  It runs again (it used to return at
    once, its last run's end still marked, until the outer one gave up too),
    and a dynamic child asked for while it was between runs is started by
    the next run instead of failing with "not running"."""
    log = Log()
    inner = Supervisor(
        "inner",
        [log.worker("w")],
        intensity=Intensity(max_restarts=0, period_s=10.0),
        backoff=Backoff(base_s=0.0),
    )
    outer = Supervisor(
        "outer", [inner.child_spec()], intensity=Intensity(max_restarts=5, period_s=10.0)
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(outer.run)
        await wait_for(lambda: log.lines.count("start w") == 1)
        log.crash["w"].set()  # 0 restarts allowed: inner gives up, outer restarts it
        late = log.worker("late")
        started: list[object] = []

        async def start_late() -> None:
            started.append(await inner.start_child(late))

        nursery.start_soon(start_late)
        await wait_for(lambda: log.lines.count("start w") == 2)  # the next run's child
        await wait_for(lambda: "start late" in log.lines)
        await wait_for(lambda: bool(started))
        with trio.move_on_after(30):
            await trio.sleep_forever()
        assert log.lines.count("start w") == 2  # it stays up: no loop of restarts
        assert outer.snapshot().children[0].restarts == 1
        await outer.stop()


async def test_a_child_asked_for_while_a_supervisor_gives_up_waits_for_its_next_run(
    autojump_clock: MockClock,
) -> None:
    """A dynamic child asked for while the supervisor is giving up (its
    children being stopped, the request waiting for the supervisor's lock)
    is started by the next run: it used to reach the nursery the run was
    closing ("Nursery is closed to new arrivals"; simulator seed 15 with
    30 s of faults, then a room that never answered a join)."""

    async def one_round() -> None:
        log = Log()
        inner = Supervisor(
            "inner",
            [log.worker("w"), log.worker("slow", cleanup_s=1.0)],
            intensity=Intensity(max_restarts=0, period_s=10.0),
            backoff=Backoff(base_s=0.0),
        )
        outer = Supervisor(
            "outer", [inner.child_spec()], intensity=Intensity(max_restarts=5, period_s=10.0)
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(outer.run)
            await wait_for(lambda: log.lines.count("start slow") == 1)
            log.crash["w"].set()  # inner gives up: it stops "slow", which takes 1 s
            await trio.sleep(0.5)
            started: list[object] = []

            async def start_late() -> None:
                started.append(await inner.start_child(log.worker("late")))

            nursery.start_soon(start_late)  # while "slow" is being stopped
            await wait_for(lambda: bool(started))
            assert started == ["late"]
            assert log.lines.count("start w") == 2  # in the next run, after its children
            assert log.lines.index("stop slow") < log.lines.index("start late")
            await outer.stop()

    for _ in range(10):  # the order of the tasks around the give-up varies
        await one_round()


async def test_shutdown_order_and_timeouts(autojump_clock: MockClock) -> None:
    log = Log()
    sup = Supervisor(
        "s",
        [
            log.worker("a"),
            log.worker("slow", shutdown_s=1.0, cleanup_s=30.0),  # killed after 1 s
            log.worker("c", cleanup_s=0.5),
        ],
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        t0 = trio.current_time()
        await sup.stop()
        elapsed = trio.current_time() - t0
    stops = [x for x in log.lines if x.startswith("stop")]
    # reverse order; the slow child's cleanup is cut after its shutdown_s
    assert stops == ["stop c", "stop a"]
    assert elapsed == pytest.approx(1.5, abs=0.01)


async def test_initial_start_failure_raises_and_stops_started_children(
    autojump_clock: MockClock,
) -> None:
    log = Log()

    async def bad(child: Child) -> None:
        raise ValueError("no database")

    sup = Supervisor("s", [log.worker("a"), ChildSpec(id="bad", start=bad)])
    with pytest.RaisesGroup(pytest.RaisesExc(ChildStartError, match="no database")):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
    assert log.lines == ["start a", "stop a"]


async def test_dynamic_children_and_snapshot(autojump_clock: MockClock) -> None:
    log = Log()
    sup = Supervisor("dyn")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        assert await sup.start_child(log.worker("x", restart=Restart.TRANSIENT)) == "x"
        assert await sup.start_child(log.worker("y")) == "y"
        as_json = sup.snapshot().to_json()
        assert [c["id"] for c in as_json["children"]] == ["x", "y"]
        assert as_json["children"][0]["state"] == "running"
        await sup.terminate_child("x")
        assert sup.which_children() == ["y"]
        await sup.stop()
    assert log.lines == ["start x", "start y", "stop x", "stop y"]


async def test_backoff_delays_restarts(autojump_clock: MockClock) -> None:
    log = Log()
    sup = Supervisor(
        "s",
        [log.worker("w")],
        intensity=Intensity(max_restarts=10, period_s=100.0),
        backoff=Backoff(base_s=1.0, factor=2.0, max_s=3.0),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        crashes = []
        for n in range(1, 5):
            await wait_for(lambda n=n: log.lines.count("start w") == n)  # type: ignore[misc]
            crashes.append(trio.current_time())
            log.crash["w"].set()
        await wait_for(lambda: log.lines.count("start w") == 5)
        gaps = [round(b - a, 6) for a, b in zip(crashes, log.start_times[1:], strict=True)]
        assert gaps == [0.0, 1.0, 2.0, 3.0]
        await sup.stop()


async def test_a_start_that_fails_after_its_caller_gave_up_is_dropped(
    autojump_clock: MockClock,
) -> None:
    """``start_child`` is cancelled while its child starts (a join's timeout),
    and the start then fails (the store away).  Nobody was left to report
    it: the child stayed for good, neither running nor removed, and a
    registry's name waited on it forever (the simulator's cluster seed
    3974: a room no client could join again).  Now the loop drops it and
    ``on_removed`` runs."""
    release = trio.Event()
    removed: list[str] = []

    async def failing_start(child: Child) -> None:
        await release.wait()
        raise RuntimeError("the store is away")

    spec = ChildSpec("room", failing_start, on_removed=lambda: removed.append("room"))
    sup = Supervisor("dyn")
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        with trio.move_on_after(1.0) as waited:
            await sup.start_child(spec)
        assert waited.cancelled_caught
        release.set()
        with trio.fail_after(5):
            while sup.which_children():
                await trio.sleep(0.01)
        assert removed == ["room"]
        # the id is free again: a new start of it runs
        ok = ChildSpec("room", _ready_forever)
        assert await sup.start_child(ok) == "room"
        await sup.stop()


async def _ready_forever(child: Child) -> None:
    child.started("room")
    await child.stop_requested.wait()
