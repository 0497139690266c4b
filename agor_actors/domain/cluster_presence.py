"""Board presence across the daemons of a cluster: what a board room tells
the other daemons, what it hears from them, and how it merges their users
with its own.  Pure: no I/O, time comes in as ``now``.

A board room of a cluster node publishes (through the broker) the changes
of its own users' facepile entries and cursors at most once per presence
flush (``flush_hz``: the same latest-wins rate limit as its own clients'
frames), and every ``node_heartbeat_s`` while it has users of its own a
*full* message with all of them: the heartbeat of this daemon on that board,
which also repairs a lost change and tells a daemon that joined the board
later who is there.

A board room keeps, per other daemon, that daemon's users and when it last
heard from it.  A daemon not heard from for ``node_liveness_s`` has vanished
(killed, cut off): its users stay for the offline grace (``offline_grace_s``,
as a user whose last connection closed) and then leave the facepile.  A user
shown by several daemons (tabs on two of them) shows once, with the most
present status.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from protocols import Viewport

__all__ = [
    "STATUS_RANK",
    "NodePresence",
    "PresenceOut",
    "RemotePresence",
    "merged_entry",
    "vanished",
]

STATUS_RANK: Mapping[str, int] = {"active": 3, "idle": 2, "away": 1}
"""Which of a user's entries shows when several daemons show the user."""


@attrs.frozen
class PresenceOut:
    """To the broker's publisher: this daemon's users on ``board``.  ``full``:
    ``users`` is all of them (a heartbeat); else only what changed (None:
    the user left).  ``cursors``: the latest position of each user that
    moved.  ``viewports``: the latest viewport of each user that moved it
    (``full``: of each of the users), for followers on other daemons."""

    board: str
    full: bool
    users: Mapping[str, dict[str, Any] | None]
    cursors: Mapping[str, tuple[float, float]]
    viewports: Mapping[str, Viewport] = attrs.field(factory=dict)


@attrs.frozen
class RemotePresence:
    """From the broker's feed to ``room:board:<board>``: what daemon
    ``node`` published (a :class:`PresenceOut` of its own)."""

    node: str
    board: str
    full: bool
    users: Mapping[str, dict[str, Any] | None]
    cursors: Mapping[str, tuple[float, float]]
    viewports: Mapping[str, Viewport] = attrs.field(factory=dict)


@attrs.define
class NodePresence:
    """What a board room knows of another daemon's users there."""

    seen_s: float
    users: dict[str, dict[str, Any]] = attrs.field(factory=dict)

    def apply(self, msg: RemotePresence, now: float) -> set[str]:
        """Take ``msg`` (heard at ``now``); returns the user ids whose entry
        may have changed."""
        self.seen_s = now
        touched = set(msg.users)
        if msg.full:
            touched |= set(self.users)
            self.users = {uid: e for uid, e in msg.users.items() if e is not None}
            return touched
        for uid, entry in msg.users.items():
            if entry is None:
                self.users.pop(uid, None)
            else:
                self.users[uid] = entry
        return touched


def vanished(
    nodes: Mapping[str, NodePresence], now: float, *, liveness_s: float, grace_s: float
) -> list[str]:
    """The daemons whose users leave now: not heard from for the liveness
    timeout, and the offline grace over since (``now >= seen + liveness +
    grace``, the sum the room's timer is set for)."""
    return sorted(n for n, p in nodes.items() if now >= p.seen_s + liveness_s + grace_s)


def merged_entry(
    user_id: str, local: Mapping[str, dict[str, Any]], nodes: Iterable[NodePresence]
) -> dict[str, Any] | None:
    """The facepile entry of ``user_id``: its own daemon's (``local``) and
    every other daemon's (in the order given), the most present status
    winning, the first on a tie; None if no daemon shows the user."""
    best = local.get(user_id)
    for node in nodes:
        entry = node.users.get(user_id)
        if entry is None:
            continue
        if best is None or _rank(entry) > _rank(best):
            best = entry
    return best


def _rank(entry: Mapping[str, Any]) -> int:
    return STATUS_RANK.get(str(entry.get("status")), 0)
