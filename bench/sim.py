"""Simulator figures: seeds per minute and virtual seconds per wall second,
on one core (seeds one after another in this process) and on ``--jobs``
worker processes (the sweep ``python -m sim`` runs).

    .venv/bin/python bench/sim.py [--seeds 60] [--profile ci|full] [--jobs 2]

Run it alone on the machine: the figures are wall-clock rates.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import statistics
import sys
import time

# this script is named like the package it measures: take its own folder off
# the path so that ``sim`` is the simulator
_HERE = pathlib.Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != _HERE]
sim = importlib.import_module("sim")


def _pin_hash_seed() -> None:
    """Re-execute with ``PYTHONHASHSEED=0``, as ``python -m sim`` does."""
    if os.environ.get("PYTHONHASHSEED") != "0":
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main() -> None:
    _pin_hash_seed()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=60)
    parser.add_argument("--profile", choices=("ci", "full"), default="ci")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    seeds = list(range(args.seeds))

    started = time.perf_counter()
    walls: list[float] = []
    virtual_s = 0.0
    applied = 0
    steps = 0
    for seed in seeds:
        result = sim.run_seed(seed, profile=args.profile, exclude=sim.KNOWN_BUGS)
        walls.append(result.wall_s)
        virtual_s += result.virtual_s
        applied += result.applied
        steps += result.steps
    wall_s = time.perf_counter() - started
    print(f"profile {args.profile}, {len(seeds)} seeds (known-bug faults off)")
    print(
        f"one core:   {60 * len(seeds) / wall_s:7.1f} seeds/min, "
        f"{virtual_s / wall_s:6.1f} virtual s per wall s, "
        f"median {statistics.median(walls):.2f} s per seed (max {max(walls):.2f}), "
        f"{applied / wall_s:,.0f} events applied per wall s, "
        f"{1e6 * wall_s / max(1, steps):.1f} us per task step"
    )
    options = sim.SweepOptions(profile=args.profile, exclude=sim.KNOWN_BUGS, jobs=args.jobs)
    summary = sim.sweep(seeds, options, None)
    totals = summary.totals()
    print(
        f"{args.jobs} processes: {totals['seeds_per_min']:7.1f} seeds/min, "
        f"{totals['virtual_s_per_wall_s']:6.1f} virtual s per wall s"
    )


if __name__ == "__main__":
    main()
