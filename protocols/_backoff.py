"""Reconnect backoff as a pure function: the caller passes the attempt number
and a random draw, so the simulator reproduces every delay from its seed."""

from __future__ import annotations

import math

__all__ = ["backoff_s"]


def backoff_s(attempt: int, random01: float, base_s: float = 0.5, cap_s: float = 30.0) -> float:
    """Seconds to wait before reconnect attempt ``attempt`` (0 for the first
    retry after a connection is lost): exponential with full jitter, capped.

    The delay is ``random01 * min(cap_s, base_s * 2**attempt)``; ``random01``
    is a uniform draw in ``[0, 1)`` (``rng.random()``).  Full jitter spreads the
    reconnects of many clients cut at the same moment over the whole window.
    Reset ``attempt`` to 0 once a connection has been welcomed.
    """
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    if not 0.0 <= random01 < 1.0:
        raise ValueError(f"random01 must be in [0, 1), got {random01}")
    if not (base_s > 0 and cap_s > 0 and math.isfinite(base_s) and math.isfinite(cap_s)):
        raise ValueError("base_s and cap_s must be finite and > 0")
    # 2**attempt overflows a float past ~1023; the cap is reached long before.
    exponent = min(attempt, 1000)
    ceiling = min(cap_s, base_s * 2.0**exponent)
    return random01 * ceiling
