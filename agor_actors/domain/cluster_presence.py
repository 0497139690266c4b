"""Board presence across the daemons of a cluster: what a board room tells
the other daemons, what it hears from them, and how it merges their users
with its own.  Pure: no I/O, time comes in as ``now``.

A board room of a cluster node publishes (through the broker) the changes
of its own users' facepile entries and cursors at most once per presence
flush (``flush_hz``: the same latest-wins rate limit as its own clients'
frames), and every ``node_heartbeat_s`` while it has users of its own a
*full* message with all of them: the heartbeat of this daemon on that board,
which also repairs a lost change and tells a daemon that joined the board
later who is there.  A board room that starts (its first subscriber) or
lost the broker for a while (a resync) does not wait for the others'
heartbeats: it *asks* (``ask``), and every daemon with users on the board
answers with its heartbeat at once, so a facepile opened on one daemon
shows the users of the others within a round trip through the broker, not
up to ``node_heartbeat_s`` later.

A board room keeps, per other daemon, that daemon's users, the viewports it
last said they look at, and when it last heard from it.  A daemon not heard
from for ``node_liveness_s`` has vanished (killed, cut off): its users stay
for the offline grace (``offline_grace_s``, as a user whose last connection
closed) and then leave the facepile.  A user
shown by several daemons (tabs on two of them) shows once, merged as one
daemon merges a user's own tabs: the most present status, typing if typing
on any of them, the view of the most present one.

A viewport (for followers) is the latest said, on whichever daemon: a
daemon's heartbeat repeats its own users' viewports, which is news only
where that daemon's viewport changed since it last said it, so a user who
moved on another daemon since is not sent back to where it looked here.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
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
    (``full``: of each of the users), for followers on other daemons.
    ``ask``: the other daemons are asked for their users (each answers with
    its heartbeat)."""

    board: str
    full: bool
    users: Mapping[str, dict[str, Any] | None]
    cursors: Mapping[str, tuple[float, float]]
    viewports: Mapping[str, Viewport] = attrs.field(factory=dict)
    ask: bool = False


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
    ask: bool = False


@attrs.define
class NodePresence:
    """What a board room knows of another daemon's users there."""

    seen_s: float
    users: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    viewports: dict[str, Viewport] = attrs.field(factory=dict)
    """What that daemon last said each of its users looks at."""

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
                self.viewports.pop(uid, None)
            else:
                self.users[uid] = entry
        return touched

    def new_viewports(self, msg: RemotePresence, shown: Container[str]) -> dict[str, Viewport]:
        """The viewports of ``msg`` that this daemon did not say before (a
        heartbeat repeats the unchanged ones), of users ``shown`` here;
        remembered.  Another's are neither news nor remembered (heard before
        the user's entry, a repeat is news once they show).  A full
        message's users without a viewport are forgotten."""
        news: dict[str, Viewport] = {}
        for uid, viewport in msg.viewports.items():
            if uid not in shown:
                continue
            if self.viewports.get(uid) != viewport:
                news[uid] = viewport
            self.viewports[uid] = viewport
        if msg.full:
            for uid in [u for u in self.viewports if u not in msg.viewports]:
                del self.viewports[uid]
        return news


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
    """The facepile entry of ``user_id`` from its own daemon's (``local``)
    and every other daemon's (in the order given), merged as a daemon
    merges the user's own connections: the entry of the most present status
    (the first on a tie), typing if any of them is typing, and its view, or
    else the first view any of them has; None if no daemon shows the user."""
    entries = [local.get(user_id), *(node.users.get(user_id) for node in nodes)]
    shown = [e for e in entries if e is not None]
    if not shown:
        return None
    best = shown[0]
    for entry in shown[1:]:
        if _rank(entry) > _rank(best):
            best = entry
    if len(shown) == 1:
        return best
    typing = any(bool(e.get("typing")) for e in shown)
    view = best.get("view")
    if view is None:
        view = next((e["view"] for e in shown if e.get("view") is not None), None)
    if typing == bool(best.get("typing")) and view == best.get("view"):
        return best
    return {**best, "typing": typing, "view": view}


def _rank(entry: Mapping[str, Any]) -> int:
    return STATUS_RANK.get(str(entry.get("status")), 0)
