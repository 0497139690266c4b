"""Presence: who is on a board, where their cursors are, what they look at.

One actor per user (``presence:user:<id>``) merges the user's connections
(tabs, devices) and computes a status; board rooms fan presence out, latest
state wins, at most ``flush_hz`` frames per second per client, culled to
each client's viewport.  Presence is lossy by design: nothing here is
queued behind anything, and it is the first thing shed under load.
"""

from __future__ import annotations

import functools
import hashlib
import math
from typing import Any, Literal

import attrs

from protocols import PresenceUpdate, Viewport

from ..marks import mark
from ..runtime import ActorContext, Behaviour, Effect, Effects, Send, StartTimer

__all__ = [
    "PALETTE",
    "ConnPresence",
    "CursorMoved",
    "PresenceConfig",
    "PresenceGone",
    "PresenceTouch",
    "Republish",
    "UserEntry",
    "UserPresenceBehaviour",
    "UserPresenceState",
    "WatchPrefs",
    "color_for",
    "status_of",
]

Status = Literal["active", "idle", "away", "offline"]

PALETTE = (
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46b5d1", "#f032e6", "#9a6324",
    "#2f9e44", "#d6336c", "#1c7ed6", "#e8590c", "#7048e8", "#0ca678", "#c2255c", "#5c940d",
)  # fmt: skip


@functools.lru_cache(maxsize=4096)
def color_for(user_id: str) -> str:
    """A user's color: derived from the id alone, the same on every client
    and every daemon (remembered for the last 4,096 users: a board room
    asks at each event it highlights)."""
    digest = hashlib.sha256(user_id.encode("utf-8")).digest()
    return PALETTE[digest[0] % len(PALETTE)]


@attrs.frozen
class PresenceConfig:
    idle_s: float = 60.0
    away_s: float = 300.0
    offline_grace_s: float = 10.0
    typing_s: float = 3.0
    flush_hz: float = 30.0
    cursor_margin: float = 200.0
    node_heartbeat_s: float = 5.0
    """A cluster node tells the other daemons its users on a board this often."""
    node_liveness_s: float = 15.0
    """A daemon not heard from for this long has vanished: its users go
    offline after ``offline_grace_s`` more."""


def status_of(
    last_input_s: float,
    now: float,
    *,
    connected: bool,
    gone_since_s: float | None,
    config: PresenceConfig,
) -> Status:
    """The status the server shows: pure in ``now``."""
    # every comparison is ``now >= t + d``, the same sum ``_next_change``
    # schedules its timer for: ``now - t >= d`` can disagree by one ulp and
    # make the timer fire again and again at the same instant
    grace_over = gone_since_s is not None and now >= gone_since_s + config.offline_grace_s
    if not connected and grace_over:
        mark("presence.offline")
        return "offline"
    if now >= last_input_s + config.away_s:
        return "away"
    if now >= last_input_s + config.idle_s:
        return "idle"
    return "active"


# --------------------------------------------------------------------- messages


@attrs.frozen
class PresenceTouch:
    """A connection's presence update (from the hub)."""

    connection_id: str
    user_id: str
    name: str
    update: PresenceUpdate


@attrs.frozen
class PresenceGone:
    connection_id: str


@attrs.frozen
class _Tick:
    pass


@attrs.frozen
class Republish:
    """The board's room restarted and forgot its facepile: send this user's
    entry there again."""

    board: str


@attrs.frozen
class UserEntry:
    """To ``room:board:<id>``: a user's facepile entry there (None: gone)."""

    user_id: str
    entry: dict[str, Any] | None


@attrs.frozen
class CursorMoved:
    user_id: str
    connection_id: str
    x: float
    y: float


@attrs.frozen
class WatchPrefs:
    """To ``room:board:<id>``: what a connection wants to see (its viewport,
    whether it hides cursors, whom it follows) and, for followers, where
    this user looks."""

    connection_id: str
    user_id: str
    viewport: Viewport | None
    hide_cursors: bool | None
    follow: str | None


# --------------------------------------------------------------------- the actor


@attrs.define
class ConnPresence:
    board: str | None = None
    view: str | None = None
    typing_until_s: float = -math.inf
    viewport: Viewport | None = None


@attrs.define
class UserPresenceState:
    user_id: str
    name: str = ""
    conns: dict[str, ConnPresence] = attrs.field(factory=dict)
    last_input_s: float = 0.0
    gone_since_s: dict[str, float] = attrs.field(factory=dict)
    """Per board: when its last connection left (for the offline grace)."""
    published: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    timer_at_s: float | None = None


