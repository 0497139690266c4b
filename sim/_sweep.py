"""Many seeds in parallel: one worker process per job, each running one
seed at a time (trio's scheduler randomness is per process), forked from
the parent once the simulator is imported.  A seed that runs longer than
its wall-clock limit is a failure: its worker is killed and replaced."""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections.abc import Sequence
from multiprocessing.process import BaseProcess
from typing import Any, TextIO

import attrs

from agor_actors.marks import MARKS

__all__ = ["SweepOptions", "SweepSummary", "default_jobs", "sweep"]


@attrs.frozen
class SweepOptions:
    profile: str = "ci"
    plant: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    only: tuple[str, ...] = ()
    jobs: int = 2
    seed_timeout_s: float = 120.0
    stop_after_failures: int | None = None

    def replay(self, seed: int) -> str:
        parts = ["python -m sim --seed", str(seed)]
        if self.profile != "ci":
            parts += ["--profile", self.profile]
        for name in self.plant:
            parts += ["--plant", name]
        for name in self.exclude:
            parts += ["--exclude", name]
        for name in self.only:
            parts += ["--only", name]
        return " ".join([*parts, "--trace"])


@attrs.define
class SweepSummary:
    options: SweepOptions
    seeds: list[int]
    results: dict[int, dict[str, Any]] = attrs.field(factory=dict)
    wall_s: float = 0.0

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [self.results[s] for s in sorted(self.results) if not self.results[s]["ok"]]

    def totals(self) -> dict[str, Any]:
        done = list(self.results.values())
        injected: dict[str, int] = {}
        kinds: dict[str, int] = {}
        claims: dict[str, int] = {}
        locks: dict[str, int] = {}
        marks: dict[str, int] = dict.fromkeys(MARKS, 0)
        for r in done:
            for name, n in r.get("marks", {}).items():
                marks[name] = marks.get(name, 0) + n
            for kind, n in r.get("injected", {}).items():
                injected[kind] = injected.get(kind, 0) + n
            for name, n in r.get("counters", {}).items():
                if name.startswith("claims:"):
                    claims[name[len("claims:") :]] = claims.get(name[len("claims:") :], 0) + n
                elif name.startswith("locks:"):  # several nodes (sim/_locks.py)
                    locks[name[len("locks:") :]] = locks.get(name[len("locks:") :], 0) + n
            for v in r.get("violations", []):
                kinds[v["kind"]] = kinds.get(v["kind"], 0) + 1
        virtual_s = sum(float(r.get("virtual_s", 0.0)) for r in done)
        late = [r["seed"] for r in done if r.get("counters", {}).get("presence_late")]
        return {
            "seeds": len(done),
            "failures": len(self.failures),
            "virtual_s": virtual_s,
            "log_events": sum(int(r.get("log_events", 0)) for r in done),
            "applied": sum(int(r.get("applied", 0)) for r in done),
            "frames": sum(int(r.get("frames", 0)) for r in done),
            "writes": sum(int(r.get("writes", 0)) for r in done),
            "acknowledged": sum(int(r.get("acknowledged", 0)) for r in done),
            "injected": dict(sorted(injected.items())),
            "violation_kinds": dict(sorted(kinds.items())),
            "claims_checked": dict(sorted(claims.items())),
            "store_locks": dict(sorted(locks.items())),
            "marks": marks,
            "presence_late": len(late),
            "presence_late_seeds": late[:10],
            "marks_never": sorted(name for name, n in marks.items() if not n),
            "wall_s": self.wall_s,
            "seeds_per_min": 60 * len(done) / self.wall_s if self.wall_s else 0.0,
            "virtual_s_per_wall_s": virtual_s / self.wall_s if self.wall_s else 0.0,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "options": attrs.asdict(self.options),
            "totals": self.totals(),
            "results": [self.results[s] for s in sorted(self.results)],
        }


class _SeedTimeout(Exception):
    pass


def _worker(conn: multiprocessing.connection.Connection, options: SweepOptions) -> None:
    from ._runner import run_seed

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            seed = conn.recv()
        except EOFError:
            return
        if seed is None:
            return
        result = run_seed(
            seed,
            profile=options.profile,
            plant=options.plant,
            exclude=options.exclude,
            only=options.only,
        )
        conn.send(result.to_json())


