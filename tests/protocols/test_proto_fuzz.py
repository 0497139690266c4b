"""Fuzz: whatever arrives, the machines answer with events and protocol errors
only, never another exception, and every frame they send back is valid."""

from __future__ import annotations

from typing import Any

import cbor2
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st
from proto_strategies import client_messages, server_messages

from protocols import (
    CLIENT_MESSAGE_TYPES,
    SERVER_MESSAGE_TYPES,
    ClientConnection,
    ClientState,
    Codec,
    Hello,
    Limits,
    ProtocolError,
    ProtocolViolation,
    ServerConnection,
    ServerState,
    Welcome,
    decode_client_frame,
    decode_server_frame,
    encode,
    to_wire,
)

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
LIMITS = Limits(max_frame_bytes=4096, max_depth=8, max_batch=8)

# Values a CBOR encoder can produce, inside and outside the protocol's data model.
CBOR_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.just(cbor2.undefined),
    st.integers(0, 255).filter(lambda n: not 20 <= n <= 31).map(cbor2.CBORSimpleValue),
)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
FIELD_NAMES = st.sampled_from(
    ["type", "ref", "room", "since", "seq", "epoch", "data", "t", "protocol", "token", "ok"]
) | st.text(max_size=4)
TYPE_NAMES = st.sampled_from(sorted({*CLIENT_MESSAGE_TYPES, *SERVER_MESSAGE_TYPES, "x", ""}))


def _nested(scalars: st.SearchStrategy[Any], *, cbor: bool) -> st.SearchStrategy[Any]:
    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        maps = st.dictionaries(FIELD_NAMES, children, max_size=5)
        typed = st.builds(lambda t, rest: {"type": t, **rest}, TYPE_NAMES, maps)
        options = [st.lists(children, max_size=5), maps, typed]
        if cbor:
            options.append(st.builds(cbor2.CBORTag, st.integers(0, 2**16), children))
        return st.one_of(options)

    return st.recursive(scalars, extend, max_leaves=25)


def _json_text(value: Any) -> str | None:
    try:
        return orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        return None


def _cbor_bytes(value: Any) -> bytes | None:
    try:
        return cbor2.dumps(value)
    except Exception:
        return None


json_frames = _nested(JSON_SCALARS, cbor=False).map(_json_text).filter(lambda f: f is not None)
cbor_frames = _nested(CBOR_SCALARS, cbor=True).map(_cbor_bytes).filter(lambda f: f is not None)


@st.composite
def mutated_frames(draw: st.DrawFn, codec: Codec) -> Any:
    """A valid frame of real messages, then damaged: bytes flipped, cut, or grown."""
    messages = draw(st.lists(client_messages | server_messages, min_size=1, max_size=3))
    frame = encode(codec, messages)
    raw = bytearray(frame.encode() if isinstance(frame, str) else frame)
    for _ in range(draw(st.integers(1, 4))):
        if not raw:
            break
        at = draw(st.integers(0, len(raw) - 1))
        action = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        if action == "flip":
            raw[at] = draw(st.integers(0, 255))
        elif action == "cut":
            del raw[at]
        elif action == "insert":
            raw.insert(at, draw(st.integers(0, 255)))
        else:
            del raw[at:]
    if codec is Codec.JSON:
        return bytes(raw).decode("utf-8", "surrogateescape")
    return bytes(raw)


@st.composite
def structured_frames(draw: st.DrawFn, codec: Codec) -> Any:
    """Real messages whose maps lose a field or get a random value in one."""
    messages = draw(st.lists(client_messages | server_messages, min_size=1, max_size=3))
    maps = [to_wire(message) for message in messages]
    for item in maps:
        if draw(st.booleans()):
            key = draw(st.sampled_from(sorted(item)))
            if draw(st.booleans()):
                del item[key]
            else:
                item[key] = draw(_nested(JSON_SCALARS, cbor=False))
    value: Any = maps[0] if len(maps) == 1 and draw(st.booleans()) else maps
    if codec is Codec.JSON:
        return _json_text(value) or "{}"
    return _cbor_bytes(value) or b"\xa0"


def frames_for(codec: Codec) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.binary(max_size=64),
        st.text(max_size=64),
        st.none(),
        json_frames if codec is Codec.JSON else cbor_frames,
        mutated_frames(codec),
        structured_frames(codec),
        structured_frames(codec),
    )


CODEC_AND_FRAMES = st.sampled_from(Codec).flatmap(
    lambda codec: st.tuples(st.just(codec), st.lists(frames_for(codec), min_size=1, max_size=4))
)


def note(label: str) -> None:
    hypothesis_event(label)


def _check_server(server: ServerConnection, frames: list[Any]) -> None:
    for i, data in enumerate(frames):
        before = server.state
        events = server.receive_data(data, float(i))
        for position, event in enumerate(events):
            note(type(event).__name__)
            if isinstance(event, ProtocolViolation):
                note(f"violation {event.error.code}")
                assert isinstance(event.error, ProtocolError)
                if event.reply is not None:
                    decode_server_frame(server.codec, event.reply)  # our answers are valid
                if event.close_code is not None:
                    assert position == len(events) - 1
                    assert server.state is ServerState.CLOSING
        if before in (ServerState.CLOSING, ServerState.CLOSED):
            assert events == []


def _open_server(codec: Codec) -> ServerConnection:
    server = ServerConnection(codec=codec, limits=LIMITS)
    server.receive_data(encode(codec, Hello(1)), 0.0)
    server.welcome(connection_id="k", user_id="u", heartbeat_ms=1000)
    return server


@FUZZ
@given(case=CODEC_AND_FRAMES)
def test_server_before_the_handshake(case: tuple[Codec, list[Any]]) -> None:
    codec, frames = case
    _check_server(ServerConnection(codec=codec, limits=LIMITS), frames)


@FUZZ
@given(case=CODEC_AND_FRAMES)
def test_server_once_open(case: tuple[Codec, list[Any]]) -> None:
    codec, frames = case
    _check_server(_open_server(codec), frames)


@FUZZ
@given(case=CODEC_AND_FRAMES)
def test_client_once_open(case: tuple[Codec, list[Any]]) -> None:
    codec, frames = case
    client = ClientConnection(codec=codec, limits=LIMITS)
    client.hello("t")
    client.receive_data(encode(codec, Welcome("k", "u", 1000, {})), 0.0)
    client.join("session:1")
    for i, data in enumerate(frames):
        before = client.state
        events = client.receive_data(data, float(i))
        for position, event in enumerate(events):
            if isinstance(event, ProtocolViolation) and event.close_code is not None:
                assert position == len(events) - 1
                assert client.state is ClientState.CLOSING
        if before is ClientState.CLOSING:
            assert events == []


@FUZZ
@given(case=CODEC_AND_FRAMES)
def test_decoders_raise_protocol_errors_only(case: tuple[Codec, list[Any]]) -> None:
    codec, [data, *_] = case
    for decode in (decode_client_frame, decode_server_frame):
        try:
            messages = decode(codec, data, LIMITS)
        except ProtocolError:
            continue
        # what decodes re-encodes and decodes to the same messages, in both codecs
        for other in Codec:
            assert decode(other, encode(other, messages), LIMITS) == messages
