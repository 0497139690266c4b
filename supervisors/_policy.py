"""Pure supervision policies: what to restart, whether the restart intensity
is exceeded, and how long to back off.  Every function takes ``now`` and the
restart history as arguments (like OTP's ``add_restart/3``) so that the same
decisions are made in the daemon and in the simulator."""

from __future__ import annotations

import enum
from collections.abc import Sequence

import attrs

__all__ = [
    "Backoff",
    "Intensity",
    "Restart",
    "Strategy",
    "add_restart",
    "children_to_restart",
    "restart_delay_s",
    "should_restart",
]


class Strategy(enum.Enum):
    """Which children restart when one fails."""

    ONE_FOR_ONE = "one_for_one"
    """Only the failed child."""
    ONE_FOR_ALL = "one_for_all"
    """Every child: the others are stopped (in reverse order) and all start again in order."""
    REST_FOR_ONE = "rest_for_one"
    """The failed child and the children started after it."""


class Restart(enum.Enum):
    """When a child that exited is started again."""

    PERMANENT = "permanent"
    """Always."""
    TRANSIENT = "transient"
    """Only after an abnormal exit (an exception)."""
    TEMPORARY = "temporary"
    """Never."""


@attrs.frozen
class Intensity:
    """At most ``max_restarts`` restarts within ``period_s`` seconds; one more
    and the supervisor stops its children and fails to its own supervisor."""

    max_restarts: int = attrs.field(default=3, validator=attrs.validators.ge(0))
    period_s: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))


@attrs.frozen
class Backoff:
    """Delay before a restart: none for the first restart in the intensity
    window, then ``base_s * factor**(n-1)`` for the n-th further one, at most
    ``max_s``."""

    base_s: float = attrs.field(default=0.05, validator=attrs.validators.ge(0))
    factor: float = attrs.field(default=2.0, validator=attrs.validators.ge(1))
    max_s: float = attrs.field(default=2.0, validator=attrs.validators.ge(0))


def should_restart(restart: Restart, *, abnormal: bool) -> bool:
    if restart is Restart.PERMANENT:
        return True
    if restart is Restart.TRANSIENT:
        return abnormal
    return False


def add_restart(
    history: tuple[float, ...], now: float, intensity: Intensity
) -> tuple[tuple[float, ...], bool]:
    """Record a restart at ``now``.  Returns the new history (restarts within
    the period, oldest first) and whether the intensity is exceeded."""
    horizon = now - intensity.period_s
    kept = (*(t for t in history if t > horizon), now)
    return kept, len(kept) > intensity.max_restarts


def restart_delay_s(history: tuple[float, ...], backoff: Backoff) -> float:
    """The delay before the restart just recorded in ``history`` (as returned
    by :func:`add_restart`)."""
    earlier = len(history) - 1
    if earlier <= 0 or backoff.base_s == 0:
        return 0.0
    return float(min(backoff.base_s * backoff.factor ** (earlier - 1), backoff.max_s))


def children_to_restart(strategy: Strategy, order: Sequence[str], failed: str) -> list[str]:
    """The ids to stop and start again, in start order, when ``failed`` exited
    and is to be restarted."""
    if strategy is Strategy.ONE_FOR_ONE:
        return [failed]
    if strategy is Strategy.ONE_FOR_ALL:
        return list(order)
    index = order.index(failed)
    return list(order[index:])
