"""Messages: round trips in both codecs, strictness, omitted fields, direction."""

from __future__ import annotations

from typing import Any

import cbor2
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from proto_strategies import CLIENT_MESSAGES, SERVER_MESSAGES, client_messages, server_messages

import protocols
from protocols import (
    CLIENT_MESSAGE_TYPES,
    SERVER_MESSAGE_TYPES,
    Call,
    Codec,
    Cursor,
    ErrorCode,
    ErrorInfo,
    Event,
    Hello,
    Join,
    LocalProtocolError,
    Message,
    Ping,
    Presence,
    PresenceUpdate,
    ProtocolError,
    Result,
    Since,
    Viewport,
    decode_client_frame,
    decode_server_frame,
    encode,
    encode_batch,
    from_wire,
    negotiate,
    prepare_batch,
    to_wire,
)


def _decode(codec: Codec, frame: str | bytes, *, server: bool) -> list[Any]:
    if server:
        return list(decode_server_frame(codec, frame))
    return list(decode_client_frame(codec, frame))


def test_every_message_class_has_a_strategy() -> None:
    assert set(CLIENT_MESSAGES) == set(CLIENT_MESSAGE_TYPES.values())
    assert set(SERVER_MESSAGES) == set(SERVER_MESSAGE_TYPES.values())


@settings(max_examples=150)
@given(message=client_messages, codec=st.sampled_from(Codec))
def test_client_messages_round_trip(message: Message, codec: Codec) -> None:
    frame = encode(codec, message)
    assert isinstance(frame, bytes) == codec.binary
    assert decode_client_frame(codec, frame) == [message]


@settings(max_examples=150)
@given(message=server_messages, codec=st.sampled_from(Codec))
def test_server_messages_round_trip(message: Message, codec: Codec) -> None:
    frame = encode(codec, message)
    assert decode_server_frame(codec, frame) == [message]


@settings(max_examples=60)
@given(
    messages=st.lists(server_messages, min_size=1, max_size=5),
)
def test_both_codecs_carry_the_same_maps_and_messages(messages: list[Message]) -> None:
    as_json = encode(Codec.JSON, messages)
    as_cbor = encode(Codec.CBOR, messages)
    assert orjson.loads(as_json) == cbor2.loads(as_cbor) == [to_wire(m) for m in messages]
    assert decode_server_frame(Codec.JSON, as_json) == decode_server_frame(Codec.CBOR, as_cbor)
    assert decode_server_frame(Codec.JSON, as_json) == messages


@settings(max_examples=40)
@given(messages=st.lists(client_messages, min_size=1, max_size=5))
def test_batches_and_prepared_batches(messages: list[Message]) -> None:
    for codec in Codec:
        frame = encode_batch(codec, messages)
        assert frame == encode(codec, messages)
        assert prepare_batch(messages).frame(codec) == frame
        assert decode_client_frame(codec, frame) == messages


def test_prepared_batch_encodes_once_per_codec() -> None:
    batch = prepare_batch([Event("board:1", 1, "board:updated", data={"a": 1})])
    assert batch.frame(Codec.JSON) is batch.frame(Codec.JSON)
    assert batch.frame(Codec.CBOR) is batch.frame(Codec.CBOR)
    assert batch.messages == (Event("board:1", 1, "board:updated", data={"a": 1}),)


def test_type_comes_first_and_none_fields_are_omitted() -> None:
    call = Call(7, "tasks", "create", data={"title": "x"})
    assert list(to_wire(call)) == ["type", "ref", "service", "method", "data"]
    assert encode(Codec.JSON, Ping(5)) == '{"type":"ping","t":5}'
    assert encode(Codec.JSON, PresenceUpdate(typing=False)) == '{"type":"presence","typing":false}'
    # Falsy values that are not None are kept.
    assert to_wire(Result(1, True, data=0)) == {"type": "result", "ref": 1, "ok": True, "data": 0}


def test_absent_and_null_optional_fields_decode_the_same() -> None:
    with_null = '{"type":"call","ref":1,"service":"s","method":"get","id":null,"data":null}'
    without = '{"type":"call","ref":1,"service":"s","method":"get"}'
    assert decode_client_frame(Codec.JSON, with_null) == decode_client_frame(Codec.JSON, without)


def test_unknown_fields_are_ignored() -> None:
    frame = '{"type":"ping","t":1,"added_in_v1_1":{"x":[1]}}'
    assert decode_client_frame(Codec.JSON, frame) == [Ping(1)]


