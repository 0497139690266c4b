"""``python -m sim``: sweep seeds, or replay one with its trace.

    python -m sim --seeds 1000 [--jobs N]        sweep seeds 0..999
    python -m sim --seed 17 --trace              replay seed 17, printing its trace
    python -m sim --seeds 200 --skip-known       the CI sweep (known daemon bugs off)
    python -m sim --seeds 50 --plant dedupe_off  a planted bug must make seeds fail
    python -m sim --seed 3 --plant X --shrink    reduce a failing seed to a short replayable run
    python -m sim --seed 3 --faults 'reset@1500000:t2,storm@4000000:s65536:d3000000'
                                                 replay an explicit fault list (or --faults FILE)
    python -m sim --scenario flaky-teammate --trace   run a scenario of sim.scenarios
    python -m sim --seeds 100 --profile cluster --skip-known
                                                 the multi-node sweep (2-3 daemons, one
                                                 store, one simulated broker)

The process re-executes itself with ``PYTHONHASHSEED=0`` first.  Exit status:
0 when every seed passed, 1 when one failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from ._config import EXCLUDABLE, FAULT_KINDS, PROFILES, Narrowing, draw_config, parse_faults
from ._det import ensure_hash_seed, self_test
from ._planted import PLANTED
from ._runner import PRESENCE_LAG_S
from ._sweep import SweepOptions, SweepSummary, default_jobs, sweep

__all__ = ["KNOWN_BUGS", "KNOWN_CLUSTER_BUGS", "main"]

KNOWN_BUGS: tuple[str, ...] = ()
"""Fault kinds (and workloads) that reveal daemon bugs found by the
simulator and not fixed yet; ``--skip-known`` leaves them out.  Add a kind
here (with the replay command in the commit) only while its fix is pending.
Fixed so far: ``crash_room`` (twice: subscribers forgotten; then ``lagged``
past events offered but not sent), ``store_after``, ``crash_writer``,
``cursors``, and ``bursts`` (pipelined chunks reordered across a session
restart: writes now enter the session's mailbox in the reader, in order).

Fixed since: ``store_chunk``.  A streamed chunk refused on its own (an
integrity error) while later chunks of the same message were already on
their way to the writer: their events carried offsets that counted the
refused chunk, which the message's content does not hold (``python -m sim
--seed 21 --only store_chunk``).  The writer now moves those offsets back
(``WriterState.shifts``, per coalesce key; the session names its
knowledge of the message in the key, so chunks planned after it learned
of the refusal are left as they are).

