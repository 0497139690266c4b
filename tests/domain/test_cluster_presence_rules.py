"""A cluster node's board room as a pure behaviour (no loop, no clock):
what it tells the other daemons of its own users, how it merges theirs
with its own, and when a silent daemon's users leave."""

from __future__ import annotations

from typing import Any

import trio

from agor_actors.domain.cluster_presence import (
    NodePresence,
    PresenceOut,
    RemotePresence,
    merged_entry,
    vanished,
)
from agor_actors.domain.presence import CursorMoved, PresenceConfig, UserEntry, WatchPrefs
from agor_actors.domain.room import (
    RoomBehaviour,
    RoomState,
    Subscribe,
    Subscription,
    _Member,
    _PresenceBeat,
    _PresenceFlush,
    _Watch,
)
from agor_actors.outbox import Outbox
from agor_actors.runtime import CancelTimer, Request, StartTimer, TrySend
from agor_actors.store import Resync, open_store
from agor_actors.world import InlineBlocking
from protocols import Codec, Limits, Presence, Viewport, decode_server_frame

CONFIG = PresenceConfig(offline_grace_s=2.0, node_heartbeat_s=1.0, node_liveness_s=3.0)


def entry(uid: str, status: str = "active") -> dict[str, Any]:
    return {
        "user_id": uid,
        "name": uid.title(),
        "color": "#e6194b",
        "status": status,
        "view": None,
        "typing": False,
    }


def board_room() -> tuple[RoomBehaviour, RoomState]:
    store = open_store("sqlite://", new_epoch=lambda: "e1")
    room = RoomBehaviour("board:b", store, presence=CONFIG, announce="broker:out")
    return room, RoomState(room="board:b", epoch="e1", head=0)


def sent(effects: Any) -> list[PresenceOut]:
    return [e.msg for e in effects if isinstance(e, TrySend) and isinstance(e.msg, PresenceOut)]


def test_the_most_present_entry_shows_own_daemon_first_on_a_tie() -> None:
    one, two = NodePresence(0.0), NodePresence(0.0)
    one.users["u"] = entry("u", "away")
    two.users["u"] = entry("u", "idle")
    assert merged_entry("u", {}, [one, two]) == entry("u", "idle")
    assert merged_entry("u", {"u": entry("u", "idle") | {"view": "here"}}, [two])["view"] == "here"
    assert merged_entry("v", {}, [one, two]) is None


def test_a_user_on_several_daemons_merges_as_one_daemon_merges_tabs() -> None:
    # typing on any daemon shows; the view is the most present entry's,
    # else the first view any daemon has
    one, two = NodePresence(0.0), NodePresence(0.0)
    one.users["u"] = entry("u", "idle") | {"typing": True, "view": "s1"}
    two.users["u"] = entry("u", "active") | {"view": "s2"}
    assert merged_entry("u", {}, [one, two]) == entry("u", "active") | {
        "typing": True,
        "view": "s2",
    }
    two.users["u"] = entry("u", "active")
    assert merged_entry("u", {}, [one, two]) == entry("u", "active") | {
        "typing": True,
        "view": "s1",
    }
    # a user on one daemon only is that daemon's entry as it is
    local = {"u": entry("u", "away") | {"typing": True}}
    assert merged_entry("u", local, []) is local["u"]
    one.users["u"] = entry("u", "idle")
    assert merged_entry("u", local, [one, two])["typing"] is True


def test_a_heartbeat_does_not_take_a_followed_user_back_to_an_old_viewport() -> None:
    # user a looks at v1 through daemon one, then moves on daemon three to
    # v2; daemon one's heartbeat repeats its own v1, which is no news
    two, at_two = board_room()
    v1 = Viewport(1.0, 0.0, 800.0, 600.0, 1.0)
    v2 = Viewport(2.0, 0.0, 800.0, 600.0, 1.0)
    p = at_two.presence
    list(two.handle(at_two, RemotePresence("n1", "b", True, {"a": entry("a")}, {}, {"a": v1}), 0.1))
    assert p.viewports["a"] == v1
    list(
        two.handle(at_two, RemotePresence("n3", "b", False, {"a": entry("a")}, {}, {"a": v2}), 0.2)
    )
    assert p.viewports["a"] == v2
    p.viewports_dirty.clear()
    list(two.handle(at_two, RemotePresence("n1", "b", True, {"a": entry("a")}, {}, {"a": v1}), 1.1))
    assert p.viewports["a"] == v2 and p.viewports_dirty == {}
    # where a looks on daemon one changes: that is news again
    v3 = Viewport(3.0, 0.0, 800.0, 600.0, 1.0)
    list(two.handle(at_two, RemotePresence("n1", "b", False, {}, {}, {"a": v3}), 1.2))
    assert p.viewports["a"] == v3 and "a" in p.viewports_dirty


