"""Deterministic trio runs: the recipe of ``SIMULATION.md``.

* trio's scheduler shuffles each batch of runnable tasks with a module-level
  ``random.Random`` named ``_r``; with ``_ALLOW_DETERMINISTIC_SCHEDULING``
  it first sorts the batch by task creation order, so reseeding ``_r`` makes
  the interleaving a function of the seed.  Both names are private: the
  start-up self-test fails loudly if an upgrade of trio removes them.
* :class:`SimClock`: virtual time jumps to the next deadline as soon as
  every task is blocked, as ``MockClock(autojump_threshold=0)`` does, but
  in the same pass of trio's run loop (MockClock's jump costs a second,
  empty pass: a quarter of all passes) and without reading the real clock.
* ``PYTHONHASHSEED=0`` (set by re-executing the command line) pins the
  iteration order of sets of strings between processes.
* The cyclic garbage collector runs less often during a run
  (:data:`RUN_GC_THRESHOLDS`): a run allocates quickly, its cycles are
  few, and the default thresholds spent 4 % of a run collecting.  Nothing
  under simulation depends on when garbage is collected (the same seeds
  give the same traces with either setting).
* One run at a time per process (two runs in threads would share ``_r``).
* While a run is on, the module-level sources of real randomness and ids
  raise, so that a leak through them shows up as a failure, not as a flaky
  hash.
"""

from __future__ import annotations

import gc
import heapq
import math
import os
import random
import secrets
import sys
import uuid
import zlib
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import trio

T = TypeVar("T")

__all__ = [
    "RUN_GC_THRESHOLDS",
    "DeterminismUnavailable",
    "SimClock",
    "SimLeak",
    "StepRecorder",
    "ensure_hash_seed",
    "hash_seed_pinned",
    "new_clock",
    "park_until",
    "run_deterministic",
    "self_test",
    "sleep",
    "sleep_until",
]

_PRIVATE_NAMES = ("_ALLOW_DETERMINISTIC_SCHEDULING", "_r")


class DeterminismUnavailable(RuntimeError):
    """trio no longer has the private hooks that make runs deterministic."""


class SimLeak(RuntimeError):
    """Code under simulation read real randomness or made a real id."""


def _trio_run_module() -> Any:
    import trio._core._run as trio_run

    return trio_run


def self_test() -> None:
    """Fail loudly unless trio still has the two private names the recipe
    needs, of the expected types."""
    module = _trio_run_module()
    missing = [name for name in _PRIVATE_NAMES if not hasattr(module, name)]
    if missing:
        raise DeterminismUnavailable(
            f"trio {trio.__version__} has no trio._core._run.{', '.join(missing)}: "
            "the simulator cannot make runs deterministic (see SIMULATION.md)"
        )
    if not isinstance(module._r, random.Random):
        raise DeterminismUnavailable("trio._core._run._r is no longer a random.Random")
    if not isinstance(module._ALLOW_DETERMINISTIC_SCHEDULING, bool):
        raise DeterminismUnavailable(
            "trio._core._run._ALLOW_DETERMINISTIC_SCHEDULING is not a bool"
        )


def ensure_hash_seed(module: str, argv: list[str]) -> None:
    """Re-execute ``python -m <module> <argv>`` with ``PYTHONHASHSEED=0``
    unless this process already runs with it.  Does not return when it
    re-executes."""
    if os.environ.get("PYTHONHASHSEED") == "0":
        return
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


def hash_seed_pinned() -> bool:
    return os.environ.get("PYTHONHASHSEED") == "0"