def _timeout_result(seed: int, options: SweepOptions) -> dict[str, Any]:
    detail = f"no verdict within {options.seed_timeout_s:.0f} s of wall time (a hang?)"
    return {
        "seed": seed,
        "ok": False,
        "violations": [{"kind": "timeout", "at_us": 0, "who": "sweep", "detail": detail}],
        "replay": options.replay(seed),
        "injected": {},
    }


@attrs.define(eq=False)
class _Slot:
    process: BaseProcess
    conn: multiprocessing.connection.Connection
    seed: int | None = None
    started: float = 0.0


class _Progress:
    def __init__(self, out: TextIO | None, total: int) -> None:
        self._out = out
        self._total = total
        self._tty = bool(out is not None and out.isatty())
        self._last_line = -1
        self._started = time.perf_counter()

    def update(self, done: int, failures: int) -> None:
        if self._out is None:
            return
        elapsed = time.perf_counter() - self._started
        rate = 60 * done / elapsed if elapsed else 0.0
        left = (self._total - done) / (done / elapsed) if done and elapsed else 0.0
        width = 30
        filled = width * done // max(1, self._total)
        text = (
            f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self._total} seeds, "
            f"{failures} failed, {rate:.0f} seeds/min, {left:.0f}s left"
        )
        if self._tty:
            print(f"\r{text}", end="", file=self._out, flush=True)
            if done == self._total:
                print(file=self._out)
        else:
            tenth = 10 * done // max(1, self._total)
            if tenth != self._last_line:
                self._last_line = tenth
                print(text, file=self._out, flush=True)


def sweep(seeds: Sequence[int], options: SweepOptions, progress: TextIO | None) -> SweepSummary:
    """Run ``seeds`` on ``options.jobs`` worker processes."""
    import sim._runner  # noqa: F401  (imported before forking: workers start warm)

    context = multiprocessing.get_context("fork")
    summary = SweepSummary(options, list(seeds))
    queue = list(seeds)
    queue.reverse()
    bar = _Progress(progress, len(seeds))
    started = time.perf_counter()
    slots: list[_Slot] = []

    def spawn() -> _Slot:
        parent, child = context.Pipe()
        process = context.Process(target=_worker, args=(child, options), daemon=True)
        process.start()
        child.close()
        return _Slot(process, parent)

    def stop(slot: _Slot) -> None:
        if slot.process.is_alive():
            slot.process.kill()
        slot.process.join()
        slot.conn.close()

    stop_at = options.stop_after_failures
    try:
        slots = [spawn() for _ in range(max(1, min(options.jobs, len(queue))))]
        while True:
            enough = stop_at is not None and len(summary.failures) >= stop_at
            for slot in slots:
                if slot.seed is None and queue and not enough:
                    slot.seed = queue.pop()
                    slot.started = time.perf_counter()
                    slot.conn.send(slot.seed)
            busy = [s for s in slots if s.seed is not None]
            if not busy:
                break
            ready = multiprocessing.connection.wait([s.conn for s in busy], timeout=0.5)
            now = time.perf_counter()
            for i, slot in enumerate(slots):
                seed = slot.seed
                if seed is None:
                    continue
                if slot.conn in ready:
                    try:
                        result = slot.conn.recv()
                    except EOFError:
                        result = _timeout_result(seed, options)
                        result["violations"][0]["detail"] = "the worker process died"
                        stop(slot)
                        slots[i] = slot = spawn()
                    summary.results[result["seed"]] = result
                    slot.seed = None
                elif now - slot.started > options.seed_timeout_s:
                    summary.results[seed] = _timeout_result(seed, options)
                    stop(slot)
                    slots[i] = spawn()
                else:
                    continue
                bar.update(len(summary.results), len(summary.failures))
    finally:
        for slot in slots:
            with contextlib.suppress(OSError):
                slot.conn.send(None)
            slot.process.join(timeout=5)
            stop(slot)
    summary.wall_s = time.perf_counter() - started
    return summary


def default_jobs() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