def test_a_viewport_heard_before_its_users_entry_is_news_once_the_user_shows() -> None:
    # a change can say where a looks before any message says a is there
    # (its entry reached that daemon's room later): the heartbeat's repeat
    # is then news, else a follower would never learn it
    two, at_two = board_room()
    v1 = Viewport(1.0, 0.0, 800.0, 600.0, 1.0)
    list(two.handle(at_two, RemotePresence("n1", "b", False, {}, {}, {"a": v1}), 0.1))
    assert "a" not in at_two.presence.viewports
    list(two.handle(at_two, RemotePresence("n1", "b", True, {"a": entry("a")}, {}, {"a": v1}), 0.2))
    assert at_two.presence.viewports["a"] == v1 and "a" in at_two.presence.viewports_dirty


def test_a_heartbeat_says_where_own_users_look_here_not_elsewhere() -> None:
    one, at_one = board_room()
    v1 = Viewport(1.0, 0.0, 800.0, 600.0, 1.0)
    v2 = Viewport(2.0, 0.0, 800.0, 600.0, 1.0)
    list(one.handle(at_one, UserEntry("a", entry("a")), 0.0))
    list(one.handle(at_one, WatchPrefs("c1", "a", v1, None, None), 0.0))
    list(
        one.handle(at_one, RemotePresence("n3", "b", False, {"a": entry("a")}, {}, {"a": v2}), 0.5)
    )
    assert at_one.presence.viewports["a"] == v2  # for followers here: the latest
    (beat,) = sent(one.handle(at_one, _PresenceBeat(), 1.0))
    assert beat.viewports == {"a": v1}
    # a leaves this daemon: its viewport here is no longer said
    list(one.handle(at_one, UserEntry("a", None), 1.5))
    list(one.handle(at_one, UserEntry("b", entry("b")), 1.5))
    (beat,) = sent(one.handle(at_one, _PresenceBeat(), 2.0))
    assert beat.viewports == {}


def test_a_daemon_vanishes_after_liveness_and_grace_exactly() -> None:
    nodes = {"n": NodePresence(10.0)}
    assert vanished(nodes, 14.999, liveness_s=3.0, grace_s=2.0) == []
    assert vanished(nodes, 15.0, liveness_s=3.0, grace_s=2.0) == ["n"]


def test_a_full_message_replaces_and_a_change_patches() -> None:
    node = NodePresence(0.0)
    node.apply(RemotePresence("n", "b", True, {"a": entry("a"), "b": entry("b")}, {}), 1.0)
    touched = node.apply(RemotePresence("n", "b", True, {"a": entry("a", "idle")}, {}), 2.0)
    assert touched == {"a", "b"} and set(node.users) == {"a"} and node.seen_s == 2.0
    node.apply(RemotePresence("n", "b", False, {"a": None, "c": entry("c")}, {}), 3.0)
    assert set(node.users) == {"c"}


def test_own_users_are_announced_at_the_flush_and_in_full_at_each_beat() -> None:
    room, state = board_room()
    effects = list(room.handle(state, UserEntry("a", entry("a")), 0.0))
    beats = [e for e in effects if isinstance(e, StartTimer) and e.key == "presence-beat"]
    assert len(beats) == 1 and beats[0].repeat and beats[0].delay_s == 1.0
    list(room.handle(state, CursorMoved("a", "c1", 1.0, 2.0), 0.0))
    list(room.handle(state, CursorMoved("a", "c1", 3.0, 4.0), 0.0))
    (change,) = sent(room.handle(state, _PresenceFlush(), 0.01))
    assert change == PresenceOut("b", False, {"a": entry("a")}, {"a": (3.0, 4.0)})
    assert sent(room.handle(state, _PresenceFlush(), 0.05)) == []  # nothing new
    (beat,) = sent(room.handle(state, _PresenceBeat(), 1.0))
    assert beat.full and beat.users == {"a": entry("a")}
    # the last user leaves: told at the flush, then "none of ours" in full
    # at each beat for the others' liveness timeout (3 beats of 1 s), in
    # case the broker lost the goodbye; the beat stops with the last
    list(room.handle(state, UserEntry("a", None), 1.5))
    (left,) = sent(room.handle(state, _PresenceFlush(), 1.5))
    assert left.users == {"a": None}
    for at in (2.0, 3.0, 4.0):
        effects = list(room.handle(state, _PresenceBeat(), at))
        assert sent(effects) == [PresenceOut("b", True, {}, {})]
        assert (CancelTimer("presence-beat") in effects) is (at == 4.0)


