"""When a room may passivate: a board room keeps its users' facepile
entries in memory only (a user's presence actor sends an entry when it
changes), so it stays while it holds any."""

from __future__ import annotations

from agor_actors.domain.presence import UserEntry
from agor_actors.domain.room import RoomBehaviour, RoomState


def entry(user: str) -> dict[str, object]:
    return {"user_id": user, "name": user, "color": "#000", "status": "active"}


def test_a_board_room_holding_a_users_entry_does_not_passivate() -> None:
    room = RoomBehaviour("board:b1", store=None)  # type: ignore[arg-type]  # no store read here
    state = RoomState(room="board:b1", epoch="e1", head=0)
    assert room.can_passivate(state)
    room.handle(state, UserEntry("u1", entry("u1")), 0.0)
    room.handle(state, UserEntry("u2", entry("u2")), 0.0)
    # nobody subscribed, but two users present: their entries would be lost
    assert not state.subscribers and not room.can_passivate(state)
    room.handle(state, UserEntry("u1", None), 1.0)  # offline after the grace
    assert not room.can_passivate(state)
    room.handle(state, UserEntry("u2", None), 2.0)
    assert room.can_passivate(state)
