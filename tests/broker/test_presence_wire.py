"""Presence messages between daemons (pure): a round trip, and what is
refused with a clear error."""

from __future__ import annotations

import math

import cbor2
import pytest

from agor_actors.broker import BrokerMessageError, decode_message, encode_presence
from agor_actors.domain.cluster_presence import PresenceOut, RemotePresence
from protocols import Viewport

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


def test_viewports_ride_along_only_when_some_moved() -> None:
    viewport = Viewport(10.0, -5.5, 1280.0, 720.0, 1.25)
    out = PresenceOut("b1", True, {"u1": ENTRY}, {}, {"u1": viewport})
    got = decode_message("board:b1", encode_presence("node-a", out))
    assert got == RemotePresence("node-a", "b1", True, {"u1": ENTRY}, {}, {"u1": viewport})
    # none moved: the first version's six elements, which a daemon that
    # knows no viewports still reads
    plain = cbor2.loads(encode_presence("node-a", PresenceOut("b1", True, {"u1": ENTRY}, {})))
    assert len(plain) == 6


def test_an_ask_rides_last_and_only_when_asked() -> None:
    # a board room that just started asks the other daemons for their users
    ask = PresenceOut("b1", False, {}, {}, ask=True)
    payload = encode_presence("node-a", ask)
    assert cbor2.loads(payload)[6:] == [[], True]  # no viewport moved: an empty list before it
    assert decode_message("board:b1", payload) == RemotePresence(
        "node-a", "b1", False, {}, {}, ask=True
    )
    viewport = Viewport(0.0, 0.0, 10.0, 10.0, 1.0)
    both = PresenceOut("b1", True, {"u1": ENTRY}, {}, {"u1": viewport}, ask=True)
    got = decode_message("board:b1", encode_presence("node-a", both))
    assert isinstance(got, RemotePresence) and got.ask and got.viewports == {"u1": viewport}


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
        ("board:b1", ["presence", 1, "n", True, {}, [], {"u1": [0, 0, 1, 1, 1]}], "malformed"),
        ("board:b1", ["presence", 1, "n", True, {}, [], [["u1", 0, 0, 1, 1]]], "bad viewport"),
        ("board:b1", ["presence", 1, "n", True, {}, [], [["u1", 0, 0, 1, 1, math.nan]]], "finite"),
        ("board:b1", ["presence", 1, "n", True, {}, [], [["u1", 0, 0, 1, "1", 1]]], "finite"),
        ("board:b1", ["presence", 1, "n", True, {}, [], [], 1], "malformed"),
        ("board:b1", ["presence", 1, "n", True, {}, [], [], True, 1], "version 1"),
    ],
)
def test_a_bad_presence_message_is_refused(room: str, value: object, error: str) -> None:
    with pytest.raises(BrokerMessageError, match=error):
        decode_message(room, cbor2.dumps(value))