def test_a_room_that_starts_asks_the_others_and_they_answer_at_once() -> None:
    """A board room does not wait up to a heartbeat for the other daemons'
    users: its first subscriber makes it ask, once (again after a resync:
    the broker may have lost what it said meanwhile), and a daemon with
    users there answers with its heartbeat at once (cluster seed 11332:
    a facepile that waited 8.3 s for another daemon's users)."""
    one, at_one = board_room()  # has a user
    two, at_two = board_room()  # starts now: its first subscriber
    list(one.handle(at_one, UserEntry("a", entry("a")), 0.0))
    list(one.handle(at_one, _PresenceFlush(), 0.0))  # told as a change, which two missed

    def join(connection_id: str, at: float) -> list[PresenceOut]:
        sub = Subscription(connection_id, "board:b", Outbox(Codec.JSON), "b")
        request = Request(Subscribe(sub, None), object())  # type: ignore[arg-type]
        return sent(two.handle(at_two, request, at))

    (ask,) = join("c1", 0.1)
    assert ask == PresenceOut("b", False, {}, {}, ask=True)
    assert join("c2", 0.2) == []  # asked already
    heard = RemotePresence("n2", ask.board, ask.full, ask.users, ask.cursors, ask=True)
    (answer,) = sent(one.handle(at_one, heard, 0.2))
    assert answer.full and answer.users == {"a": entry("a")} and not answer.ask
    remote = RemotePresence("n1", "b", answer.full, answer.users, answer.cursors)
    list(two.handle(at_two, remote, 0.3))
    assert set(at_two.presence.users) == {"a"}
    # a daemon with none of its users there has nothing to answer
    three, at_three = board_room()
    assert sent(three.handle(at_three, heard, 0.2)) == []
    # a resync (the broker's connection was lost) asks again, at most once
    # per flush period (a fresh join's resync comes right after its join)
    two._blocking = InlineBlocking()  # what init takes from the world: the log's read
    effects = list(two.handle(at_two, Resync(), 0.4))
    assert sent(effects) == [PresenceOut("b", False, {}, {}, ask=True)]
    at_two.filling = False  # (the log's read is not answered here)
    assert sent(two.handle(at_two, Resync(), 0.41)) == []


def test_a_room_that_starts_again_says_none_of_its_users_are_left_at_its_first_beat() -> None:
    """Daemon two's room showed user b; its registry started over and b
    left meanwhile.  Daemon one drops b at two's first heartbeat, not after
    two's liveness timeout and the grace (cluster seed 9763: 27 s)."""
    one, at_one = board_room()
    two, at_two = board_room()
    list(one.handle(at_one, RemotePresence("n2", "b", True, {"b": entry("b")}, {}), 0.0))
    assert set(at_one.presence.users) == {"b"}
    sub = Subscription("c1", "board:b", Outbox(Codec.JSON), "a")
    effects = list(two.handle(at_two, Request(Subscribe(sub, None), object()), 5.0))  # type: ignore[arg-type]
    assert StartTimer("presence-beat", 1.0, _PresenceBeat(), repeat=True) in effects
    (beat,) = sent(two.handle(at_two, _PresenceBeat(), 6.0))
    assert beat == PresenceOut("b", True, {}, {})
    list(one.handle(at_one, RemotePresence("n2", beat.board, beat.full, beat.users, {}), 6.0))
    assert at_one.presence.users == {}
    # said once: nothing more to say, and nothing to watch, so the beat stops
    effects = list(two.handle(at_two, _PresenceBeat(), 7.0))
    assert sent(effects) == [] and CancelTimer("presence-beat") in effects


