"""Client and server machines back to back: whole conversations, reconnects,
and delivery under duplicates, gaps, reordering, lagged and epoch resets."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from proto_pair import ConnectionPair, SyncWorld

from protocols import (
    CallReceived,
    CallResult,
    ClientState,
    Codec,
    Event,
    EventApplied,
    JoinRequested,
    LeaveRequested,
    Limits,
    PingReceived,
    PongReceived,
    PresenceReceived,
    PresenceUpdate,
    ProtocolViolation,
    ReloadRequired,
    ResumeRequested,
    RoomJoined,
    RoomLeft,
    RoomStatus,
    ServerState,
    Since,
    prepare_batch,
)

ROOMS = ["session:a", "board:b", "session:c"]


@pytest.mark.parametrize("codec", list(Codec))
def test_a_whole_conversation(codec: Codec) -> None:
    pair = ConnectionPair(codec)
    pair.handshake()
    assert pair.client.state is ClientState.OPEN and pair.server.state is ServerState.OPEN

    ref, frame = pair.client.call("tasks", "create", data={"title": "t"}, temp_id="tmp-1")
    [received] = pair.to_server(frame)
    assert isinstance(received, CallReceived) and received.call.ref == ref
    [result] = pair.to_client(pair.server.result(ref, data={"id": "t-1", "rev": 1}))
    assert isinstance(result, CallResult) and result.result.data == {"id": "t-1", "rev": 1}

    [join] = pair.to_server(pair.client.join("session:1"))
    assert isinstance(join, JoinRequested) and join.join.since is None
    events = pair.to_client(pair.server.joined("session:1", epoch="e", seq=10, recovered=False))
    assert [type(e) for e in events] == [RoomJoined, ReloadRequired]

    batch = prepare_batch([Event("session:1", 11, "task:created"), Event("session:1", 12, "x")])
    events = pair.to_client(batch.frame(codec))
    assert [e.event.seq for e in events if isinstance(e, EventApplied)] == [11, 12]

    [presence] = pair.to_server(pair.client.presence(PresenceUpdate(board="b", typing=True)))
    assert isinstance(presence, PresenceReceived)

    pair.now = 3.0
    [ping] = pair.to_server(pair.client.ping(pair.now))
    assert isinstance(ping, PingReceived)
    pair.now = 3.5
    [pong] = pair.to_client(pair.server.pong(ping.ping.t))
    assert isinstance(pong, PongReceived) and pong.rtt_s == pytest.approx(0.5)

    [leave] = pair.to_server(pair.client.leave("session:1"))
    assert isinstance(leave, LeaveRequested)
    assert pair.to_client(pair.server.left("session:1")) == [RoomLeft("session:1", "left")]
    assert pair.client.rooms == {} and pair.server.subscriptions == frozenset()


def test_the_servers_automatic_answers_reach_the_client() -> None:
    pair = ConnectionPair(limits=Limits(rate_per_s=1, rate_burst=2))
    pair.handshake()  # the hello took one token
    ref, frame = pair.client.call("s", "get")
    [ok] = pair.to_server(frame)
    assert isinstance(ok, CallReceived)
    ref2, frame = pair.client.call("s", "get")
    [refused] = pair.to_server(frame)
    assert isinstance(refused, ProtocolViolation) and refused.reply is not None
    [result] = pair.to_client(refused.reply)
    assert isinstance(result, CallResult) and result.result.ref == ref2
    assert result.result.error is not None and result.result.error.code == "rate_limited"
    assert set(pair.client.pending_calls) == {ref}

    [refused] = pair.to_server(pair.client.join("board:1"))
    assert isinstance(refused, ProtocolViolation) and refused.reply is not None
    assert pair.to_client(refused.reply) == [
        RoomLeft("board:1", "rate_limited", "more than 1 messages per second")
    ]


def test_reconnect_resumes_each_room() -> None:
    pair = ConnectionPair(Codec.CBOR)
    pair.handshake()
    for room in ("session:1", "board:2"):
        pair.to_server(pair.client.join(room))
        pair.to_client(pair.server.joined(room, epoch="e", seq=0, recovered=False))
    pair.to_client(prepare_batch([Event("session:1", n, "x") for n in (1, 2, 3)]).frame(Codec.CBOR))
    lost = pair.reconnect()
    assert lost == []
    assert {t.status for t in pair.client.rooms.values()} == {RoomStatus.DETACHED}
    joins = pair.client.rejoin_all()
    events = pair.to_server(pair.client.send(joins))
    assert [(e.join.room, e.join.since, e.rejoin) for e in events] == [  # type: ignore[union-attr]
        ("session:1", Since("e", 3), False),
        ("board:2", Since("e", 0), False),
    ]
    # the server replays from an older point: what was applied is dropped
    pair.to_client(pair.server.joined("session:1", epoch="e", seq=5, recovered=True))
    frame = prepare_batch([Event("session:1", n, "x") for n in (2, 3, 4, 5)]).frame(Codec.CBOR)
    events = pair.to_client(frame)
    assert [e.event.seq for e in events if isinstance(e, EventApplied)] == [4, 5]
    # the other room's epoch changed meanwhile: reload
    events = pair.to_client(pair.server.joined("board:2", epoch="e2", seq=7, recovered=False))
    assert events[-1] == ReloadRequired("board:2", "e2", 7)


def _run_ops(world: SyncWorld, ops: list[tuple[Any, ...]], *, settle_joins: bool) -> None:
    world.settle()
    for room in ROOMS:
        world.join(room)
    if settle_joins:
        world.settle()
    for op in ops:
        kind = op[0]
        if kind == "publish":
            world.daemon.publish(ROOMS[op[1]], op[2])
        elif kind == "deliver":
            for _ in range(op[1]):
                while world.deliver_to_server():
                    pass
                world.deliver_to_client()
        elif kind == "fault":
            world.fault(op[1])
        elif kind == "disconnect":
            world.disconnect()
        elif kind == "stale":
            world.deliver_stale()
        elif kind == "lag":
            world.daemon.lag(ROOMS[op[1]])
        elif kind == "reset":
            world.daemon.reset_epoch(ROOMS[op[1]])
            world.stale.clear()  # see SyncWorld.fault
        elif kind == "forget":
            world.daemon.forget(ROOMS[op[1]], op[2])


def _check_converged(world: SyncWorld) -> None:
    # Quiet phase: one more event per room (a tail loss shows up as a gap),
    # then everything is delivered faithfully.
    world.settle()
    assert world.client.state is ClientState.OPEN
    for room in ROOMS:
        world.daemon.publish(room, 1)
    world.settle()
    for room in ROOMS:
        log = world.daemon.rooms[room]
        track = world.client.rooms[room]
        assert track.status is RoomStatus.LIVE, (room, track)
        assert (track.epoch, track.seq) == (log.epoch, log.head)
        assert world.mirror.epoch[room] == log.epoch
        assert world.mirror.applied[room] == list(range(1, log.head + 1))


_OP_KINDS = ["publish"] * 4 + ["deliver"] * 4 + ["fault"] * 3
_OP_KINDS += ["disconnect", "stale", "lag", "reset", "forget"]


def _op(kind: str) -> st.SearchStrategy[tuple[Any, ...]]:
    room = st.integers(0, 2)
    if kind == "publish":
        return st.tuples(st.just(kind), room, st.integers(1, 4))
    if kind == "deliver":
        return st.tuples(st.just(kind), st.integers(1, 6))
    if kind == "fault":
        return st.tuples(st.just(kind), st.sampled_from(["drop", "duplicate", "swap"]))
    if kind in ("lag", "reset"):
        return st.tuples(st.just(kind), room)
    if kind == "forget":
        return st.tuples(st.just(kind), room, st.integers(0, 30))
    return st.tuples(st.just(kind))


OPS = st.lists(st.sampled_from(_OP_KINDS).flatmap(_op), min_size=10, max_size=80)


@settings(max_examples=300, deadline=None)
@given(
    ops=OPS,
    seed=st.integers(0, 2**32),
    codec=st.sampled_from(Codec),
    merge=st.sampled_from([0.0, 0.5]),
    settle_joins=st.booleans(),
)
def test_every_event_is_applied_once_in_order(
    ops: list[tuple[Any, ...]], seed: int, codec: Codec, merge: float, settle_joins: bool
) -> None:
    world = SyncWorld(codec, seed, merge_probability=merge)
    _run_ops(world, ops, settle_joins=settle_joins)
    _check_converged(world)
    stats = world.client.statistics()
    for name in ("gaps", "overlaps", "duplicates_dropped", "lagged", "events_ignored"):
        if getattr(stats, name):
            event(f"client saw {name}")
    if world.mirror.reloads > len(ROOMS):
        event("reloaded a room after the first join")


@pytest.mark.parametrize(
    "ops",
    [
        pytest.param([("publish", 0, 4), ("fault", "drop"), ("deliver", 9)], id="gap"),
        pytest.param([("publish", 0, 4), ("fault", "duplicate"), ("deliver", 9)], id="duplicate"),
        pytest.param(
            [("publish", 0, 4), ("publish", 0, 4), ("fault", "swap"), ("deliver", 9)], id="reorder"
        ),
        pytest.param(
            [("publish", 0, 4), ("deliver", 1), ("disconnect",), ("publish", 0, 2), ("deliver", 9)],
            id="reconnect",
        ),
        pytest.param(
            [("publish", 0, 6), ("disconnect",), ("deliver", 30), ("stale",), ("stale",)],
            id="stale frames after a reconnect",
        ),
        pytest.param([("publish", 1, 5), ("lag", 1), ("deliver", 9)], id="lagged"),
        pytest.param(
            [("publish", 2, 5), ("disconnect",), ("forget", 2, 4), ("deliver", 9)],
            id="too old to replay",
        ),
        pytest.param([("publish", 2, 5), ("deliver", 9), ("reset", 2)], id="epoch reset"),
    ],
)
def test_named_scenarios(ops: list[tuple[Any, ...]]) -> None:
    world = SyncWorld(Codec.JSON, seed=7, merge_probability=0.5)
    _run_ops(world, ops, settle_joins=True)
    _check_converged(world)
    stats = world.client.statistics()
    name = {tuple(o[:2]) for o in ops}
    if ("fault", "drop") in name or ("fault", "swap") in name:
        assert stats.gaps >= 1 and any(isinstance(e, ResumeRequested) for e in world.client_log)
    if ("fault", "duplicate") in name:
        assert stats.duplicates_dropped >= 1
    if ("lag", 1) in name:
        assert stats.lagged == 1
    if ("reset", 2) in name or ("forget", 2) in name:
        assert world.mirror.reloads >= 4
