"""Swarm testing: each seed turns on its own subset of fault kinds and
workloads at its own intensities, reproducibly, from named streams."""

from __future__ import annotations

from sim import FAULT_KINDS, WORKLOADS, draw_config, draw_faults
from sim._config import CLUSTER_ONLY, DENSITIES, RATE_PER_MIN, draw_swarm

SINGLE_KINDS = tuple(k for k in FAULT_KINDS if k not in CLUSTER_ONLY)
"""The kinds a single daemon's seeds draw (the cluster profile's own are
checked in tests/sim/test_sim_nodes.py)."""


def test_seeds_vary_which_kinds_are_on_and_how_hard() -> None:
    swarms = [draw_swarm(seed) for seed in range(200)]
    sizes = [len(s.faults) for s in swarms]
    assert min(sizes) <= 1 and max(sizes) >= 9, "some seeds focus, some combine"
    assert {s.density for s in swarms} == set(DENSITIES)
    for kind in SINGLE_KINDS:
        on = [dict(s.faults)[kind] for s in swarms if kind in dict(s.faults)]
        assert 0 < len(on) < len(swarms), kind
        low, high = RATE_PER_MIN["ci"]
        assert min(on) < low * 3 and max(on) > high / 6, (kind, min(on), max(on))
    for workload in WORKLOADS:
        assert 0 < sum(workload in s.workloads for s in swarms) < len(swarms), workload
    assert all(s.workloads for s in swarms), "every seed runs some workload"
    # pairs of kinds meet in many seeds, not a handful
    for a in SINGLE_KINDS:
        for b in SINGLE_KINDS:
            both = sum(a in dict(s.faults) and b in dict(s.faults) for s in swarms)
            assert a == b or both >= 10, (a, b, both)


def test_a_swarm_is_a_function_of_the_seed() -> None:
    assert draw_swarm(7) == draw_swarm(7)
    assert draw_config(7) == draw_config(7)
    assert len({draw_swarm(seed) for seed in range(50)}) > 40


def test_excluding_a_kind_leaves_the_others_as_they_were() -> None:
    """Named streams per kind: an exclusion (or a shrink) removes that kind's
    faults and moves nothing else."""
    for seed in range(30):
        config = draw_config(seed)
        plan = draw_faults(config)
        for kind, _ in config.faults:
            without = draw_config(seed, exclude=(kind,))
            assert without.clients == config.clients
            assert without.faults == tuple(f for f in config.faults if f[0] != kind)
            assert draw_faults(without) == tuple(f for f in plan if f.kind != kind)
        for workload in config.workloads:
            fewer = draw_config(seed, exclude=(workload,))
            assert fewer.workloads == tuple(w for w in config.workloads if w != workload)
            assert fewer.faults == config.faults and fewer.clients == config.clients


def test_only_turns_its_kinds_on_in_every_seed_at_the_seeds_rate() -> None:
    for seed in range(20):
        config = draw_config(seed, only=("reset", "stall"))
        assert [kind for kind, _ in config.faults] == ["reset", "stall"]
        rates = dict(draw_swarm(seed).rates)
        assert dict(config.faults) == {"reset": rates["reset"], "stall": rates["stall"]}
        assert draw_config(seed, only=("reset",), exclude=("reset",)).faults == ()


def test_the_medium_profile_has_the_size_the_speed_target_names() -> None:
    """``medium``: 5-20 clients and a 30 s fault phase (issue 15's size for
    the sweep's speed), every size in between drawn."""
    sizes = set()
    for seed in range(300):
        config = draw_config(seed, "medium")
        assert 5 <= len(config.clients) <= 20, seed
        assert config.fault_s == 30
        assert any(c.role == "agent" for c in config.clients)
        sizes.add(len(config.clients))
    assert {5, 10, 15} <= sizes
