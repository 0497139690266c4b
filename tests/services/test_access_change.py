"""Which logged events change access, for a cluster node that did not write
them (:func:`agor_actors.services.access_change`): the same ones that make
the daemon that wrote them forget and recheck."""

from __future__ import annotations

from agor_actors.services import AccessChange, access_change


def test_a_sessions_access_fields_recheck_its_room_and_other_fields_nothing() -> None:
    for field in ("permissions", "owner_id", "board_id", "locked_by"):
        data = {"session_id": "s1", "updates": {field: None, "updated_at": 1}, "rev": 2}
        assert access_change("session:updated", data) == AccessChange(
            session_id="s1", rooms=frozenset({"session:s1"})
        )
    title = {"session_id": "s1", "updates": {"title": "t", "updated_at": 1}, "rev": 2}
    assert access_change("session:updated", title) is None
    assert access_change("session:deleted", {"session_id": "s1"}) == AccessChange(session_id="s1")


def test_a_member_added_or_removed_rechecks_that_user() -> None:
    for event in ("board:member_added", "board:member_removed"):
        data = {"board_id": "b1", "user_id": "u1", "role": "viewer", "rev": 3}
        assert access_change(event, data) == AccessChange(board_id="b1", users=frozenset({"u1"}))
    assert access_change("board:deleted", {"board_id": "b1"}) == AccessChange(board_id="b1")
    owner = {"board_id": "b1", "updates": {"owner_id": "u2"}, "rev": 4}
    assert access_change("board:updated", owner) == AccessChange(board_id="b1")
    described = {"board_id": "b1", "updates": {"description": "d"}, "rev": 4}
    assert access_change("board:updated", described) is None


def test_other_and_malformed_events_change_nothing() -> None:
    assert access_change("task:created", {"session_id": "s1"}) is None
    assert access_change("session:updated", None) is None
    assert access_change("session:updated", {"session_id": 3, "updates": {"owner_id": 1}}) is None
    assert access_change("board:member_removed", {"user_id": "u1"}) is None