Found and counted (``presence late`` in the summary), then fixed: a room
actor that restarts (``crash_room``, some partitions) forgot its board's
presence, and the facepiles stayed empty until the user's next status
change (idle, after 60 s); the hub now has every present user send the
new room their entry again (``python -m sim --seed 39 --trace`` converged
at 66 s before, the rooms at 6 s)."""


def _names(values: list[str] | None) -> tuple[str, ...]:
    out: list[str] = []
    for value in values or []:
        out.extend(v for v in value.split(",") if v)
    return tuple(dict.fromkeys(out))


def _at_least(least: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``least`` (``--seeds 0`` or
    ``--jobs -1`` ran nothing, or one job, without a word)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is less than {least}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sim",
        description="The deterministic simulator: the daemon, its connections and clients "
        "on virtual time, with faults, from one seed.",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--seeds", type=_at_least(1), metavar="N", help="sweep N seeds (from --first)"
    )
    which.add_argument("--seed", type=_at_least(0), metavar="S", help="run one seed")
    which.add_argument(
        "--scenario", metavar="NAME", help="run a scenario of sim.scenarios (see its list)"
    )
    parser.add_argument(
        "--first", type=_at_least(0), default=0, metavar="S", help="first seed of a sweep"
    )
    parser.add_argument("--jobs", type=_at_least(1), default=default_jobs(), metavar="N")
    parser.add_argument("--profile", choices=PROFILES, default="ci")
    parser.add_argument(
        "--plant", action="append", metavar="BUG", help=f"plant a bug: {', '.join(PLANTED)}"
    )
    parser.add_argument(
        "--exclude", action="append", metavar="KIND", help=f"turn off: {', '.join(EXCLUDABLE)}"
    )
    parser.add_argument(
        "--only", action="append", metavar="KIND", help="only these fault kinds, on in every seed"
    )
    parser.add_argument(
        "--skip-known",
        action="store_true",
        help=f"exclude what reveals known, unfixed daemon bugs ({', '.join(KNOWN_BUGS)})",
    )
    parser.add_argument("--trace", action="store_true", help="print the run's trace (--seed)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON ('-': stdout)")
    parser.add_argument("--timeout", type=float, default=120.0, help="wall seconds per seed")
    parser.add_argument(
        "--stop-after", type=_at_least(1), metavar="N", help="stop a sweep after N failed seeds"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--faults",
        metavar="LIST|FILE",
        help="run this fault list instead of the drawn one (--seed): a compact string "
        "'kind@us[:tN][:sN][:dUS][:up|:down],...', 'none', or a file holding one",
    )
    parser.add_argument(
        "--clients", metavar="NAMES", help="keep only these clients of the seed (--seed)"
    )
    parser.add_argument(
        "--fault-s", type=_at_least(0), metavar="S", help="length of the fault phase (--seed)"
    )
    parser.add_argument(
        "--shrink",
        action="store_true",
        help="reduce a failing seed (--seed; with --seeds: the first failure) to a minimal "
        "fault list, workloads and clients, printed as a replay command and a short trace",
    )
    parser.add_argument(
        "--shrink-runs",
        type=_at_least(1),
        default=200,
        metavar="N",
        help="at most N runs for --shrink",
    )
    return parser


def _narrowing(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Narrowing:
    faults = None
    if args.faults is not None:
        text = args.faults
        if os.path.isfile(text):
            with open(text) as f:
                text = f.read()
        try:
            faults = parse_faults(text)
        except ValueError as exc:
            parser.error(str(exc))
    clients = None
    if args.clients is not None:
        clients = () if args.clients == "none" else _names([args.clients])
    return Narrowing(faults=faults, clients=clients, fault_s=args.fault_s)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _print_summary(summary: SweepSummary) -> None:
    t = summary.totals()
    options = summary.options
    seeds = summary.seeds
    span = f"{seeds[0]}..{seeds[-1]}" if seeds else "none"
    print(f"seeds            {t['seeds']} ({span}, profile {options.profile}, {options.jobs} jobs)")
    if options.plant:
        print(f"planted bugs     {', '.join(options.plant)}")
    if options.exclude:
        print(f"excluded         {', '.join(options.exclude)}")
    print(f"virtual time     {_duration(t['virtual_s'])}")
    print(
        f"events           {t['log_events']} committed, {t['applied']} applied by clients, "
        f"{t['frames']} frames"
    )
    print(f"writes           {t['writes']} ({t['acknowledged']} acknowledged)")
    injected = ", ".join(f"{k} {n}" for k, n in t["injected"].items()) or "none"
    print(f"faults injected  {sum(t['injected'].values())}: {injected}")
    claims = ", ".join(f"{k} {n}" for k, n in t["claims_checked"].items()) or "none"
    print(f"claims checked   {claims}")
    if options.profile == "cluster" or t["store_locks"]:
        locks = ", ".join(f"{k} {n}" for k, n in t["store_locks"].items()) or "none"
        print(f"store locks      {locks}")
    reached = ", ".join(f"{k} {n}" for k, n in t["marks"].items() if n) or "none"
    print(f"coverage marks   {reached}")
    if t["marks_never"]:
        print(f"never reached    {', '.join(t['marks_never'])}")
    if t["presence_late"]:
        print(
            f"presence late    {t['presence_late']} seeds: facepiles settled over "
            f"{PRESENCE_LAG_S:g} s past the grace after the rooms, or past a dead node's "
            f"liveness too (seeds "
            f"{', '.join(map(str, t['presence_late_seeds']))}"
            f"{', ...' if t['presence_late'] > len(t['presence_late_seeds']) else ''}: "
            "their traces' facepile lines say when)"
        )
    print(f"failures         {t['failures']}")
    for failure in summary.failures[:20]:
        first = failure["violations"][0] if failure["violations"] else {}
        kinds = sorted({v["kind"] for v in failure["violations"]})
        print(f"  seed {failure['seed']}: {', '.join(kinds)}: {first.get('detail', '')[:160]}")
        print(f"    replay: {failure['replay']}")
    if len(summary.failures) > 20:
        print(f"  ... and {len(summary.failures) - 20} more")
    print(
        f"wall             {t['wall_s']:.1f}s: {t['seeds_per_min']:.1f} seeds/min, "
        f"{t['virtual_s_per_wall_s']:.1f} virtual s per wall s"
    )


def _write_json(path: str, payload: Any) -> None:
    text = json.dumps(payload, indent=1, default=str)
    if path == "-":
        print(text)
    else:
        with open(path, "w") as f:
            f.write(text + "\n")


KNOWN_CLUSTER_BUGS: tuple[str, ...] = ()
"""The same, for the multi-node runs (``--profile cluster``) only.