class StepRecorder(trio.abc.Instrument):
    """Counts task steps and folds the name of every stepped task into a
    checksum: two runs of one seed that interleave differently differ here
    even when their traces happen to agree.

    It also keeps the virtual clock honest about busy loops: a task that
    loops without ever sleeping would freeze a mock clock forever, where a
    real clock moves on while the CPU works.  After ``spin_steps`` steps
    without the clock moving it nudges the clock by one microsecond and
    reports the task (``on_spin``); after ``max_nudges`` nudges in a run it
    reports a livelock (``on_livelock``) once."""

    def __init__(
        self,
        clock: SimClock | None = None,
        *,
        spin_steps: int = 8_192,
        max_nudges: int = 64,
        on_spin: Callable[[str], None] | None = None,
        on_livelock: Callable[[str], None] | None = None,
    ) -> None:
        self.steps = 0
        self.checksum = 0
        self.nudges = 0
        self._crc: dict[str, int] = {}
        self._clock = clock
        self._spin_checks = max(1, spin_steps // 1024)
        self._max_nudges = max_nudges
        self._on_spin = on_spin
        self._on_livelock = on_livelock
        self._last_time = -1.0
        self._still = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1
        name = task.name
        crc = self._crc.get(name)
        if crc is None:
            crc = self._crc[name] = zlib.crc32(name.encode())
        self.checksum = (self.checksum * 1_000_003 + crc) & 0xFFFF_FFFF_FFFF_FFFF
        if self._clock is None or self.steps & 1023:
            return
        now = self._clock.current_time()
        if now != self._last_time:
            self._last_time = now
            self._still = 0
            return
        self._still += 1
        if self._still < self._spin_checks:
            return
        self._still = 0
        self.nudges += 1
        if self.nudges == self._max_nudges and self._on_livelock is not None:
            self._on_livelock(name)
        if self._on_spin is not None:
            self._on_spin(name)
        self._clock.jump(1e-6)


def _leak(name: str) -> Callable[..., Any]:
    def refuse(*args: object, **kwargs: object) -> Any:
        raise SimLeak(f"{name}() was called during a simulation: go through the world's seams")

    return refuse


_GUARDED: tuple[tuple[Any, str], ...] = (
    (uuid, "uuid1"),
    (uuid, "uuid4"),
    (secrets, "token_bytes"),
    (secrets, "token_hex"),
    (secrets, "token_urlsafe"),
    (secrets, "randbits"),
    (secrets, "randbelow"),
    (secrets, "choice"),
    (random, "random"),
    (random, "randrange"),
    (random, "randint"),
    (random, "choice"),
    (random, "choices"),
    (random, "shuffle"),
    (random, "sample"),
    (random, "uniform"),
    (random, "getrandbits"),
)


@contextmanager
def _guards() -> Iterator[None]:
    saved = [(module, name, getattr(module, name)) for module, name in _GUARDED]
    try:
        for module, name, _ in saved:
            setattr(module, name, _leak(f"{module.__name__}.{name}"))
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


class Sleeper:
    """A task parked until an instant (:func:`park_until`), or until woken
    before it (:meth:`wake`), whichever comes first."""

    __slots__ = ("live", "task")

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.live = True

    def wake(self) -> None:
        """Reschedule the task now, unless it was woken (or cancelled) already."""
        if self.live:
            self.live = False
            trio.lowlevel.reschedule(self.task)


class SimClock(trio.abc.Clock):
    """Virtual time, in seconds from 0, that moves only when every task is
    blocked: then it jumps to the next deadline.

    trio asks a clock how long to sleep until the next deadline only when
    no task is runnable; this clock answers by jumping there and saying
    "no sleep", so trio's same pass of its loop expires that deadline and
    runs the tasks it wakes.  ``MockClock(autojump_threshold=0)`` reaches
    the same instants with the same tasks runnable, but its jump comes
    after the pass's I/O wait, so each instant costs a second pass that
    runs nothing; and each of its readings converts the real clock.  The
    runs are the same step for step (the scheduler's random draws are
    made per runnable batch, and the empty passes ran none).

    It also keeps deadlines of its own, for the simulator's sleeps and
    timed waits (:func:`sleep`, :func:`park_until`): a parked task, woken
    with a value when its instant comes, in the same pass as a trio
    deadline at that instant would wake it.  A trio deadline wakes its task
    by cancelling a scope, which raises and catches ``Cancelled``: the
    simulator waits for some 10,000 instants a seed, and its own wake-ups
    cost a fraction of that.  The tasks woken are the same, in the same
    passes: the runs are the same step for step.

    Nothing under simulation does real I/O (see ``SIMULATION.md``); with
    no deadline left and every task blocked the run is deadlocked, and,
    as under MockClock, trio then waits on real I/O for ever."""

    __slots__ = ("_now", "_seq", "_sleepers")

    def __init__(self) -> None:
        self._now = 0.0
        self._sleepers: list[tuple[float, int, Sleeper]] = []
        self._seq = 0

    def start_clock(self) -> None:
        pass

    def current_time(self) -> float:
        return self._now

    def deadline_to_sleep_time(self, deadline: float) -> float:
        sleepers = self._sleepers
        while sleepers and not sleepers[0][2].live:
            heapq.heappop(sleepers)  # woken before its instant, or cancelled
        if sleepers and sleepers[0][0] <= deadline:
            self._now = max(self._now, sleepers[0][0])
            while sleepers and sleepers[0][0] <= self._now:
                heapq.heappop(sleepers)[2].wake()
            return 0.0
        if deadline > self._now:
            if deadline == math.inf:
                return 86_400.0
            self._now = deadline
        return 0.0

    def jump(self, seconds: float) -> None:
        """Move virtual time forward (the busy-loop nudge)."""
        if seconds < 0:
            raise ValueError("time does not go backwards")
        self._now += seconds

    def park(self, at_s: float, sleeper: Sleeper) -> None:
        """Wake ``sleeper`` at ``at_s`` (a later instant than now)."""
        self._seq += 1
        heapq.heappush(self._sleepers, (at_s, self._seq, sleeper))


async def park_until(at_s: float, waiters: list[Sleeper] | None = None) -> None:
    """Block until virtual time ``at_s`` (``math.inf``: no time), or until
    woken earlier through the :class:`Sleeper` appended to ``waiters`` (the
    caller wakes what it holds there).  A checkpoint; cancellable.  Under another clock than
    :class:`SimClock` (unit tests on MockClock): trio's own deadline."""
    clock = trio.lowlevel.current_clock()
    if not isinstance(clock, SimClock):
        if waiters is None:
            await trio.sleep_until(at_s)
            return
        sleeper = Sleeper(trio.lowlevel.current_task())
        waiters.append(sleeper)
        with trio.move_on_at(at_s):
            await _park(sleeper)
        return
    if at_s <= clock._now:
        await trio.lowlevel.checkpoint()
        return
    sleeper = Sleeper(trio.lowlevel.current_task())
    if at_s != math.inf:
        clock.park(at_s, sleeper)
    if waiters is not None:
        waiters.append(sleeper)
    await _park(sleeper)


async def _park(sleeper: Sleeper) -> None:
    def abort(_: object) -> trio.lowlevel.Abort:
        sleeper.live = False
        return trio.lowlevel.Abort.SUCCEEDED

    await trio.lowlevel.wait_task_rescheduled(abort)


async def sleep_until(at_s: float) -> None:
    """``trio.sleep_until`` for the simulator's own tasks (:func:`park_until`)."""
    await park_until(at_s)


async def sleep(seconds: float) -> None:
    """``trio.sleep`` for the simulator's own tasks (:func:`park_until`)."""
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    await park_until(trio.current_time() + seconds)


def new_clock() -> SimClock:
    """The virtual clock of a run (:class:`SimClock`)."""
    return SimClock()


RUN_GC_THRESHOLDS = (50_000, 20, 100)
"""``gc.set_threshold`` during a run (Python's defaults: 700, 10, 10).
Measured on 30 seeds, 3 rounds: 6 % less CPU, peak RSS 118 -> 123 MB."""


def run_deterministic(
    fn: Callable[[], Awaitable[T]],
    *,
    seed: int | str,
    instruments: tuple[trio.abc.Instrument, ...] = (),
    clock: trio.abc.Clock | None = None,
) -> T:
    """Run ``fn`` under trio on virtual time, scheduled as a function of
    ``seed``.  Call from the main thread, one run at a time."""
    self_test()
    module = _trio_run_module()
    allowed = module._ALLOW_DETERMINISTIC_SCHEDULING
    module._ALLOW_DETERMINISTIC_SCHEDULING = True
    module._r.seed(f"trio-scheduler:{seed}")
    thresholds = gc.get_threshold()
    gc.set_threshold(*RUN_GC_THRESHOLDS)
    try:
        with _guards():
            return trio.run(
                fn,
                clock=clock if clock is not None else new_clock(),
                instruments=instruments,
                strict_exception_groups=True,
            )
    finally:
        gc.set_threshold(*thresholds)
        module._ALLOW_DETERMINISTIC_SCHEDULING = allowed
