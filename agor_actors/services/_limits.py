"""Per-user caps, over all of a user's connections (the protocol's own
limits bound each connection).  The local owner principal has none."""

from __future__ import annotations

import attrs

__all__ = ["UserLimits"]


@attrs.frozen
class UserLimits:
    connections: int = 32
    """Connections open at once; the next is closed with
    ``too_many_connections`` (1008)."""
    rooms: int = 1024
    """Rooms joined at once, all connections together; the next join is
    refused with ``left`` ``too_many_subscriptions``."""
    pending_calls: int = 256
    """Calls in flight at once (WebSocket and HTTP); the next is answered
    ``too_many_pending`` (HTTP 429)."""
