"""The server machine on its own: handshake, calls, rooms, limits, closing."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from protocols import (
    DEFAULT_LIMITS,
    Auth,
    AuthReceived,
    Call,
    CallReceived,
    CloseCode,
    Codec,
    Error,
    ErrorCode,
    ErrorInfo,
    Frame,
    HelloReceived,
    Join,
    Joined,
    JoinRequested,
    LeaveRequested,
    Left,
    Limits,
    LocalProtocolError,
    PingReceived,
    PresenceReceived,
    ProtocolViolation,
    Result,
    ServerConnection,
    ServerState,
    SubscriptionDropped,
    Welcome,
    decode_server_frame,
)


def frame(*items: dict[str, Any]) -> str:
    return orjson.dumps(items[0] if len(items) == 1 else list(items)).decode()


HELLO = {"type": "hello", "protocol": 1, "token": "tok", "client_id": "c1"}
PING = {"type": "ping", "t": 5}


def call(ref: int, **extra: Any) -> dict[str, Any]:
    return {"type": "call", "ref": ref, "service": "tasks", "method": "get", **extra}


def join(room: str, **extra: Any) -> dict[str, Any]:
    return {"type": "join", "room": room, **extra}


def server_messages(data: Frame | None) -> list[Any]:
    assert data is not None
    return list(decode_server_frame(Codec.JSON, data))


def open_server(limits: Limits = DEFAULT_LIMITS, codec: Codec = Codec.JSON) -> ServerConnection:
    server = ServerConnection(codec=codec, limits=limits)
    [event] = server.receive_data(frame(HELLO), 0.0)
    assert isinstance(event, HelloReceived)
    server.welcome(connection_id="k", user_id="u", heartbeat_ms=15000)
    assert server.state is ServerState.OPEN
    return server


def only_violation(events: list[Any]) -> ProtocolViolation:
    assert len(events) == 1 and isinstance(events[0], ProtocolViolation), events
    return events[0]


def test_handshake() -> None:
    server = ServerConnection(codec=Codec.JSON)
    assert server.state is ServerState.AWAITING_HELLO
    [event] = server.receive_data(frame(HELLO), 1.5)
    assert isinstance(event, HelloReceived)
    assert (event.hello.protocol, event.hello.token, event.hello.client_id) == (1, "tok", "c1")
    assert server.state is ServerState.AUTHENTICATING
    assert server.last_received_s == 1.5
    [welcome] = server_messages(server.welcome(connection_id="k", user_id="u", heartbeat_ms=9000))
    assert isinstance(welcome, Welcome)
    assert welcome.limits["max_pending_calls"] == 64
    assert welcome.limits["max_frame_bytes"] == 1 << 20
    assert server.state is ServerState.OPEN


@pytest.mark.parametrize("first", [PING, call(1), join("board:1")])
def test_nothing_but_hello_before_the_handshake(first: dict[str, Any]) -> None:
    server = ServerConnection(codec=Codec.JSON)
    violation = only_violation(server.receive_data(frame(first), 0.0))
    assert violation.error.code is ErrorCode.NOT_AUTHENTICATED
    assert violation.close_code == 4001
    assert server_messages(violation.reply) == [Error("not_authenticated", violation.error.message)]
    assert server.state is ServerState.CLOSING
    assert server.close_code == 4001
    assert server.receive_data(frame(HELLO), 0.0) == []


def test_nothing_while_authenticating() -> None:
    server = ServerConnection(codec=Codec.JSON)
    events = server.receive_data(frame(HELLO, PING), 0.0)
    assert isinstance(events[0], HelloReceived)
    assert isinstance(events[1], ProtocolViolation)
    assert events[1].error.code is ErrorCode.NOT_AUTHENTICATED
    with pytest.raises(LocalProtocolError):
        server.welcome(connection_id="k", user_id="u", heartbeat_ms=1)


def test_a_bad_hello_closes() -> None:
    server = ServerConnection(codec=Codec.JSON)
    violation = only_violation(server.receive_data(frame({**HELLO, "token": 5}), 0.0))
    assert violation.error.code is ErrorCode.INVALID_FIELD
    assert violation.close_code == CloseCode.PROTOCOL_ERROR
    server = ServerConnection(codec=Codec.JSON)
    violation = only_violation(server.receive_data(frame({**HELLO, "protocol": 2}), 0.0))
    assert violation.error.code is ErrorCode.UNSUPPORTED_PROTOCOL
    assert violation.close_code == 1002
    # anything that is not a hello is refused for coming too early, whatever its fields
    for early in ('{"type":"subscribe"}', '{"type":"call","ref":"x"}', '{"t":1}'):
        server = ServerConnection(codec=Codec.JSON)
        violation = only_violation(server.receive_data(early, 0.0))
        assert violation.error.code is ErrorCode.NOT_AUTHENTICATED
        assert violation.close_code == 4001


def test_hello_twice_closes() -> None:
    server = open_server()
    violation = only_violation(server.receive_data(frame(HELLO), 0.0))
    assert violation.error.code is ErrorCode.INVALID_STATE
    assert violation.close_code == 1002


def test_rejecting_the_token() -> None:
    server = ServerConnection(codec=Codec.JSON)
    server.receive_data(frame(HELLO), 0.0)
    reply = server.close(ErrorCode.UNAUTHORIZED, "bad token")
    assert server_messages(reply) == [Error("unauthorized", "bad token")]
    assert server.state is ServerState.CLOSING
    assert (server.close_code, server.close_reason) == (4001, "unauthorized: bad token")
    assert server.close(ErrorCode.UNAUTHORIZED, "again") is None
    with pytest.raises(LocalProtocolError):
        server.pong(1)
    server.connection_closed()
    assert server.state is ServerState.CLOSED
    assert server.receive_data(frame(PING), 0.0) == []
    with pytest.raises(LocalProtocolError):
        server.close()


def test_close_needs_a_closing_code() -> None:
    server = open_server()
    with pytest.raises(LocalProtocolError):
        server.close(ErrorCode.CONFLICT, "x")
    assert server.state is ServerState.OPEN
    with pytest.raises(LocalProtocolError):
        server.error("going_away", "use close")
    assert server.close() is None
    assert server.close_code == CloseCode.NORMAL


def test_calls_and_results() -> None:
    server = open_server()
    [event] = server.receive_data(frame(call(7, data={"x": 1})), 0.0)
    assert isinstance(event, CallReceived)
    assert event.call == Call(7, "tasks", "get", data={"x": 1})
    assert server.pending_calls == {7}
    assert server_messages(server.result(7, data=[1, 2])) == [Result(7, True, data=[1, 2])]
    assert server.pending_calls == frozenset()
    with pytest.raises(LocalProtocolError):
        server.result(7, data=None)
    with pytest.raises(LocalProtocolError):
        server.result(99)
    server.receive_data(frame(call(8)), 0.0)
    [result] = server_messages(server.result_error(8, ErrorCode.CONFLICT, "stale", {"rev": 4}))
    assert result == Result(8, False, error=ErrorInfo("conflict", "stale", {"rev": 4}))


def test_pending_calls_are_bounded() -> None:
    server = open_server(Limits(max_pending_calls=2))
    events = server.receive_data(frame(call(1), call(2), call(3)), 0.0)
    assert [type(e) for e in events] == [CallReceived, CallReceived, ProtocolViolation]
    violation = events[2]
    assert isinstance(violation, ProtocolViolation)
    assert violation.close_code is None
    [answer] = server_messages(violation.reply)
    assert answer == Result(3, False, error=ErrorInfo("too_many_pending", violation.error.message))
    assert server.pending_calls == {1, 2}
    server.result(1)
    [event] = server.receive_data(frame(call(3)), 0.0)
    assert isinstance(event, CallReceived)


def test_duplicate_ref_closes() -> None:
    server = open_server()
    server.receive_data(frame(call(1)), 0.0)
    violation = only_violation(server.receive_data(frame(call(1)), 0.0))
    assert violation.error.code is ErrorCode.DUPLICATE_REF
    assert violation.close_code == 1002
    # also when the duplicate is malformed
    server = open_server()
    server.receive_data(frame(call(1)), 0.0)
    violation = only_violation(server.receive_data(frame(call(1, method=3)), 0.0))
    assert violation.error.code is ErrorCode.DUPLICATE_REF


def test_bad_messages_get_an_answer_and_the_connection_stays_open() -> None:
    server = open_server()
    events = server.receive_data(
        frame(call(4, method=3), {"type": "nope"}, join("r", since="x"), {"type": "leave"}, PING),
        0.0,
    )
    assert [type(e) for e in events] == [ProtocolViolation] * 4 + [PingReceived]
    answers = [server_messages(e.reply)[0] for e in events[:4]]  # type: ignore[union-attr]
    assert isinstance(answers[0], Result) and answers[0].ref == 4
    assert answers[0].error is not None and answers[0].error.code == "invalid_field"
    assert isinstance(answers[1], Error) and answers[1].code == "unknown_type"
    assert answers[2] == Left("r", "invalid_field", "join: expected a map, got a string @ $.since")
    assert isinstance(answers[3], Error) and answers[3].code == "invalid_field"
    assert all(e.close_code is None for e in events[:4])  # type: ignore[union-attr]
    assert server.state is ServerState.OPEN
    assert server.pending_calls == frozenset()


def test_a_fatal_message_stops_the_batch() -> None:
    server = open_server()
    events = server.receive_data(frame(PING, HELLO, PING), 0.0)
    assert [type(e) for e in events] == [PingReceived, ProtocolViolation]
    assert server.state is ServerState.CLOSING


def test_rooms() -> None:
    server = open_server(Limits(max_subscriptions=2))
    [event] = server.receive_data(frame(join("board:1")), 0.0)
    assert event == JoinRequested(Join("board:1"), rejoin=False)
    assert server.pending_joins == {"board:1"}
    assert server_messages(server.joined("board:1", epoch="e", seq=3, recovered=False)) == [
        Joined("board:1", "e", 3, False)
    ]
    assert server.subscriptions == {"board:1"} and server.is_subscribed("board:1")
    [event] = server.receive_data(frame(join("board:1", since={"epoch": "e", "seq": 3})), 0.0)
    assert isinstance(event, JoinRequested) and event.rejoin
    server.receive_data(frame(join("board:2")), 0.0)
    violation = only_violation(server.receive_data(frame(join("board:3")), 0.0))
    assert violation.error.code is ErrorCode.TOO_MANY_SUBSCRIPTIONS
    assert server_messages(violation.reply) == [
        Left("board:3", "too_many_subscriptions", "more than 2 rooms")
    ]
    # refusing a join frees its slot
    server.left("board:2", ErrorCode.FORBIDDEN)
    [event] = server.receive_data(frame(join("board:3")), 0.0)
    assert isinstance(event, JoinRequested)
    [event] = server.receive_data(frame({"type": "leave", "room": "board:1"}), 0.0)
    assert event == LeaveRequested("board:1")
    assert server_messages(server.left("board:1")) == [Left("board:1", "left")]
    assert server_messages(server.left("board:1")) == [Left("board:1", "left")]
    assert server.subscriptions == frozenset()
    server.joined("user:u", epoch="e", seq=0, recovered=False)  # the server's own choice
    with pytest.raises(LocalProtocolError):
        server.joined("user:v", epoch="e", seq=0, recovered=False)


def test_sends_are_atomic() -> None:
    server = open_server()
    server.receive_data(frame(call(1)), 0.0)
    with pytest.raises(LocalProtocolError):
        server.send([Result(1, True), Result(2, True)])
    assert server.pending_calls == {1}
    with pytest.raises(LocalProtocolError):
        server.send([Result(1, True, data={"bad": {1, 2}})])
    assert server.pending_calls == {1}
    with pytest.raises(LocalProtocolError):
        server.send(Welcome("k", "u", 1, {}))
    assert server.state is ServerState.OPEN


def test_rate_limit_is_a_function_of_now() -> None:
    limits = Limits(rate_per_s=10, rate_burst=3, max_refused=5)
    server = open_server(limits)
    events = server.receive_data(frame(PING, PING, PING, PING, call(1), join("r")), 10.0)
    assert [type(e) for e in events[:3]] == [PingReceived] * 3
    answers = [server_messages(e.reply)[0] for e in events[3:]]  # type: ignore[union-attr]
    assert isinstance(answers[0], Error) and answers[0].code == "rate_limited"
    assert isinstance(answers[1], Result) and answers[1].ref == 1 and not answers[1].ok
    # the refused call is told when a token is back: 1 token at 10/s
    assert answers[1].error is not None and answers[1].error.data == {"retry_after_ms": 100}
    assert answers[2] == Left("r", "rate_limited", "more than 10 messages per second")
    assert server.retry_after_ms() == 100
    assert server.state is ServerState.OPEN
    # 0.04 s later, 0.4 of a token: 60 ms more (rounded up to the millisecond)
    [refused] = server.receive_data(frame(call(2)), 10.04)
    reply = server_messages(refused.reply)[0]  # type: ignore[union-attr]
    assert isinstance(reply, Result) and reply.error is not None
    assert reply.error.data == {"retry_after_ms": 60}
    # 0.125 s later one token is back
    [event] = server.receive_data(frame(PING), 10.125)
    assert isinstance(event, PingReceived)
    # time going backwards gives nothing back
    [event] = server.receive_data(frame(PING), 5.0)
    assert isinstance(event, ProtocolViolation)
    assert server.statistics().rate_limited == 5


def test_flooding_closes() -> None:
    server = open_server(Limits(rate_per_s=1, rate_burst=1, max_refused=3))
    events = server.receive_data(frame(*[PING] * 10), 5.0)
    assert [type(e) for e in events] == [PingReceived] + [ProtocolViolation] * 4
    last = events[-1]
    assert isinstance(last, ProtocolViolation)
    assert last.error.code is ErrorCode.FLOOD and last.close_code == 1008


def test_a_flood_that_gets_a_message_through_now_and_then_still_closes() -> None:
    # one frame per message, each a little later: the bucket refills by a
    # fraction of a token per frame, and one message in 5 gets through
    server = open_server(Limits(rate_per_s=100, rate_burst=10, max_refused=20))
    now, closed = 0.0, None
    for _ in range(500):
        now += 0.002
        for event in server.receive_data(frame(PING), now):
            if isinstance(event, ProtocolViolation) and event.close_code is not None:
                closed = event
        if closed is not None:
            break
    assert closed is not None and closed.error.code is ErrorCode.FLOOD
    assert server.statistics().rate_limited == 21


def test_a_client_that_slows_down_is_forgiven() -> None:
    server = open_server(Limits(rate_per_s=10, rate_burst=4, max_refused=3))
    # (the hello took a token) 3 through, 2 refused
    events = server.receive_data(frame(*[PING] * 5), 0.0)
    assert [type(e) for e in events] == [PingReceived] * 3 + [ProtocolViolation] * 2
    # quiet for 0.3 s: 3 tokens back, the bucket is over half full again
    events = server.receive_data(frame(PING, PING, PING, PING, PING, PING), 0.3)
    assert [type(e) for e in events] == [PingReceived] * 3 + [ProtocolViolation] * 3
    assert server.state is ServerState.OPEN  # 3 in a row since, not 5


def test_presence_over_its_rate_is_dropped_silently() -> None:
    server = open_server(Limits(presence_rate_per_s=30, presence_burst=2))
    update = {"type": "presence", "cursor": {"x": 1, "y": 2}}
    events = server.receive_data(frame(update, update, update, PING), 0.0)
    assert [type(e) for e in events] == [PresenceReceived, PresenceReceived, PingReceived]
    assert server.statistics().presence_dropped == 1
    assert len(server.receive_data(frame(update), 1 / 30)) == 1


@pytest.mark.parametrize("field", ["board", "view", "follow"])
def test_a_presence_name_longer_than_a_room_name_is_refused(field: str) -> None:
    # (a 500 KB view went to every member of the board, at each change)
    server = open_server()
    ok = {"type": "presence", field: "v" * 256}
    too_long = {"type": "presence", field: "v" * 257}
    events = server.receive_data(frame(ok, too_long, PING), 0.0)
    assert [type(e) for e in events] == [PresenceReceived, ProtocolViolation, PingReceived]
    violation = events[1]
    assert isinstance(violation, ProtocolViolation) and violation.close_code is None
    assert violation.error.code is ErrorCode.INVALID_FIELD
    assert f"{field} must have at most 256 characters" in violation.error.message
    assert server.state is ServerState.OPEN


def test_a_refused_rejoin_drops_the_subscription() -> None:
    server = open_server(Limits(rate_per_s=1, rate_burst=1))
    server.receive_data(frame(join("board:1")), 0.0)
    server.joined("board:1", epoch="e", seq=0, recovered=False)
    events = server.receive_data(frame(join("board:1", since={"epoch": "e", "seq": 0})), 0.0)
    assert [type(e) for e in events] == [ProtocolViolation, SubscriptionDropped]
    assert events[1] == SubscriptionDropped("board:1", "rate_limited")
    assert server.subscriptions == frozenset()


def test_cbor_replies_are_binary() -> None:
    server = ServerConnection(codec=Codec.CBOR)
    violation = only_violation(server.receive_data("text", 0.0))
    assert violation.error.code is ErrorCode.WRONG_FRAME_KIND
    assert violation.close_code == 1003
    assert isinstance(violation.reply, bytes)


def test_statistics() -> None:
    server = open_server()
    server.receive_data(frame(PING, call(1), {"type": "x"}), 0.0)
    stats = server.statistics()
    assert (stats.frames_received, stats.messages_received, stats.violations) == (2, 4, 1)
    assert stats.pending_calls == 1


def test_presence_rate_limit_drops_only_cursor_moves() -> None:
    """Cursor moves over the presence rate are dropped (the next replaces
    them); any other presence change is never dropped for that rate."""
    from protocols import Codec, Hello, Limits, PresenceReceived, ServerConnection, encode

    limits = Limits(presence_rate_per_s=1, presence_burst=1)
    conn = ServerConnection(codec=Codec.JSON, limits=limits)
    conn.receive_data(encode(Codec.JSON, Hello(protocol=1, token="t")), 0.0)
    conn.welcome(connection_id="c", user_id="u", heartbeat_ms=15000)
    moves = [{"type": "presence", "board": "b", "cursor": {"x": i, "y": 0}} for i in range(5)]
    leave = {"type": "presence", "board": ""}
    import orjson

    got = conn.receive_data(orjson.dumps([*moves, leave]).decode(), 0.0)
    presence = [e for e in got if isinstance(e, PresenceReceived)]
    assert len(presence) == 2  # one move (the burst), then the leave, never dropped
    assert presence[-1].update.board == ""


def test_auth_is_answered_like_a_call() -> None:
    server = open_server()
    [event] = server.receive_data(frame({"type": "auth", "ref": 3, "token": "t2"}), 0.0)
    assert isinstance(event, AuthReceived)
    assert event.auth == Auth(3, "t2")
    assert server.pending_calls == {3}
    # its ref is taken like a call's
    violation = only_violation(server.receive_data(frame(call(3)), 0.0))
    assert violation.error.code is ErrorCode.DUPLICATE_REF
    server = open_server()
    server.receive_data(frame({"type": "auth", "ref": 3, "token": "t2"}), 0.0)
    [answer] = server_messages(server.result_error(3, ErrorCode.NOT_AUTHENTICATED, "invalid"))
    assert answer == Result(3, False, error=ErrorInfo("not_authenticated", "invalid"))
    assert server.state is ServerState.OPEN  # a refused auth does not close
    # a malformed auth is answered with an error result, the connection stays open
    [violation] = server.receive_data(frame({"type": "auth", "ref": 4, "token": 5}), 0.0)
    assert isinstance(violation, ProtocolViolation) and violation.close_code is None
    assert server_messages(violation.reply)[0].ref == 4


def test_auth_before_welcome_closes() -> None:
    server = ServerConnection(codec=Codec.JSON)
    violation = only_violation(
        server.receive_data(frame({"type": "auth", "ref": 1, "token": "t"}), 0.0)
    )
    assert violation.error.code is ErrorCode.NOT_AUTHENTICATED and violation.close_code == 4001


def test_welcome_says_when_the_token_expires_and_expiry_closes_with_4002() -> None:
    server = ServerConnection(codec=Codec.JSON)
    server.receive_data(frame(HELLO), 0.0)
    [welcome] = server_messages(
        server.welcome(connection_id="k", user_id="u", heartbeat_ms=1, expires_at=1234)
    )
    assert welcome.expires_at == 1234
    [error] = server_messages(server.close(ErrorCode.TOKEN_EXPIRED, "the token expired"))
    assert error == Error("token_expired", "the token expired")
    assert server.close_code == CloseCode.TOKEN_EXPIRED == 4002
