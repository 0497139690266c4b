"""Limits of one connection and the token bucket that enforces the rate.

Everything here is a value: the bucket is a frozen record and ``take`` returns
the next one, given ``now`` (seconds on any monotonic clock).
"""

from __future__ import annotations

from typing import Any, Final

import attrs

__all__ = ["CLIENT_LIMITS", "DEFAULT_LIMITS", "MAX_WIRE_DEPTH", "Limits", "TokenBucket"]

MAX_WIRE_DEPTH: Final = 64
"""Deepest nesting any frame may have on the wire (the frame's outer container
counts as 1).  Encoders refuse deeper data; clients accept up to this."""


def _positive(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


@attrs.frozen(kw_only=True)
class Limits:
    """What one connection may do.  The server enforces these on what it
    receives and announces them in ``welcome.limits``; a client keeps its own
    sends within the server's announced limits."""

    max_frame_bytes: int = attrs.field(default=1 << 20, validator=_positive)
    """Largest frame accepted, in bytes (UTF-8 bytes for text frames)."""
    max_depth: int = attrs.field(default=32, validator=_positive)
    """Deepest nesting of maps and arrays in a frame (the outer one counts as 1)."""
    max_batch: int = attrs.field(default=100, validator=_positive)
    """Most messages in one frame."""
    max_pending_calls: int = attrs.field(default=64, validator=_positive)
    """Most calls waiting for their result at once."""
    max_subscriptions: int = attrs.field(default=256, validator=_positive)
    """Most rooms joined (or being joined) at once."""
    rate_per_s: float = attrs.field(default=200.0, validator=_positive)
    """Messages per second (all but presence) sustained; a token bucket."""
    rate_burst: int = attrs.field(default=400, validator=_positive)
    """Size of that bucket: messages accepted at once after a quiet period."""
    presence_rate_per_s: float = attrs.field(default=60.0, validator=_positive)
    """Presence updates per second; excess updates are dropped silently."""
    presence_burst: int = attrs.field(default=60, validator=_positive)
    max_refused: int = attrs.field(default=400, validator=_positive)
    """Messages refused for the rate before the connection is closed
    (``flood``), counted since the bucket was last at least half full (a
    message let through as the bucket refills does not start it again)."""

    def to_wire(self) -> dict[str, int | float]:
        """The limits as announced in ``welcome.limits``."""
        return {
            "max_frame_bytes": self.max_frame_bytes,
            "max_depth": self.max_depth,
            "max_batch": self.max_batch,
            "max_pending_calls": self.max_pending_calls,
            "max_subscriptions": self.max_subscriptions,
            "rate_per_s": self.rate_per_s,
            "rate_burst": self.rate_burst,
            "presence_rate_per_s": self.presence_rate_per_s,
        }


DEFAULT_LIMITS: Final = Limits()
"""The server's defaults."""

CLIENT_LIMITS: Final = Limits(max_frame_bytes=16 << 20, max_depth=MAX_WIRE_DEPTH, max_batch=1000)
"""What a client accepts from the server by default (it trusts the server more
than the server trusts it; rates are not enforced on the client side)."""


@attrs.frozen
class TokenBucket:
    """A token bucket as a value.  ``tokens`` is what was left at ``updated_s``."""

    tokens: float
    updated_s: float

    @classmethod
    def full(cls, burst: int, now: float) -> TokenBucket:
        return cls(float(burst), now)

    def take(
        self, now: float, *, rate_per_s: float, burst: int, n: int = 1
    ) -> tuple[bool, TokenBucket]:
        """Try to take ``n`` tokens at ``now``.  Returns whether they were
        granted and the bucket afterwards.  Time going backwards refills
        nothing."""
        elapsed = max(0.0, now - self.updated_s)
        tokens = min(float(burst), self.tokens + elapsed * rate_per_s)
        updated = max(now, self.updated_s)
        if tokens >= n:
            return True, TokenBucket(tokens - n, updated)
        return False, TokenBucket(tokens, updated)
