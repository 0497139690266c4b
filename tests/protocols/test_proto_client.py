"""The client machine on its own, fed hand-made server frames."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from protocols import (
    Auth,
    CallResult,
    ClientConnection,
    ClientState,
    Codec,
    Error,
    ErrorCode,
    ErrorInfo,
    Event,
    EventApplied,
    Join,
    Joined,
    Lagged,
    Left,
    LocalProtocolError,
    Pong,
    PongReceived,
    Presence,
    PresenceChanged,
    PresenceUpdate,
    ProtocolViolation,
    ReloadRequired,
    Result,
    ResumeRequested,
    RoomJoined,
    RoomLeft,
    RoomStatus,
    ServerError,
    ServerMessage,
    Since,
    Welcome,
    Welcomed,
    decode_client_frame,
    encode,
)

CODEC = Codec.JSON
LIMITS = {"max_pending_calls": 3, "max_subscriptions": 4, "max_depth": 6, "max_frame_bytes": 400}


def feed(client: ClientConnection, *messages: ServerMessage, now: float = 0.0) -> list[Any]:
    return client.receive_data(encode(CODEC, list(messages)), now)


def open_client(limits: dict[str, Any] | None = None) -> ClientConnection:
    client = ClientConnection(codec=CODEC, client_id="c1")
    client.hello("tok")
    [event] = feed(client, Welcome("k", "u", 15000, LIMITS if limits is None else limits))
    assert isinstance(event, Welcomed)
    return client


def live_room(client: ClientConnection, room: str = "session:1", seq: int = 0) -> None:
    client.join(room)
    events = feed(client, Joined(room, "e1", seq, False))
    assert events == [RoomJoined(room, "e1", seq, False), ReloadRequired(room, "e1", seq)]


def ev(seq: int, last: int | None = None, room: str = "session:1") -> Event:
    return Event(room, seq, "task:message", data={"seq": seq}, last_seq=last)


def applied(events: list[Any]) -> list[tuple[int, int]]:
    return [(e.event.seq, e.event.end_seq) for e in events if isinstance(e, EventApplied)]


def sent(frame: str | bytes) -> list[Any]:
    return list(decode_client_frame(CODEC, frame))


def test_handshake() -> None:
    client = ClientConnection(codec=CODEC, client_id="c1")
    assert client.state is ClientState.DISCONNECTED
    assert sent(client.hello("tok"))[0].client_id == "c1"
    assert client.state is ClientState.AWAITING_WELCOME
    [event] = feed(client, Error("rate_limited", "slow down"))
    assert event == ServerError(Error("rate_limited", "slow down"))
    with pytest.raises(LocalProtocolError):
        client.call("s", "get")
    feed(client, Welcome("k", "u", 15000, {"max_pending_calls": 5, "rate_per_s": 20}))
    assert client.state is ClientState.OPEN
    assert client.server_limits.max_pending_calls == 5
    assert client.server_limits.rate_per_s == 20.0
    with pytest.raises(LocalProtocolError):
        client.hello("again")


def test_malformed_limits_keep_the_defaults() -> None:
    client = open_client({"max_pending_calls": -1, "max_depth": "9", "max_batch": True, "x": 1})
    assert client.server_limits.max_pending_calls == 64
    assert client.server_limits.max_depth == 32
    assert client.server_limits.max_batch == 100


def test_only_welcome_or_error_before_welcome() -> None:
    client = ClientConnection(codec=CODEC)
    client.hello(None)
    [violation] = feed(client, Pong(1), Pong(2))
    assert isinstance(violation, ProtocolViolation)
    assert violation.error.code is ErrorCode.INVALID_STATE and violation.close_code == 1002
    assert client.state is ClientState.CLOSING
    assert feed(client, Welcome("k", "u", 1, {})) == []


def test_welcome_twice_is_a_violation() -> None:
    client = open_client()
    [violation] = feed(client, Welcome("k", "u", 1, {}))
    assert isinstance(violation, ProtocolViolation) and violation.close_code == 1002


def test_a_call_never_sent_frees_its_pending_slot() -> None:
    """A call whose send was cancelled before the transport took it is
    never answered: ``unsent`` forgets it, so it does not hold one of the
    connection's pending slots for good (found by the simulator: a write
    cancelled while the link was full left ``can_call`` short by one)."""
    client = open_client()
    refs = [client.call("tasks", "get", id=str(i))[0] for i in range(client.max_pending_calls)]
    assert not client.can_call
    client.unsent(refs[0])
    assert client.can_call and refs[0] not in client.pending_calls
    client.unsent(refs[0])  # not pending any more: nothing
    client.unsent(10_000)
    assert len(client.pending_calls) == len(refs) - 1
    [violation] = feed(client, Result(refs[0], True))  # an answer to it is unexpected
    assert isinstance(violation, ProtocolViolation)


def test_calls_are_matched_by_ref() -> None:
    client = open_client()
    ref1, frame1 = client.call("tasks", "create", data={"t": 1}, temp_id="tmp")
    ref2, _ = client.call("tasks", "get", id="x")
    assert ref2 == ref1 + 1
    [call] = sent(frame1)
    assert (call.ref, call.service, call.method, call.data, call.temp_id) == (
        ref1,
        "tasks",
        "create",
        {"t": 1},
        "tmp",
    )
    events = feed(
        client, Result(ref2, True, data=2), Result(ref1, False, error=ErrorInfo("x", "y"))
    )
    assert [e.result.ref for e in events] == [ref2, ref1]
    assert client.pending_calls == {}
    [violation] = feed(client, Result(ref1, True))
    assert isinstance(violation, ProtocolViolation)
    assert violation.error.code is ErrorCode.UNKNOWN_REF and violation.close_code is None
    assert client.state is ClientState.OPEN


def test_a_call_sent_again_goes_under_the_next_ref() -> None:
    """``send_call``: the same call (a keyed write lost with its connection)
    under a ref of this connection, pending like any; bounded the same."""
    client = open_client()
    ref, frame = client.call("tasks", "create", data={"t": 1}, idempotency_key="k-1")
    [first] = sent(frame)
    again_ref, again_frame = client.send_call(first)
    [again] = sent(again_frame)
    assert again_ref == ref + 1 and again == attrs.evolve(first, ref=again_ref)
    assert set(client.pending_calls) == {ref, again_ref}
    client.send_call(first)
    assert not client.can_call  # the server's 3
    with pytest.raises(LocalProtocolError) as info:
        client.send_call(first)
    assert info.value.code is ErrorCode.TOO_MANY_PENDING


def test_pending_calls_are_bounded_by_the_server() -> None:
    client = open_client()
    refs = [client.call("s", "get")[0] for _ in range(3)]
    assert not client.can_call
    with pytest.raises(LocalProtocolError) as info:
        client.call("s", "get")
    assert info.value.code is ErrorCode.TOO_MANY_PENDING
    feed(client, Result(refs[0], True))
    assert client.can_call
    assert client.call("s", "get")[0] == refs[-1] + 1


def test_sends_stay_within_the_servers_limits() -> None:
    client = open_client()
    with pytest.raises(LocalProtocolError) as info:
        client.call("s", "create", data="x" * 500)
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    with pytest.raises(LocalProtocolError) as info:
        client.call("s", "create", data=[[[[[[1]]]]]])
    assert info.value.code is ErrorCode.TOO_DEEP
    assert client.pending_calls == {}
    for n in range(4):
        client.join(f"board:{n}")
    with pytest.raises(LocalProtocolError) as info:
        client.join("board:9")
    assert info.value.code is ErrorCode.TOO_MANY_SUBSCRIPTIONS
    client2 = open_client({"max_batch": 2})
    with pytest.raises(LocalProtocolError) as info:
        client2.send([PresenceUpdate(typing=True)] * 3)
    assert info.value.code is ErrorCode.BATCH_TOO_LARGE


def test_join_then_events_in_order_once() -> None:
    client = open_client()
    assert sent(client.join("session:1")) == [Join("session:1")]
    assert client.rooms["session:1"].status is RoomStatus.JOINING
    assert feed(client, ev(1)) == []  # before joined: ignored
    live_room_events = feed(client, Joined("session:1", "e1", 0, False), ev(1), ev(2), ev(2), ev(1))
    assert applied(live_room_events) == [(1, 1), (2, 2)]
    assert applied(feed(client, ev(3), ev(1), ev(3))) == [(3, 3)]
    track = client.rooms["session:1"]
    assert (track.status, track.epoch, track.seq) == (RoomStatus.LIVE, "e1", 3)
    assert client.statistics().duplicates_dropped == 4
    assert client.statistics().events_ignored == 1


def test_a_gap_asks_to_resume_from_the_last_applied_seq() -> None:
    client = open_client()
    live_room(client)
    events = feed(client, ev(1), ev(3), ev(2), ev(4))
    assert applied(events) == [(1, 1)]
    resume = events[1]
    assert isinstance(resume, ResumeRequested) and resume.reason == "gap"
    assert resume.join == Join("session:1", Since("e1", 1))
    assert sent(resume.data) == [resume.join]
    assert client.rooms["session:1"].status is RoomStatus.JOINING
    events = feed(client, Joined("session:1", "e1", 4, True), ev(2), ev(3), ev(4), ev(5))
    assert events[0] == RoomJoined("session:1", "e1", 1, True)
    assert applied(events) == [(2, 2), (3, 3), (4, 4), (5, 5)]


def test_merged_events() -> None:
    client = open_client()
    live_room(client, seq=3)
    assert applied(feed(client, ev(4, 6))) == [(4, 6)]
    assert client.rooms["session:1"].seq == 6
    assert feed(client, ev(2, 5), ev(6, 6)) == []  # wholly applied already: duplicates
    [overlap] = feed(client, ev(5, 8))  # 5 and 6 applied, 7 and 8 not: cannot apply in part
    assert isinstance(overlap, ResumeRequested) and overlap.reason == "overlap"
    assert overlap.join.since == Since("e1", 6)
    events = feed(client, Joined("session:1", "e1", 8, True), ev(7, 8))
    assert applied(events) == [(7, 8)]
    [gap] = feed(client, ev(10, 12))
    assert isinstance(gap, ResumeRequested) and gap.join.since == Since("e1", 8)


def test_lagged() -> None:
    client = open_client()
    live_room(client)
    feed(client, *(ev(n) for n in range(1, 6)))
    [resume] = feed(client, Lagged("session:1", 6), ev(6))
    assert isinstance(resume, ResumeRequested) and resume.reason == "lagged"
    assert resume.join.since == Since("e1", 5)
    assert feed(client, Lagged("session:1", 6)) == []  # already resuming
    events = feed(client, Joined("session:1", "e1", 7, True), ev(6), ev(7))
    assert applied(events) == [(6, 6), (7, 7)]
    # resume_from below what was applied: since = resume_from - 1, the rest are duplicates
    [resume] = feed(client, Lagged("session:1", 4))
    assert isinstance(resume, ResumeRequested) and resume.join.since == Since("e1", 3)
    events = feed(client, Joined("session:1", "e1", 8, True), *(ev(n) for n in range(4, 9)))
    assert applied(events) == [(8, 8)]
    assert client.statistics().lagged == 2


def test_lagged_and_events_for_unknown_rooms_are_ignored() -> None:
    client = open_client()
    assert feed(client, Lagged("board:9", 3), ev(1, room="board:9")) == []


def test_resumes_without_progress_fall_back_to_a_reload() -> None:
    client = ClientConnection(codec=CODEC, max_resumes=2)
    client.hello(None)
    feed(client, Welcome("k", "u", 1, {}))
    live_room(client)
    sinces = []
    for _ in range(3):
        [resume] = feed(client, ev(5))
        assert isinstance(resume, ResumeRequested)
        sinces.append(resume.join.since)
        feed(client, Joined("session:1", "e1", 5, True))
    assert sinces == [Since("e1", 0), Since("e1", 0), None]
    # progress resets the count
    client2 = ClientConnection(codec=CODEC, max_resumes=1)
    client2.hello(None)
    feed(client2, Welcome("k", "u", 1, {}))
    live_room(client2)
    for n in range(1, 4):
        [resume] = feed(client2, ev(n + 1))
        assert isinstance(resume, ResumeRequested) and resume.join.since is not None
        assert applied(feed(client2, Joined("session:1", "e1", n + 1, True), ev(n))) == [(n, n)]


@pytest.mark.parametrize(
    "joined",
    [
        Joined("session:1", "other-epoch", 9, True),  # another epoch
        Joined("session:1", "e1", 2, True),  # behind what the client applied
    ],
)
def test_an_inconsistent_recovery_is_a_reload(joined: Joined) -> None:
    client = open_client()
    live_room(client)
    feed(client, ev(1), ev(2), ev(3))
    [resume] = feed(client, ev(5))
    assert isinstance(resume, ResumeRequested)
    events = feed(client, joined)
    assert events == [
        RoomJoined("session:1", joined.epoch, joined.seq, False),
        ReloadRequired("session:1", joined.epoch, joined.seq),
    ]
    assert client.rooms["session:1"].seq == joined.seq


def test_a_fresh_join_is_never_recovered() -> None:
    client = open_client()
    client.join("board:1")
    events = feed(client, Joined("board:1", "e", 4, True))
    assert events[0] == RoomJoined("board:1", "e", 4, False)
    assert isinstance(events[1], ReloadRequired)


def test_unsolicited_joined_starts_tracking_the_room() -> None:
    client = open_client()
    events = feed(client, Joined("user:u", "e", 2, False), Event("user:u", 3, "activity:new"))
    assert [type(e) for e in events] == [RoomJoined, ReloadRequired, EventApplied]
    # an epoch change announced to a live room
    events = feed(client, Joined("user:u", "e2", 0, False), Event("user:u", 1, "activity:new"))
    assert [type(e) for e in events] == [RoomJoined, ReloadRequired, EventApplied]
    assert client.rooms["user:u"].epoch == "e2"


def test_leave() -> None:
    client = open_client()
    live_room(client)
    assert sent(client.leave("session:1"))[0].room == "session:1"
    assert client.rooms["session:1"].status is RoomStatus.LEAVING
    assert feed(client, ev(1), Joined("session:1", "e1", 1, False)) == []
    assert feed(client, Left("session:1", "left")) == [RoomLeft("session:1", "left")]
    assert "session:1" not in client.rooms
    assert feed(client, Left("session:1", "left")) == []
    with pytest.raises(LocalProtocolError):
        client.leave("session:1")


def test_join_again_while_the_leave_is_in_flight() -> None:
    client = open_client()
    live_room(client)
    client.leave("session:1")
    client.join("session:1")
    assert client.rooms["session:1"].status is RoomStatus.JOINING
    assert feed(client, Left("session:1", "left")) == []  # answers the leave
    events = feed(client, Joined("session:1", "e1", 0, True), ev(1))
    assert events[0] == RoomJoined("session:1", "e1", 0, True)
    assert applied(events) == [(1, 1)]
    # two leaves, one join in between
    client.leave("session:1")
    client.join("session:1")
    client.leave("session:1")
    assert feed(client, Left("session:1", "left")) == []
    assert feed(client, Joined("session:1", "e1", 1, True)) == []
    assert feed(client, Left("session:1", "left")) == [RoomLeft("session:1", "left")]


def test_refused_join() -> None:
    client = open_client()
    client.join("session:2")
    assert feed(client, Left("session:2", "forbidden")) == [RoomLeft("session:2", "forbidden")]
    assert client.rooms == {}


def test_join_twice_is_a_local_error() -> None:
    client = open_client()
    client.join("board:1")
    with pytest.raises(LocalProtocolError):
        client.join("board:1")
    feed(client, Joined("board:1", "e", 0, False))
    with pytest.raises(LocalProtocolError):
        client.join("board:1")


def test_connection_lost_and_rejoin_all() -> None:
    client = open_client()
    live_room(client, "session:1")
    feed(client, ev(1), ev(2))
    client.join("board:2")  # in flight when the connection drops
    live_room(client, "board:3", seq=7)
    client.leave("board:3")
    ref, _ = client.call("tasks", "get")
    events = client.connection_lost()
    assert events == [
        CallResult(
            Result(ref, False, error=ErrorInfo("connection_lost", "the connection was lost"))
        ),
        RoomLeft("board:3", "left"),
    ]
    assert client.state is ClientState.DISCONNECTED
    assert {r: t.status for r, t in client.rooms.items()} == {
        "session:1": RoomStatus.DETACHED,
        "board:2": RoomStatus.DETACHED,
    }
    assert client.receive_data(encode(CODEC, ev(3)), 0.0) == []
    assert client.connection_lost() == []
    client.hello("tok")
    feed(client, Welcome("k2", "u", 15000, LIMITS))
    joins = client.rejoin_all()
    assert joins == [Join("session:1", Since("e1", 2)), Join("board:2")]
    assert sent(client.send(joins)) == joins
    assert client.rejoin_all() == []
    events = feed(client, Joined("session:1", "e1", 4, True), ev(2), ev(3), ev(4))
    assert applied(events) == [(3, 3), (4, 4)]


def test_join_of_a_detached_room_resumes() -> None:
    client = open_client()
    live_room(client)
    feed(client, ev(1))
    client.connection_lost()
    client.hello("tok")
    feed(client, Welcome("k", "u", 1, {}))
    # (a since the caller gives is for an untracked room: the track's wins)
    assert sent(client.join("session:1", Since("e9", 9))) == [Join("session:1", Since("e1", 1))]


def test_a_room_let_go_is_joined_again_from_where_the_caller_stands() -> None:
    """``left`` ends the track; a join with ``since`` (the caller's copy, e.g.
    after ``left: unavailable``) resumes from there: recovered, and only
    what follows it is applied."""
    client = open_client()
    live_room(client)
    feed(client, ev(1), ev(2))
    assert feed(client, Left("session:1", "unavailable")) == [RoomLeft("session:1", "unavailable")]
    assert client.rooms == {}
    assert sent(client.join("session:1", Since("e1", 2))) == [Join("session:1", Since("e1", 2))]
    events = feed(client, Joined("session:1", "e1", 3, True), ev(2), ev(3))
    assert events[0] == RoomJoined("session:1", "e1", 2, True)
    assert applied(events) == [(3, 3)]
    # another epoch: the server cannot resume it, and the caller reloads
    client.leave("session:1")
    feed(client, Left("session:1", "left"))
    client.join("session:1", Since("e1", 3))
    events = feed(client, Joined("session:1", "e2", 0, False))
    assert events == [
        RoomJoined("session:1", "e2", 0, False),
        ReloadRequired("session:1", "e2", 0),
    ]


def test_presence_pong_and_errors() -> None:
    client = open_client()
    presence = Presence("b", users=[{"user_id": "u"}], cursors=[{"user_id": "u", "x": 1}])
    assert feed(client, presence) == [PresenceChanged(presence)]
    frame = client.ping(12.5)
    assert client.last_ping_s == 12.5
    [ping] = sent(frame)
    assert ping.t == 12500
    [pong] = feed(client, Pong(12500), now=12.75)
    assert pong == PongReceived(12500, 0.25)
    assert client.last_received_s == 12.75
    assert feed(client, Error("forbidden", "no")) == [ServerError(Error("forbidden", "no"))]
    assert sent(client.presence(PresenceUpdate(view="session:1"))) == [
        PresenceUpdate(view="session:1")
    ]


def test_garbage_from_the_server_closes() -> None:
    client = open_client()
    [violation] = client.receive_data(b"\x00", 0.0)
    assert isinstance(violation, ProtocolViolation)
    assert violation.error.code is ErrorCode.WRONG_FRAME_KIND and violation.close_code == 1003
    assert violation.reply is None
    assert client.state is ClientState.CLOSING
    client.connection_lost()
    assert client.state is ClientState.DISCONNECTED


def test_unknown_server_messages_are_skipped() -> None:
    client = open_client()
    live_room(client)
    events = client.receive_data(
        '[{"type":"news","x":1},' + str(encode(CODEC, ev(1))) + ',{"type":"event"}]', 0.0
    )
    assert [type(e) for e in events] == [ProtocolViolation, EventApplied, ProtocolViolation]
    assert all(e.close_code is None for e in events if isinstance(e, ProtocolViolation))


def test_close() -> None:
    client = open_client()
    client.close()
    assert client.state is ClientState.CLOSING
    assert feed(client, Pong(1)) == []
    with pytest.raises(LocalProtocolError):
        client.ping(1.0)


def test_auth_takes_a_ref_and_its_result_answers_it() -> None:
    client = open_client()
    ref, frame = client.auth("new-token")
    [auth] = sent(frame)
    assert auth == Auth(ref, "new-token")
    assert set(client.pending_calls) == {ref}
    next_ref, _ = client.call("tasks", "get", id="x")
    assert next_ref == ref + 1
    [event] = feed(client, Result(ref, True, data={"user_id": "u", "expires_at": 5}))
    assert isinstance(event, CallResult) and event.result.data["expires_at"] == 5
    # lost with the connection like a call
    ref, _ = client.auth("again")
    lost = [e for e in client.connection_lost() if isinstance(e, CallResult)]
    assert ref in {e.result.ref for e in lost}


def test_welcome_carries_the_expiry() -> None:
    client = ClientConnection(codec=CODEC, client_id="c1")
    client.hello("tok")
    [event] = feed(client, Welcome("k", "u", 15000, LIMITS, expires_at=99))
    assert isinstance(event, Welcomed) and event.welcome.expires_at == 99
