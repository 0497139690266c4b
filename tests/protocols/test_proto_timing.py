"""Backoff, heartbeat and the token bucket: pure functions of their inputs."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols import Heartbeat, HeartbeatAction, TokenBucket, backoff_s


def test_backoff_grows_exponentially_then_caps() -> None:
    highest = 0.999999
    ceilings = [backoff_s(n, highest) for n in range(10)]
    assert ceilings[:7] == pytest.approx([0.5, 1, 2, 4, 8, 16, 30], rel=1e-5)
    assert ceilings[7:] == pytest.approx([30, 30, 30], rel=1e-5)
    assert backoff_s(3, 0.0) == 0.0
    assert backoff_s(3, 0.5) == 2.0
    assert backoff_s(2, 0.5, base_s=1.0, cap_s=3.0) == 1.5
    assert backoff_s(10**9, 0.5) == 15.0  # no overflow for absurd attempt numbers


@given(attempt=st.integers(0, 10_000), draw=st.floats(0, 1, exclude_max=True))
def test_backoff_stays_in_its_window(attempt: int, draw: float) -> None:
    delay = backoff_s(attempt, draw)
    assert 0.0 <= delay < 30.0
    assert delay <= 0.5 * 2 ** min(attempt, 64)


def test_backoff_spreads_reconnects() -> None:
    rng = random.Random(1)
    delays = [backoff_s(5, rng.random()) for _ in range(1000)]
    assert min(delays) < 1.0 and max(delays) > 15.0  # full jitter: the whole window is used
    assert [backoff_s(5, random.Random(7).random()) for _ in range(2)] == [
        backoff_s(5, random.Random(7).random())
    ] * 2


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((-1, 0.5), {}),
        ((1, 1.0), {}),
        ((1, -0.1), {}),
        ((1, 0.5), {"base_s": 0}),
        ((1, 0.5), {"cap_s": float("inf")}),
    ],
)
def test_backoff_refuses_bad_arguments(args: tuple[int, float], kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        backoff_s(*args, **kwargs)


def test_heartbeat_client_side() -> None:
    beat = Heartbeat.from_heartbeat_ms(10_000)
    assert (beat.interval_s, beat.timeout_s) == (10.0, 25.0)
    # welcomed at t=100: the welcome counts as the last ping until the first ping
    assert beat.decide(105.0, last_received_s=100.0, last_ping_s=100.0) is HeartbeatAction.WAIT
    assert beat.decide(110.0, last_received_s=100.0, last_ping_s=100.0) is HeartbeatAction.PING
    assert beat.next_check_s(last_received_s=100.0, last_ping_s=100.0) == 110.0
    # pinged at 110, pong at 110.2
    assert beat.decide(115.0, last_received_s=110.2, last_ping_s=110.0) is HeartbeatAction.WAIT
    assert beat.next_check_s(last_received_s=110.2, last_ping_s=110.0) == 120.0
    # nothing heard since 110.2: dead at 135.2 even though pings keep going out
    assert beat.decide(130.0, last_received_s=110.2, last_ping_s=130.0) is HeartbeatAction.WAIT
    assert beat.decide(135.25, last_received_s=110.2, last_ping_s=130.0) is HeartbeatAction.DEAD
    assert beat.next_check_s(last_received_s=110.2, last_ping_s=130.0) == pytest.approx(135.2)


def test_heartbeat_server_side() -> None:
    beat = Heartbeat(interval_s=15, timeout_s=40)
    assert beat.decide(39.9, last_received_s=0.0) is HeartbeatAction.WAIT
    assert beat.decide(40.0, last_received_s=0.0) is HeartbeatAction.DEAD
    assert beat.next_check_s(last_received_s=0.0) == 40.0
    with pytest.raises(ValueError):
        Heartbeat(interval_s=0)
    with pytest.raises(ValueError):
        Heartbeat(timeout_s=float("nan"))


def test_token_bucket() -> None:
    bucket = TokenBucket.full(2, now=0.0)
    granted, bucket = bucket.take(0.0, rate_per_s=4, burst=2)
    assert granted and bucket.tokens == 1
    granted, bucket = bucket.take(0.0, rate_per_s=4, burst=2)
    granted_again, bucket = bucket.take(0.0, rate_per_s=4, burst=2)
    assert granted and not granted_again
    granted, bucket = bucket.take(0.25, rate_per_s=4, burst=2)
    assert granted and bucket.tokens == 0
    # refill stops at the burst
    _, bucket = bucket.take(100.0, rate_per_s=4, burst=2, n=0)
    assert bucket.tokens == 2
    # time going backwards refills nothing and does not move the clock back
    _, bucket = bucket.take(50.0, rate_per_s=4, burst=2, n=2)
    assert bucket == TokenBucket(0.0, 100.0)
    granted, bucket = bucket.take(100.1, rate_per_s=4, burst=2)
    assert not granted
