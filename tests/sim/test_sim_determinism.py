"""The same seed gives the same run (trace hash, final random states, task
steps) in fresh processes and in a worker that ran other seeds first;
other seeds give other runs."""

from __future__ import annotations

import pathlib

import pytest
from sim_support import run_sim


@pytest.mark.slow
def test_same_seed_same_run_in_fresh_processes(tmp_path: pathlib.Path) -> None:
    status_a, a, out_a = run_sim(tmp_path, "--seed", "1", "--skip-known")
    status_b, b, out_b = run_sim(tmp_path, "--seed", "1", "--skip-known")
    assert status_a == status_b == 0, out_a + out_b
    for key in ("trace_hash", "rng_hash", "steps", "trace_lines", "virtual_s", "log_events"):
        assert a[key] == b[key], key
    assert a["applied"] > 0 and a["log_events"] > 0


@pytest.mark.slow
def test_a_warm_worker_replays_a_seed_exactly(tmp_path: pathlib.Path) -> None:
    _, single, _ = run_sim(tmp_path, "--seed", "5", "--skip-known")
    status, swept, output = run_sim(
        tmp_path, "--seeds", "4", "--first", "2", "--jobs", "1", "--skip-known"
    )
    assert status == 0, output
    by_seed = {r["seed"]: r for r in swept["results"]}
    assert by_seed[5]["trace_hash"] == single["trace_hash"]
    assert by_seed[5]["rng_hash"] == single["rng_hash"]
    hashes = {r["trace_hash"] for r in swept["results"]}
    assert len(hashes) == 4, "different seeds must give different runs"
    assert len({r["rng_hash"] for r in swept["results"]}) == 4


def test_a_failure_prints_the_command_that_replays_it(tmp_path: pathlib.Path) -> None:
    status, result, output = run_sim(
        tmp_path, "--seed", "0", "--plant", "fanout_reorder", "--skip-known"
    )
    assert status == 1
    assert not result["ok"]
    replay = "python -m sim --seed 0 --plant fanout_reorder"
    assert result["replay"].startswith(replay)
    assert f"replay: {replay}" in output