def test_presence_is_decoded_by_direction() -> None:
    frame = encode(Codec.JSON, Presence("b1", users=[{"user_id": "u"}], cursors=[]))
    assert decode_server_frame(Codec.JSON, frame) == [
        Presence("b1", users=[{"user_id": "u"}], cursors=[])
    ]
    assert decode_client_frame(Codec.JSON, frame) == [PresenceUpdate(board="b1")]
    update = PresenceUpdate(
        cursor=Cursor(1, 2), viewport=Viewport(0, 0, 1920, 1080, 1), follow="u2"
    )
    assert from_wire(to_wire(update), server=False) == update
    assert from_wire(to_wire(Presence("b1")), server=True) == Presence("b1")


def test_server_types_are_unknown_to_the_server_and_vice_versa() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_client_frame(Codec.JSON, '{"type":"welcome"}')
    assert info.value.code is ErrorCode.UNKNOWN_TYPE
    with pytest.raises(ProtocolError) as info:
        decode_server_frame(Codec.JSON, '{"type":"hello","protocol":1}')
    assert info.value.code is ErrorCode.UNKNOWN_TYPE


@pytest.mark.parametrize("codec", list(Codec))
@pytest.mark.parametrize(
    ("item", "path"),
    [
        ({"type": "call", "ref": "7", "service": "s", "method": "m"}, "$.ref"),
        ({"type": "call", "ref": 7.0, "service": "s", "method": "m"}, "$.ref"),
        ({"type": "call", "ref": 1.9, "service": "s", "method": "m"}, "$.ref"),
        ({"type": "call", "ref": True, "service": "s", "method": "m"}, "$.ref"),
        ({"type": "call", "ref": 7, "service": 123, "method": "m"}, "$.service"),
        ({"type": "call", "ref": 7, "service": "s", "method": "m", "query": [1]}, "$.query"),
        ({"type": "call", "ref": 7, "service": "s", "method": "m", "base_rev": "3"}, "$.base_rev"),
        ({"type": "call", "ref": -1, "service": "s", "method": "m"}, "ref"),
        ({"type": "call", "ref": 2**53, "service": "s", "method": "m"}, "ref"),
        ({"type": "call", "ref": 7, "service": "s"}, "$.method"),
        ({"type": "hello", "protocol": "1"}, "$.protocol"),
        ({"type": "join", "room": "r", "since": {"epoch": "e"}}, "$.since.seq"),
        ({"type": "join", "room": "r", "since": {"epoch": "e", "seq": -1}}, "seq"),
        ({"type": "join", "room": "r", "since": "e:4"}, "$.since"),
        ({"type": "join", "room": ""}, "room"),
        ({"type": "join", "room": "x" * 257}, "room"),
        ({"type": "presence", "cursor": {"x": "1", "y": 2}}, "$.cursor.x"),
        ({"type": "presence", "cursor": {"x": True, "y": 2}}, "$.cursor.x"),
        ({"type": "presence", "typing": 1}, "$.typing"),
        ({"type": "ping", "t": None}, "$.t"),
        ({"type": "leave"}, "$.room"),
    ],
)
def test_strict_fields_refuse_what_cattrs_would_convert(
    codec: Codec, item: dict[str, Any], path: str
) -> None:
    frame = orjson.dumps(item).decode() if codec is Codec.JSON else cbor2.dumps(item)
    with pytest.raises(ProtocolError) as info:
        decode_client_frame(codec, frame)
    assert info.value.code is ErrorCode.INVALID_FIELD
    assert info.value.close_code is None
    assert path in info.value.message


def test_ints_are_accepted_where_floats_are_expected() -> None:
    [update] = decode_client_frame(Codec.JSON, '{"type":"presence","cursor":{"x":1,"y":2.5}}')
    assert isinstance(update, PresenceUpdate) and update.cursor == Cursor(1.0, 2.5)
    assert isinstance(update.cursor.x, float)


