"""Broker messages cut to a link's limit (pure): a run of events in several
messages in seq order, an event too long alone as a lost marker, a
presence heartbeat in parts that add up to the same facepile."""

from __future__ import annotations

import attrs
import cbor2
import pytest

from agor_actors.broker import (
    BrokerMessageError,
    Lost,
    Remote,
    decode_message,
    encode_events,
    encode_presence_parts,
)
from agor_actors.domain.cluster_presence import NodePresence, PresenceOut, RemotePresence
from agor_actors.store import StoredEvent
from protocols import Viewport

ROOM = "session:s1"
LIMIT = 1000


def event(seq: int, size: int = 100, epoch: str = "e1") -> StoredEvent:
    return StoredEvent(
        ROOM, epoch, seq, None, "task:created", {"p": "x" * size}, 0, "u", None, None
    )


def entry(uid: str) -> dict[str, object]:
    return {
        "user_id": uid,
        "name": f"user {uid}",
        "color": "#e6194b",
        "status": "active",
        "view": None,
        "typing": False,
    }


def test_a_run_that_fits_is_one_message() -> None:
    events = [event(n) for n in range(1, 4)]
    assert encode_events("n1", events, max_bytes=LIMIT) == encode_events("n1", events)
    assert len(encode_events("n1", events)) == 1


def test_a_long_run_is_cut_into_messages_in_seq_order() -> None:
    events = [event(n, size=150 + n) for n in range(1, 41)]
    payloads = encode_events("n1", events, max_bytes=LIMIT)
    assert len(payloads) > 1 and all(len(p) <= LIMIT for p in payloads)
    decoded = [decode_message(ROOM, p) for p in payloads]
    assert all(isinstance(d, Remote) and d.node == "n1" for d in decoded)
    seqs = [e.seq for d in decoded if isinstance(d, Remote) for e in d.events]
    assert seqs == list(range(1, 41))


def test_an_event_too_long_alone_goes_as_a_lost_marker_in_its_place() -> None:
    events = [event(1), event(2, size=5000), event(3), event(4, size=3000, epoch="e2")]
    decoded = [decode_message(ROOM, p) for p in encode_events("n1", events, max_bytes=LIMIT)]
    assert [d.node for d in decoded] == ["n1"] * len(decoded)
    shapes = [[e.seq for e in d.events] if isinstance(d, Remote) else "lost" for d in decoded]
    assert shapes == [[1], "lost", [3], "lost"]
    assert isinstance(decoded[1], Lost)


def test_a_heartbeat_too_long_goes_in_parts_that_add_up_to_it() -> None:
    users = {f"u{n:03}": entry(f"u{n:03}") for n in range(40)}
    cursors = {f"u{n:03}": (float(n), -float(n)) for n in range(40)}
    out = PresenceOut("b1", True, users, cursors)
    parts = encode_presence_parts("n1", out, max_bytes=LIMIT)
    assert len(parts) > 2 and all(len(p) <= LIMIT for p in parts)
    decoded = [decode_message("board:b1", p) for p in parts]
    assert all(isinstance(d, RemotePresence) for d in decoded)
    remote = [d for d in decoded if isinstance(d, RemotePresence)]
    assert [d.full for d in remote] == [True] + [False] * (len(remote) - 1)
    # a daemon that knew other users of n1 before: the parts replace them
    node = NodePresence(0.0, {"gone": entry("gone")})
    for part in remote:
        node.apply(part, 1.0)
    assert node.users == users
    moved = {uid: xy for d in remote for uid, xy in d.cursors.items()}
    assert moved == cursors
    # a heartbeat that also asks (its room just started) asks once, first
    asking = encode_presence_parts("n1", attrs.evolve(out, ask=True), max_bytes=LIMIT)
    asks = [d.ask for d in (decode_message("board:b1", p) for p in asking)]  # type: ignore[union-attr]
    assert asks == [True] + [False] * (len(asks) - 1)


def test_presence_that_fits_is_one_message() -> None:
    out = PresenceOut("b1", False, {"u1": entry("u1"), "u2": None}, {"u1": (1.0, 2.0)})
    assert len(encode_presence_parts("n1", out, max_bytes=LIMIT)) == 1
    assert len(encode_presence_parts("n1", out, max_bytes=None)) == 1


@pytest.mark.parametrize(
    "value", [["lost", 2, "n1"], ["lost", 1], ["lost", 1, 7], ["lost", 1, "n1", "extra"]]
)
def test_a_bad_lost_marker_is_refused(value: object) -> None:
    with pytest.raises(BrokerMessageError, match="lost marker"):
        decode_message(ROOM, cbor2.dumps(value))


def test_a_heartbeat_with_viewports_is_cut_users_first() -> None:
    users = {f"u{n:03}": entry(f"u{n:03}") for n in range(20)}
    cursors = {f"u{n:03}": (float(n), 0.0) for n in range(20)}
    viewports = {f"u{n:03}": Viewport(float(n), 1.0, 1280.0, 720.0, 1.0) for n in range(20)}
    parts = encode_presence_parts(
        "n1", PresenceOut("b1", True, users, cursors, viewports), max_bytes=LIMIT
    )
    assert len(parts) > 2 and all(len(p) <= LIMIT for p in parts)
    remote = [decode_message("board:b1", p) for p in parts]
    node = NodePresence(0.0)
    moved: dict[str, Viewport] = {}
    for part in remote:
        assert isinstance(part, RemotePresence)
        node.apply(part, 1.0)
        # a part's cursors and viewports are of users already told
        assert set(part.cursors) <= set(node.users) and set(part.viewports) <= set(node.users)
        moved.update(part.viewports)
    assert node.users == users and moved == viewports
