"""Scenarios (``sim._scenario``): runs written by hand, with the same
daemon, network, clients and invariants as a seed.  The three examples of
the seed document pass; a scenario is deterministic; a planted bug makes
one fail; and a scenario written here shows the API."""

from __future__ import annotations

import pytest

from sim import (
    CreateTask,
    Rename,
    Scenario,
    Stream,
    agent,
    at,
    fault,
    run_scenario,
    window,
)
from sim.scenarios import (
    DAEMON_KILLED_MID_STREAM,
    EXAMPLES,
    FLAKY_TEAMMATE,
    TWO_WINDOWS_AND_AN_AGENT,
)


def _ok(scenario: Scenario, plant: tuple[str, ...] = ()) -> dict[str, int]:
    result = run_scenario(scenario, plant=plant)
    assert result.ok, "\n".join(v.describe() for v in result.violations)
    assert result.converged_s is not None
    assert result.scenario == scenario.name
    assert result.replay_command() == f"python -m sim --scenario {scenario.name} --trace"
    return {"applied": result.applied, "acknowledged": result.acknowledged, **result.injected}


def test_two_windows_and_a_streaming_agent() -> None:
    seen = _ok(TWO_WINDOWS_AND_AN_AGENT)
    # 2 turns of 30 + 20 chunks, each window sees every event of the session
    assert seen["acknowledged"] >= 50 + 8
    assert seen["applied"] > 2 * 50


def test_a_teammate_on_a_flaky_network() -> None:
    seen = _ok(FLAKY_TEAMMATE)
    assert {k: seen.get(k) for k in ("partition", "one_way", "reset")} == {
        "partition": 2,
        "one_way": 2,
        "reset": 1,
    }


def test_the_daemon_killed_mid_stream() -> None:
    seen = _ok(DAEMON_KILLED_MID_STREAM)
    assert seen["daemon_crash"] == 2
    assert 0 < seen["acknowledged"] < 60 + 6  # chunks sent while it was down were not


def test_a_scenario_is_deterministic() -> None:
    first = run_scenario(FLAKY_TEAMMATE)
    again = run_scenario(FLAKY_TEAMMATE)
    assert (first.trace_hash, first.rng_hash, first.steps) == (
        again.trace_hash,
        again.rng_hash,
        again.steps,
    )


def test_a_planted_bug_fails_a_scenario() -> None:
    result = run_scenario(DAEMON_KILLED_MID_STREAM, plant=("ack_before_durable",))
    assert not result.ok
    assert {v.kind for v in result.violations} >= {"ack"}


def test_a_scenario_written_here() -> None:
    """Two agents stream into two sessions while the store refuses rows and
    the writer crashes; a window watches both."""
    scenario = Scenario(
        "written-here",
        sessions_per_board=2,
        clients=(
            window("w0", rooms=("board:0", "session:0", "session:1", "activity:0")),
            agent("a0", rooms=("session:0",)),
            agent("a1", rooms=("session:1",)),
        ),
        steps=(
            at(0.5, "a0", Stream(session=0, chunks=25, per_s=20)),
            at(0.5, "a1", Stream(session=1, chunks=25, per_s=20)),
            at(1.0, "w0", CreateTask(session=1, prompt="look")),
            at(1.0, "w0", Rename(session=0, title="watched")),
        ),
        faults=(
            fault(0.9, "store_request", for_s=0.5, target=1),  # tasks
            fault(1.2, "crash_writer"),
        ),
        duration_s=5,
        ring_size=8,
    )
    seen = _ok(scenario)
    assert seen["crash_writer"] == 1 and seen["store_request"] == 1


def test_scenario_mistakes_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown fault kind 'flood'"):
        fault(1.0, "flood")
    bad = Scenario("bad", clients=(window("w0"),), steps=(at(1.0, "w9", CreateTask(0, "x")),))
    with pytest.raises(ValueError, match="unknown client w9"):
        run_scenario(bad)
    assert sorted(EXAMPLES) == [
        "daemon-killed-mid-stream",
        "flaky-teammate",
        "two-windows-and-an-agent",
    ]