def test_a_lost_goodbye_is_repaired_by_the_next_heartbeat() -> None:
    """Daemon one's last user leaves; the broker loses that change (at most
    once).  Daemon two drops the user at one's next heartbeat, not after
    its liveness timeout and the grace (cluster seed 1528: 16 s late)."""
    one, one_state = board_room()
    two, two_state = board_room()

    def deliver(outs: list[PresenceOut], at: float) -> None:
        for out in outs:
            remote = RemotePresence("n1", out.board, out.full, out.users, out.cursors)
            list(two.handle(two_state, remote, at))

    list(one.handle(one_state, UserEntry("a", entry("a")), 0.0))
    deliver(sent(one.handle(one_state, _PresenceFlush(), 0.01)), 0.01)
    assert set(two_state.presence.users) == {"a"}
    list(one.handle(one_state, UserEntry("a", None), 0.5))
    lost = sent(one.handle(one_state, _PresenceFlush(), 0.5))
    assert lost and lost[0].users == {"a": None}  # never delivered
    deliver(sent(one.handle(one_state, _PresenceBeat(), 1.0)), 1.0)
    assert two_state.presence.users == {}


def test_other_daemons_users_merge_and_leave_after_liveness_and_grace() -> None:
    room, state = board_room()
    p = state.presence
    list(room.handle(state, UserEntry("a", entry("a")), 0.0))
    remote = RemotePresence("n2", "b", True, {"b": entry("b")}, {"b": (5.0, 6.0)})
    effects = list(room.handle(state, remote, 0.5))
    assert sent(effects) == []  # never told on to others
    assert set(p.users) == {"a", "b"} and p.cursors["b"] == (5.0, 6.0)
    # a cursor of a user the daemon does not show is ignored
    list(room.handle(state, RemotePresence("n2", "b", False, {}, {"z": (1.0, 1.0)}), 0.6))
    assert "z" not in p.cursors
    # silent from 0.6: still there at 0.6 + 3 + 2 - a bit, gone at 5.6
    list(room.handle(state, _PresenceBeat(), 5.5))
    assert "b" in p.users
    list(room.handle(state, _PresenceBeat(), 5.6))
    assert set(p.users) == {"a"} and "b" not in p.cursors and p.nodes == {}


async def test_a_followed_users_viewport_goes_to_followers_on_other_daemons() -> None:
    one, at_one = board_room()
    two, at_two = board_room()
    seen = Outbox(Codec.JSON)
    at_two.presence.watch["c2"] = _Watch(follow="a")  # b follows a, on daemon two
    sub = Subscription("c2", "board:b", seen, "b")
    at_two.subscribers[sub.key] = _Member(sub, 0)
    list(one.handle(at_one, UserEntry("a", entry("a")), 0.0))
    # a moves the viewport twice before a flush: the latest goes, once
    for n in range(2):
        moved = WatchPrefs("c1", "a", Viewport(float(n), 0.0, 800.0, 600.0, 1.0), None, None)
        list(one.handle(at_one, moved, 0.0))
    (change,) = sent(one.handle(at_one, _PresenceFlush(), 0.01))
    assert change.viewports == {"a": Viewport(1.0, 0.0, 800.0, 600.0, 1.0)}
    assert sent(one.handle(at_one, _PresenceFlush(), 0.05)) == []  # rate-limited: nothing new
    heard = RemotePresence("n1", "b", False, change.users, change.cursors, change.viewports)
    list(two.handle(at_two, heard, 0.02))
    list(two.handle(at_two, _PresenceFlush(), 0.03))
    with trio.fail_after(5):  # queued already: no wait
        frame = await seen.next_frame()
    (shown,) = decode_server_frame(Codec.JSON, frame, Limits())
    assert isinstance(shown, Presence)
    assert shown.viewport == Viewport(1.0, 0.0, 800.0, 600.0, 1.0)
    # every heartbeat says where a's users look (a follower that came later
    # learns it), and an unchanged viewport is no news for the followers
    (beat,) = sent(one.handle(at_one, _PresenceBeat(), 1.0))
    assert beat.full and beat.viewports == change.viewports
    list(two.handle(at_two, RemotePresence("n1", "b", True, beat.users, {}, beat.viewports), 1.0))
    assert at_two.presence.viewports_dirty == {}
    # a viewport of a user the daemon does not show is ignored
    stray = RemotePresence("n1", "b", False, {}, {}, {"z": Viewport(0.0, 0.0, 1.0, 1.0, 1.0)})
    list(two.handle(at_two, stray, 1.1))
    assert "z" not in at_two.presence.viewports