Fixed since: ``access``, a revocation that took effect on the daemon that
wrote it only (a guest connected to another node kept receiving the room;
``python -m sim --seed 5 --profile cluster``): DESIGN-NOTES "Permissions
and revocation".  ``renames``: each node runs its own actor for a session,
which merged a write against the record and clocks *it* last saw, so an
older stamp written through one node overwrote a newer one acknowledged
through another (``python -m sim --seed 18 --profile cluster --exclude
access``: an acknowledged rename lost; seed 23 showed it before the
cluster draws changed).  A write of the session's row in a shared store is
now held by the rev and the fields' clocks its actor believes, and a
refusal makes the actor load the row and merge again."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ensure_hash_seed("sim", argv)
    parser = _parser()
    args = parser.parse_args(argv)
    self_test()
    exclude = _names(args.exclude)
    if args.skip_known:
        known = KNOWN_BUGS + (KNOWN_CLUSTER_BUGS if args.profile == "cluster" else ())
        exclude = tuple(dict.fromkeys((*exclude, *known)))
    plant = _names(args.plant)
    only = _names(args.only)
    bad = sorted(set(plant) - set(PLANTED))
    bad += sorted(set(exclude) - set(EXCLUDABLE))
    bad += sorted(set(only) - set(FAULT_KINDS))
    if bad:
        parser.error(f"unknown name(s): {', '.join(bad)}")
    options = SweepOptions(
        profile=args.profile,
        plant=plant,
        exclude=exclude,
        only=only,
        jobs=max(1, args.jobs),
        seed_timeout_s=args.timeout,
        stop_after_failures=args.stop_after,
    )
    if args.scenario is not None:
        return _scenario(args.scenario, plant, trace=args.trace, json_path=args.json, parser=parser)
    narrow = _narrowing(args, parser)
    if not narrow.empty and args.seed is None:
        parser.error("--faults, --clients and --fault-s replay one seed: give --seed")
    if args.seed is not None:
        try:
            narrow.apply(draw_config(args.seed, options.profile, exclude=exclude, only=only))
        except ValueError as exc:
            parser.error(str(exc))
        status = _one(args.seed, options, trace=args.trace, json_path=args.json, narrow=narrow)
        if status and args.shrink:
            _shrink(args.seed, options, narrow, args.shrink_runs)
        return status
    count = 100 if args.seeds is None else args.seeds
    seeds = list(range(args.first, args.first + count))
    summary = sweep(seeds, options, None if args.quiet else sys.stderr)
    _print_summary(summary)
    if args.json:
        _write_json(args.json, summary.to_json())
    if summary.failures and args.shrink:
        _shrink(summary.failures[0]["seed"], options, Narrowing(), args.shrink_runs)
    return 1 if summary.failures else 0


def _shrink(seed: int, options: SweepOptions, narrow: Narrowing, max_runs: int) -> None:
    from ._shrink import shrink

    print(f"shrinking seed {seed} (at most {max_runs} runs) ...", flush=True)
    result = shrink(
        seed,
        profile=options.profile,
        plant=options.plant,
        exclude=options.exclude,
        only=options.only,
        narrow=narrow,
        max_runs=max_runs,
        progress=lambda text: print(f"  {text}", flush=True),
    )
    if result is None:
        print(f"seed {seed} does not fail: nothing to shrink")
        return
    print(result.report())


def _one(
    seed: int,
    options: SweepOptions,
    *,
    trace: bool,
    json_path: str | None,
    narrow: Narrowing | None = None,
) -> int:
    from ._runner import run_seed

    result = run_seed(
        seed,
        profile=options.profile,
        plant=options.plant,
        exclude=options.exclude,
        only=options.only,
        echo=sys.stdout if trace else None,
        narrow=narrow,
    )
    if not trace:
        print(result.config)
    return _report(f"seed {seed}", result, json_path)


def _scenario(
    name: str,
    plant: tuple[str, ...],
    *,
    trace: bool,
    json_path: str | None,
    parser: argparse.ArgumentParser,
) -> int:
    from ._scenario import run_scenario
    from .scenarios import EXAMPLES

    if name not in EXAMPLES:
        parser.error(f"no scenario {name!r}; known: {', '.join(EXAMPLES)}")
    result = run_scenario(EXAMPLES[name], plant=plant, echo=sys.stdout if trace else None)
    if not trace:
        print(result.config)
    return _report(f"scenario {name}", result, json_path)


def _report(what: str, result: Any, json_path: str | None) -> int:
    print(
        f"{what}: {'ok' if result.ok else 'FAILED'}; trace {result.trace_hash}, "
        f"rng {result.rng_hash}; {result.virtual_s:.1f} virtual s "
        f"(converged at {result.converged_s if result.converged_s is not None else 'never'}), "
        f"{result.log_events} events, {result.applied} applied, {result.steps} steps, "
        f"{result.wall_s:.2f} wall s"
    )
    injected = ", ".join(f"{k} {n}" for k, n in result.injected.items()) or "none"
    print(f"faults injected: {injected}")
    counters = ", ".join(f"{k} {n}" for k, n in result.counters.items())
    print(f"counters: {counters or 'none'}")
    for violation in result.violations:
        print(f"  {violation.describe()}")
    if not result.ok:
        print(f"replay: {result.replay_command()}")
    if json_path:
        _write_json(json_path, result.to_json())
    return 0 if result.ok else 1