@pytest.mark.parametrize(
    ("item", "code"),
    [
        ({"t": 1}, ErrorCode.INVALID_FIELD),
        ({"type": 5}, ErrorCode.INVALID_FIELD),
        ({"type": "subscribe"}, ErrorCode.UNKNOWN_TYPE),
        ({"type": "Ping", "t": 1}, ErrorCode.UNKNOWN_TYPE),
    ],
)
def test_missing_or_unknown_type(item: dict[str, Any], code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_client_frame(Codec.JSON, orjson.dumps(item).decode())
    assert info.value.code is code


def test_invalid_call_carries_its_ref_for_an_error_result() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_client_frame(Codec.JSON, '{"type":"call","ref":9,"service":"s","method":4}')
    assert info.value.ref == 9
    with pytest.raises(ProtocolError) as info:
        decode_client_frame(Codec.JSON, '{"type":"join","ref":9,"room":5}')
    assert info.value.ref is None


def test_message_invariants() -> None:
    with pytest.raises(ValueError, match="error exactly when ok is false"):
        Result(1, True, error=ErrorInfo("conflict", "x"))
    with pytest.raises(ValueError, match="error exactly when ok is false"):
        Result(1, False)
    with pytest.raises(ValueError, match="last_seq"):
        Event("r", 5, "e", last_seq=4)
    assert Event("r", 5, "e").end_seq == 5
    assert Event("r", 5, "e", last_seq=9).end_seq == 9
    with pytest.raises(ValueError, match="seq"):
        Since("e", -1)


def test_error_codes_as_strings_encode_plainly() -> None:
    frame = encode(Codec.JSON, Result(1, False, error=ErrorInfo(ErrorCode.CONFLICT, "stale")))
    assert '"code":"conflict"' in str(frame)


def test_encode_refuses_data_outside_the_model() -> None:
    for data in (float("nan"), float("inf"), {1: "x"}, {"s": {1, 2}}, b"bytes", 2**64, object()):
        with pytest.raises(LocalProtocolError):
            encode(Codec.JSON, Call(1, "s", "m", data=data))
        with pytest.raises(LocalProtocolError):
            encode(Codec.CBOR, Call(1, "s", "m", data=data))
    deep: Any = 0
    for _ in range(70):
        deep = [deep]
    with pytest.raises(LocalProtocolError) as info:
        encode(Codec.CBOR, Call(1, "s", "m", data=deep))
    assert info.value.code is ErrorCode.TOO_DEEP
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(LocalProtocolError):
        encode(Codec.JSON, Call(1, "s", "m", data=cyclic))
    with pytest.raises(LocalProtocolError):
        encode(Codec.JSON, [])
    with pytest.raises(LocalProtocolError):
        to_wire({"type": "ping"})  # type: ignore[arg-type]


def test_encode_accepts_subclasses_of_the_model_types() -> None:
    frame = encode(Codec.CBOR, Call(1, "s", ErrorCode.CONFLICT, data={"k": ErrorCode.FORBIDDEN}))
    assert decode_client_frame(Codec.CBOR, frame) == [
        Call(1, "s", "conflict", data={"k": "forbidden"})
    ]


def test_negotiate_follows_the_clients_order() -> None:
    assert negotiate(["agor.v1.cbor", "agor.v1.json"]) is Codec.CBOR
    assert negotiate(["x", "agor.v1.json"]) is Codec.JSON
    assert negotiate([]) is None
    assert negotiate(["agor.v2.json", "json"]) is None
    assert Codec.JSON.subprotocol == "agor.v1.json" and not Codec.JSON.binary
    assert Codec.CBOR.subprotocol == "agor.v1.cbor" and Codec.CBOR.binary


def test_hello_and_join_shapes_from_the_issue() -> None:
    frame = (
        '[{"type":"hello","protocol":1,"token":"tok","client_id":"c"},'
        '{"type":"join","room":"session:1","since":{"epoch":"e","seq":41}}]'
    )
    assert decode_client_frame(Codec.JSON, frame) == [
        Hello(1, "tok", "c"),
        Join("session:1", Since("e", 41)),
    ]


def test_public_names() -> None:
    exported = {name for name in dir(protocols) if not name.startswith("_")}
    required = {
        "Hello", "Call", "Join", "Since", "Leave", "PresenceUpdate", "Ping", "Welcome",
        "Result", "ErrorInfo", "Joined", "Event", "Presence", "Lagged", "Left", "Error",
        "Pong", "Codec", "negotiate", "encode", "encode_batch", "decode_client_frame",
        "decode_server_frame", "Limits", "ProtocolError", "LocalProtocolError",
        "ServerConnection", "ClientConnection", "ProtocolViolation", "HelloReceived",
        "CallReceived", "JoinRequested", "LeaveRequested", "PresenceReceived",
        "PingReceived", "EventApplied", "ReloadRequired", "RoomTrack", "Heartbeat",
        "backoff_s", "ErrorCode", "CLOSE_CODES",
    }  # fmt: skip
    assert required <= exported
    for name in exported - {"annotations"}:
        value = getattr(protocols, name)
        module = getattr(value, "__module__", "protocols")
        assert module.startswith("protocols") or module in {"typing", "types", "builtins"}, name
