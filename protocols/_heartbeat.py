"""Heartbeat decisions as pure functions of ``now``.

The client pings every ``interval_s`` (the server's ``welcome.heartbeat_ms``)
and the server answers each ping with a pong.  Either side declares the other
dead when nothing at all was received for ``timeout_s``.
"""

from __future__ import annotations

import enum
import math

import attrs

__all__ = ["Heartbeat", "HeartbeatAction"]


class HeartbeatAction(enum.Enum):
    WAIT = "wait"
    PING = "ping"
    """Send a ping now."""
    DEAD = "dead"
    """Nothing was received for ``timeout_s``: close the connection (server:
    ``close(ErrorCode.HEARTBEAT_TIMEOUT)``; client: drop it and reconnect)."""


def _positive(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{attribute.name} must be finite and > 0, got {value!r}")


@attrs.frozen
class Heartbeat:
    interval_s: float = attrs.field(default=15.0, validator=_positive)
    timeout_s: float = attrs.field(default=37.5, validator=_positive)

    @classmethod
    def from_heartbeat_ms(cls, heartbeat_ms: int) -> Heartbeat:
        """The heartbeat a ``welcome`` announces: ping every ``heartbeat_ms``,
        dead after two and a half intervals of silence."""
        interval_s = heartbeat_ms / 1000
        return cls(interval_s=interval_s, timeout_s=2.5 * interval_s)

    def decide(
        self, now: float, *, last_received_s: float, last_ping_s: float | None = None
    ) -> HeartbeatAction:
        """What to do at ``now``.  ``last_received_s``: when anything was last
        received (or when the connection opened); ``last_ping_s``: when this
        side last pinged (the client passes the time of the ``welcome`` until
        its first ping), ``None`` for a side that does not ping (the server)."""
        # compared as ``now >= t + d``, exactly as next_check_s computes the
        # deadline: ``now - t >= d`` can disagree by one float ulp, and a
        # loop sleeping until next_check_s would then spin forever
        if now >= last_received_s + self.timeout_s:
            return HeartbeatAction.DEAD
        if last_ping_s is not None and now >= last_ping_s + self.interval_s:
            return HeartbeatAction.PING
        return HeartbeatAction.WAIT

    def next_check_s(self, *, last_received_s: float, last_ping_s: float | None = None) -> float:
        """The next ``now`` at which :meth:`decide` may answer something other
        than WAIT: sleep until then."""
        deadline = last_received_s + self.timeout_s
        if last_ping_s is not None:
            deadline = min(deadline, last_ping_s + self.interval_s)
        return deadline
