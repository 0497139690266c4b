"""Shrinking: a failing seed reduced to a small run that still fails.

A run is a pure function of (seed, planted bugs, exclusions, narrowing):
the seed fixes every random stream, the narrowing (``_config.Narrowing``)
says which faults happen when, which clients take part and how long the
fault phase is.  So a failure can be reduced with the seed fixed:

1. no faults at all, else delta debugging (``ddmin``) over the recorded
   fault list;
2. each workload turned off in turn (``--exclude``);
3. each client removed in turn (the others keep their own streams);
4. the fault phase cut short (to the end of the last fault, then halved
   while it still fails);

then the fault list once more, since fewer clients may need fewer faults.
"Still fails" means: with a violation of the kind the original failed with
first (a shrink that trades the bug for another is no use).  The result is
a replay command (``python -m sim --seed N --faults ...``) and a short
trace of the minimal run, replayed once more to show it is deterministic.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import attrs

from ._config import Fault, Narrowing, draw_config
from ._runner import RunResult, run_seed

__all__ = ["ShrinkResult", "ddmin", "short_trace", "shrink"]

T = TypeVar("T")

TRACE_KEEP_KINDS = frozenset({"fault", "VIOLATION", "phase", "log", "workload", "setup"})
"""Trace lines always kept in the short trace (the rest: only the lines
just before the first violation)."""
TRACE_CONTEXT_LINES = 30
TRACE_MAX_LINES = 80


def ddmin(items: Sequence[T], fails: Callable[[tuple[T, ...]], bool]) -> tuple[T, ...]:
    """Zeller's delta debugging: a subsequence of ``items`` (order kept) for
    which ``fails`` holds and from which no single item can be removed with
    it still holding (1-minimal, if ``fails`` is deterministic).  ``fails``
    must hold for ``items``; it is never asked the same subset twice."""
    asked: dict[tuple[T, ...], bool] = {}

    def test(subset: tuple[T, ...]) -> bool:
        if subset not in asked:
            asked[subset] = fails(subset)
        return asked[subset]

    current = tuple(items)
    if current and test(()):
        return ()
    n = 2
    while len(current) >= 2:
        size = math.ceil(len(current) / n)
        chunks = [current[i : i + size] for i in range(0, len(current), size)]
        reduced = False
        for chunk in chunks:
            if test(chunk):
                current, n, reduced = chunk, 2, True
                break
        if not reduced and len(chunks) > 2:
            for i in range(len(chunks)):
                rest = tuple(x for j, c in enumerate(chunks) if j != i for x in c)
                if test(rest):
                    current, n, reduced = rest, max(n - 1, 2), True
                    break
        if not reduced:
            if n >= len(current):
                break
            n = min(len(current), 2 * n)
    return current


@attrs.frozen
class ShrinkResult:
    original: RunResult
    final: RunResult
    narrowing: Narrowing
    exclude: tuple[str, ...]
    kind: str
    """The kind of violation kept through the shrink."""
    runs: int
    wall_s: float
    trace: str
    """The short readable trace of the minimal run."""
    replays: bool
    """The minimal run, run once more, gave the same trace hash."""
    original_faults: int

    @property
    def command(self) -> str:
        return self.final.replay_command()

    def report(self) -> str:
        faults = self.narrowing.faults or ()
        lines = [
            f"shrunk seed {self.original.seed} ({self.kind}) in {self.runs} runs, "
            f"{self.wall_s:.1f}s: {self.original_faults} faults -> {len(faults)}"
            + (f", clients {', '.join(self.narrowing.clients)}" if self.narrowing.clients else "")
            + (f", fault phase {self.narrowing.fault_s}s" if self.narrowing.fault_s else "")
            + (f", without {', '.join(self.exclude)}" if self.exclude else ""),
        ]
        for fault in faults:
            lines.append(f"  {fault.describe()}")
        first = self.final.violations[0] if self.final.violations else None
        if first is not None:
            lines.append(f"  first violation: {first.describe()}")
        lines.append(
            f"  replay ({'deterministic' if self.replays else 'DID NOT REPLAY'}): {self.command}"
        )
        lines.append("  trace:")
        lines.extend(f"    {line}" for line in self.trace.splitlines())
        return "\n".join(lines)


def short_trace(text: str, who: str | None = None) -> str:
    """The lines of a printed trace worth reading: faults, phases, logs,
    the first violations, and the last lines before the first violation
    (those about ``who``, the client or actor that saw it, if given)."""
    lines = [line for line in text.splitlines() if line[:13].strip().lstrip("-").isdigit()]

    def kind(line: str) -> str:
        return line[14:23].strip()

    violations = [i for i, line in enumerate(lines) if kind(line) == "VIOLATION"]
    first = violations[0] if violations else len(lines)
    about = [
        i
        for i in range(first)
        if who is None or f" {who} " in lines[i] or lines[i].endswith(f" {who}")
    ]
    keep = set(about[-TRACE_CONTEXT_LINES:])
    keep.update(i for i, line in enumerate(lines) if kind(line) in TRACE_KEEP_KINDS - {"VIOLATION"})
    keep.update(violations[:5])
    out: list[str] = []
    last = -1
    for i in sorted(keep):
        if i != last + 1 and out:
            out.append("    ...")
        out.append(lines[i])
        last = i
    if len(violations) > 5:
        out.append(f"    ... and {len(violations) - 5} more violations")
    if len(out) > TRACE_MAX_LINES:
        out = [*out[: TRACE_MAX_LINES // 4], "    ...", *out[-(3 * TRACE_MAX_LINES) // 4 :]]
    return "\n".join(out)


def shrink(
    seed: int,
    *,
    profile: str = "ci",
    plant: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    only: tuple[str, ...] = (),
    narrow: Narrowing | None = None,
    max_runs: int = 200,
    max_wall_s: float = 600.0,
    progress: Callable[[str], None] | None = None,
) -> ShrinkResult | None:
    """Shrink ``seed``; None if it does not fail."""
    started = time.perf_counter()
    say = progress or (lambda text: None)
    runs = 0

    def run(narrowing: Narrowing, excluded: tuple[str, ...]) -> RunResult:
        nonlocal runs
        runs += 1
        return run_seed(
            seed, profile=profile, plant=plant, exclude=excluded, only=only, narrow=narrowing
        )

    narrowing = narrow or Narrowing()
    original = run(narrowing, exclude)
    if original.ok:
        return None
    kind = original.violations[0].kind
    config = narrowing.apply(draw_config(seed, profile, exclude=exclude, only=only))
    faults = narrowing.plan(config)
    original_faults = len(faults)
    narrowing = attrs.evolve(narrowing, faults=faults)
    excluded = exclude
    first_seen_us = min(v.at_us for v in original.violations if v.kind == kind)
    say(f"seed {seed} fails with {kind}; {len(faults)} faults")

    def budget_left() -> bool:
        return runs < max_runs and time.perf_counter() - started < max_wall_s

    def still_fails(candidate: Narrowing, candidate_exclude: tuple[str, ...]) -> bool:
        if not budget_left():
            return False
        nonlocal first_seen_us
        result = run(candidate, candidate_exclude)
        seen = [v.at_us for v in result.violations if v.kind == kind]
        if seen:
            first_seen_us = min(seen)
        return bool(seen)

    def shrink_faults() -> None:
        nonlocal narrowing
        assert narrowing.faults is not None

        def fails(subset: tuple[Fault, ...]) -> bool:
            return still_fails(attrs.evolve(narrowing, faults=subset), excluded)

        kept = ddmin(narrowing.faults, fails)
        if kept != narrowing.faults:
            say(f"faults {len(narrowing.faults)} -> {len(kept)}")
            narrowing = attrs.evolve(narrowing, faults=kept)

    shrink_faults()
    # workloads, one at a time
    for workload in config.workloads:
        if workload in excluded:
            continue
        candidate = (*excluded, workload)
        if still_fails(narrowing, candidate):
            say(f"without the {workload} workload")
            excluded = candidate
    # clients, one at a time (at least one stays)
    names = [c.name for c in config.clients]
    for name in list(names):
        if len(names) <= 1:
            break
        keep = tuple(n for n in names if n != name)
        if still_fails(attrs.evolve(narrowing, clients=keep), excluded):
            say(f"without client {name}")
            names = list(keep)
            narrowing = attrs.evolve(narrowing, clients=keep)
    # the fault phase: cut to just after the last fault ends and the first
    # violation happened (or halfway there)
    assert narrowing.faults is not None
    end_us = max((f.at_us + f.duration_us for f in narrowing.faults), default=0)
    seen_us = first_seen_us if 0 < first_seen_us < config.fault_s * 1_000_000 else 0
    floor = math.ceil(max(end_us, seen_us) / 1_000_000) + 1
    for target in sorted({floor, (floor + config.fault_s) // 2}):
        if target < config.fault_s and still_fails(
            attrs.evolve(narrowing, fault_s=target), excluded
        ):
            narrowing = attrs.evolve(narrowing, fault_s=target)
            say(f"fault phase {target}s")
            break
    if narrowing.clients is not None or narrowing.fault_s is not None:
        shrink_faults()
    # the minimal run once more, silent and printed: the short trace, and
    # proof that it replays (the printed run hashes as the silent one)
    final = run(narrowing, excluded)
    echo = io.StringIO()
    replayed = run_seed(
        seed,
        profile=profile,
        plant=plant,
        exclude=excluded,
        only=only,
        narrow=narrowing,
        echo=echo,
    )
    runs += 1
    return ShrinkResult(
        original=original,
        final=final,
        narrowing=narrowing,
        exclude=tuple(w for w in excluded if w not in exclude),
        kind=kind,
        runs=runs,
        wall_s=time.perf_counter() - started,
        trace=short_trace(echo.getvalue(), final.violations[0].who if final.violations else None),
        replays=replayed.trace_hash == final.trace_hash
        and any(v.kind == kind for v in final.violations),
        original_faults=original_faults,
    )
