"""Shrinking: a failing seed reduced to a smaller run that still fails the
same way, printed as a command that replays it; and the explicit fault
lists that make it possible."""

from __future__ import annotations

import pathlib
import re
import shlex

import pytest
from sim_support import run_sim

from sim import FAULT_KINDS, draw_config, draw_faults
from sim._config import Fault, Narrowing, encode_faults, parse_faults
from sim._shrink import ddmin, short_trace


def test_ddmin_finds_a_one_minimal_subset_and_never_asks_twice() -> None:
    asked: list[tuple[int, ...]] = []

    def fails(subset: tuple[int, ...]) -> bool:
        asked.append(subset)
        return {3, 7, 11} <= set(subset)

    assert ddmin(tuple(range(20)), fails) == (3, 7, 11)
    assert len(asked) == len(set(asked))
    assert ddmin((1, 2, 3), lambda subset: True) == ()
    assert ddmin((5,), lambda subset: 5 in subset) == (5,)
    # order is kept, and a failure that needs everything keeps everything
    assert ddmin((4, 1, 9), lambda subset: len(subset) == 3) == (4, 1, 9)


def test_fault_lists_round_trip_through_their_compact_form() -> None:
    for seed in range(30):
        faults = draw_faults(draw_config(seed))
        assert parse_faults(encode_faults(faults)) == faults
    assert parse_faults("none") == ()
    assert encode_faults(()) == "none"
    assert parse_faults("reset@5:t2,\n# a comment\none_way@9:s2:d100:up  storm@1") == (
        Fault(1, "storm"),
        Fault(5, "reset", target=2),
        Fault(9, "one_way", span=2, duration_us=100, direction="up"),
    )
    for bad in ("reset", "reset@x", "nothing@5", "reset@5:q1", "partition@5:sideways"):
        with pytest.raises(ValueError):
            parse_faults(bad)
    assert set(FAULT_KINDS) >= {f.kind for f in parse_faults("crash_room@1 store_after@2")}


def test_a_narrowing_keeps_the_rest_of_the_seed() -> None:
    config = draw_config(4)
    names = tuple(c.name for c in config.clients[:1])
    narrowed = Narrowing(faults=(), clients=names, fault_s=3).apply(config)
    assert narrowed.clients == config.clients[:1]
    assert narrowed.fault_s == 3 and narrowed.workloads == config.workloads
    assert Narrowing(fault_s=1).plan(config) == tuple(
        f for f in draw_faults(config) if f.at_us < 1_000_000
    )
    with pytest.raises(ValueError, match="no client"):
        Narrowing(clients=("nobody",)).apply(config)


def test_short_trace_keeps_faults_and_what_led_to_the_violation() -> None:
    lines = [f"{i * 10:>13} apply     w{i % 2} room {i}" for i in range(100)]
    lines.insert(50, f"{495:>13} fault         0.000s reset target=1 span=1")
    lines.insert(90, f"{895:>13} VIOLATION [gap] w1: room: gap")
    text = short_trace("seed 1 (profile ci)\n" + "\n".join(lines), "w1")
    kept = text.splitlines()
    assert "seed 1" not in text
    assert any("fault" in line for line in kept)
    assert "VIOLATION" in kept[-1]
    assert all(" w0 " not in line for line in kept)
    assert len([line for line in kept if " w1 " in line]) == 30


def test_an_explicit_fault_list_equal_to_the_drawn_one_replays_the_seed(
    tmp_path: pathlib.Path,
) -> None:
    seed = 3
    plan = encode_faults(draw_faults(draw_config(seed)))
    _, drawn, _ = run_sim(tmp_path, "--seed", str(seed))
    _, explicit, output = run_sim(tmp_path, "--seed", str(seed), "--faults", plan)
    assert explicit["trace_hash"] == drawn["trace_hash"], output
    assert explicit["replay"].startswith(f"python -m sim --seed {seed} --faults ")
    file = tmp_path / "faults.txt"
    file.write_text(plan.replace(",", "\n") + "\n")
    _, from_file, _ = run_sim(tmp_path, "--seed", str(seed), "--faults", str(file))
    assert from_file["trace_hash"] == drawn["trace_hash"]
    _, none, _ = run_sim(tmp_path, "--seed", str(seed), "--faults", "none")
    assert none["injected"] == {} and none["trace_hash"] != drawn["trace_hash"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_planted_bug_shrinks_to_a_smaller_run_that_replays(tmp_path: pathlib.Path) -> None:
    """``resume_off_by_one`` needs a reconnect, so it needs a fault: the
    first seed that catches it is shrunk; the result has fewer faults (or
    clients, workloads, virtual seconds), fails the same way, and the
    printed command replays it."""
    status, _, output = run_sim(
        tmp_path,
        "--seeds",
        "20",
        "--jobs",
        "2",
        "--plant",
        "resume_off_by_one",
        "--stop-after",
        "1",
        "--timeout",
        "60",
        "--shrink",
        "--shrink-runs",
        "80",
        timeout_s=280,
    )
    assert status == 1, output
    shrunk = re.search(
        r"shrunk seed (\d+) \((\w+)\) in (\d+) runs, [\d.]+s: (\d+) faults -> (\d+)(.*)", output
    )
    assert shrunk is not None, output
    seed, kind = int(shrunk[1]), shrunk[2]
    before, after, narrowed = int(shrunk[4]), int(shrunk[5]), shrunk[6]
    assert kind in ("replay", "gap")
    assert after <= before
    assert after < before or "clients" in narrowed or "without" in narrowed or "phase" in narrowed
    replay = re.search(r"replay \(deterministic\): (python -m sim .*)$", output, re.MULTILINE)
    assert replay is not None, output
    args = shlex.split(replay[1])[3:]
    assert args[:2] == ["--seed", str(seed)] and "--faults" in args
    status, result, replay_output = run_sim(tmp_path, *args)
    assert status == 1 and not result["ok"], replay_output
    assert kind in {v["kind"] for v in result["violations"]}
    assert sum(result["injected"].values()) <= after
    assert result["replay"] == replay[1]