class UserPresenceBehaviour(Behaviour[UserPresenceState]):
    mailbox_size = 256
    idle_s = 30.0

    def __init__(self, user_id: str, config: PresenceConfig | None = None) -> None:
        self.user_id = user_id
        self.config = config or PresenceConfig()

    async def init(self, ctx: ActorContext) -> UserPresenceState:
        return UserPresenceState(user_id=self.user_id)

    def can_passivate(self, state: UserPresenceState) -> bool:
        return not state.conns and not state.published

    def handle(self, state: UserPresenceState, msg: Any, now: float) -> Effects:
        effects: list[Effect] = []
        if isinstance(msg, PresenceTouch):
            state.name = msg.name
            effects.extend(self._touch(state, msg, now))
        elif isinstance(msg, PresenceGone):
            conn = state.conns.pop(msg.connection_id, None)
            board = conn.board if conn is not None else None
            if board is not None and not any(c.board == board for c in state.conns.values()):
                state.gone_since_s[board] = now
        elif isinstance(msg, _Tick):
            state.timer_at_s = None
        elif isinstance(msg, Republish):
            state.published.pop(msg.board, None)  # so _publish sends it again
        effects.extend(self._publish(state, now))
        return effects

    def _touch(self, state: UserPresenceState, msg: PresenceTouch, now: float) -> list[Effect]:
        update = msg.update
        if not state.conns and not state.published:
            state.last_input_s = now  # arriving counts as activity
        conn = state.conns.setdefault(msg.connection_id, ConnPresence())
        effects: list[Effect] = []
        if update.board is not None and update.board != conn.board:
            if conn.board is not None and not any(
                c.board == conn.board for cid, c in state.conns.items() if cid != msg.connection_id
            ):
                state.gone_since_s[conn.board] = now
            conn.board = update.board or None
        board = conn.board
        if board is not None:
            state.gone_since_s.pop(board, None)
        if update.view is not None:
            conn.view = update.view
        if update.typing is not None:
            conn.typing_until_s = now + self.config.typing_s if update.typing else -math.inf
        if update.viewport is not None:
            conn.viewport = update.viewport
        if any(v is not None for v in (update.cursor, update.view, update.typing, update.viewport)):
            state.last_input_s = now
        if board is None:
            return effects
        room = f"room:board:{board}"
        if update.cursor is not None:
            effects.append(
                Send(
                    room,
                    CursorMoved(state.user_id, msg.connection_id, update.cursor.x, update.cursor.y),
                )
            )
        if (
            update.viewport is not None
            or update.hide_cursors is not None
            or update.follow is not None
        ):
            effects.append(
                Send(
                    room,
                    WatchPrefs(
                        msg.connection_id,
                        state.user_id,
                        update.viewport,
                        update.hide_cursors,
                        update.follow,
                    ),
                )
            )
        return effects

    def _entry(self, state: UserPresenceState, board: str, now: float) -> dict[str, Any] | None:
        conns = [c for c in state.conns.values() if c.board == board]
        gone = state.gone_since_s.get(board)
        status = status_of(
            state.last_input_s, now, connected=bool(conns), gone_since_s=gone, config=self.config
        )
        if status == "offline":
            return None
        view = next((c.view for c in reversed(conns) if c.view is not None), None)
        typing = any(c.typing_until_s > now for c in conns)
        return {
            "user_id": state.user_id,
            "name": state.name,
            "color": color_for(state.user_id),
            "status": status,
            "view": view,
            "typing": typing,
        }

    def _publish(self, state: UserPresenceState, now: float) -> list[Effect]:
        effects: list[Effect] = []
        boards = sorted(
            {c.board for c in state.conns.values() if c.board}
            | set(state.published)
            | set(state.gone_since_s)
        )
        for board in boards:
            entry = self._entry(state, board, now)
            if entry is None:
                state.gone_since_s.pop(board, None)
            if entry != state.published.get(board):
                if entry is None:
                    state.published.pop(board, None)
                else:
                    state.published[board] = entry
                effects.append(Send(f"room:board:{board}", UserEntry(state.user_id, entry)))
        next_at = self._next_change(state, now)
        if next_at is not None and next_at != state.timer_at_s:
            state.timer_at_s = next_at
            effects.append(StartTimer("tick", max(0.0, next_at - now), _Tick()))
        return effects

    def _next_change(self, state: UserPresenceState, now: float) -> float | None:
        cfg = self.config
        times = [
            t for t in (state.last_input_s + cfg.idle_s, state.last_input_s + cfg.away_s) if t > now
        ]
        times += [c.typing_until_s for c in state.conns.values() if c.typing_until_s > now]
        times += [t + cfg.offline_grace_s for t in state.gone_since_s.values()]
        if not state.published and not state.conns:
            return min((t for t in times if t > now), default=None) if state.gone_since_s else None
        return min(times, default=None)

    def describe(self, state: UserPresenceState) -> dict[str, Any]:
        return {"connections": len(state.conns), "boards": sorted(state.published)}
