"""Presence messages between daemons (pure): a round trip, and what is
refused with a clear error."""

from __future__ import annotations

import math

import cbor2
import pytest

from agor_actors.broker import BrokerMessageError, decode_message, encode_presence
from agor_actors.domain.cluster_presence import PresenceOut, RemotePresence

ENTRY = {
    "user_id": "u1",
    "name": "Ada",
    "color": "#e6194b",
    "status": "idle",
    "view": "session:s1",
    "typing": True,
}


def test_presence_round_trips_on_a_board_channel() -> None:
    out = PresenceOut("b1", False, {"u1": ENTRY, "u2": None}, {"u1": (1.5, -2.0)})
    got = decode_message("board:b1", encode_presence("node-a", out))
    assert got == RemotePresence(
        "node-a", "b1", False, {"u1": ENTRY, "u2": None}, {"u1": (1.5, -2.0)}
    )


@pytest.mark.parametrize(
    ("room", "value", "error"),
    [
        ("session:s1", ["presence", 1, "n", True, {}, []], "not a board"),
        ("board:b1", ["presence", 2, "n", True, {}, []], "version 1"),
        ("board:b1", ["presence", 1, "n", "yes", {}, []], "malformed"),
        ("board:b1", ["presence", 1, "n", True, {"u2": ENTRY}, []], "bad presence entry"),
        ("board:b1", ["presence", 1, "n", True, {"u1": {**ENTRY, "status": "offline"}}, []], "bad"),
        ("board:b1", ["presence", 1, "n", True, {}, [["u1", math.inf, 0]]], "finite"),
        ("board:b1", ["presence", 1, "n", True, {}, [["u1", True, 0]]], "finite"),
        ("board:b1", ["presence", 1, "n", True, {}, [["u1", 0]]], "bad cursor"),
    ],
)
def test_a_bad_presence_message_is_refused(room: str, value: object, error: str) -> None:
    with pytest.raises(BrokerMessageError, match=error):
        decode_message(room, cbor2.dumps(value))
