"""Frame validation: kinds, sizes, depth, UTF-8, JSON and CBOR syntax, data model."""

from __future__ import annotations

from typing import Any

import cbor2
import orjson
import pytest

from protocols import (
    CLIENT_LIMITS,
    DEFAULT_LIMITS,
    CloseCode,
    Codec,
    ErrorCode,
    Limits,
    Ping,
    ProtocolError,
    RawFrame,
    decode_client_frame,
    decode_server_frame,
    encode,
)

PING_JSON = '{"type":"ping","t":1}'
PING_CBOR = cbor2.dumps({"type": "ping", "t": 1})


def code_of(codec: Codec, data: RawFrame, limits: Limits = DEFAULT_LIMITS) -> ErrorCode:
    with pytest.raises(ProtocolError) as info:
        decode_client_frame(codec, data, limits)
    return info.value.code


def test_frame_kind_must_match_the_codec() -> None:
    assert code_of(Codec.JSON, PING_JSON.encode()) is ErrorCode.WRONG_FRAME_KIND
    assert code_of(Codec.JSON, None) is ErrorCode.WRONG_FRAME_KIND
    assert code_of(Codec.CBOR, PING_JSON) is ErrorCode.WRONG_FRAME_KIND
    assert code_of(Codec.CBOR, 5) is ErrorCode.WRONG_FRAME_KIND  # type: ignore[arg-type]
    # quart hands an empty binary frame over as None
    assert code_of(Codec.CBOR, None) is ErrorCode.BAD_CBOR
    assert code_of(Codec.CBOR, b"") is ErrorCode.BAD_CBOR
    assert decode_client_frame(Codec.CBOR, bytearray(PING_CBOR)) == [Ping(1)]
    assert decode_client_frame(Codec.CBOR, memoryview(PING_CBOR)) == [Ping(1)]


def test_size_is_checked_before_parsing() -> None:
    limits = Limits(max_frame_bytes=100)
    garbage = "{" * 101  # invalid JSON, but too large first
    assert code_of(Codec.JSON, garbage, limits) is ErrorCode.FRAME_TOO_LARGE
    assert code_of(Codec.CBOR, b"\xff" * 101, limits) is ErrorCode.FRAME_TOO_LARGE
    assert code_of(Codec.JSON, '{"type":"ping","t":1,"p":"' + "x" * 80 + '"}', limits) is (
        ErrorCode.FRAME_TOO_LARGE
    )
    # 30 characters of 4 UTF-8 bytes each: 120 bytes
    emoji = '{"type":"ping","t":1,"p":"' + "\U0001f600" * 30 + '"}'
    assert len(emoji) < 100
    assert code_of(Codec.JSON, emoji, limits) is ErrorCode.FRAME_TOO_LARGE
    exactly = '{"type":"ping","t":1,"p":"' + "x" * (100 - 28) + '"}'
    assert len(exactly.encode()) == 100
    assert decode_client_frame(Codec.JSON, exactly, limits) == [Ping(1)]


def nested_json(depth: int) -> str:
    return '{"type":"ping","t":1,"d":' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


def nested_cbor(depth: int) -> bytes:
    return (
        b"\xa3"
        + cbor2.dumps("type")
        + cbor2.dumps("ping")
        + cbor2.dumps("t")
        + b"\x01"
        + (cbor2.dumps("d") + b"\x81" * (depth - 2) + b"\x80")
    )


@pytest.mark.parametrize("codec", list(Codec))
def test_depth_limit(codec: Codec) -> None:
    make = nested_json if codec is Codec.JSON else nested_cbor
    limits = Limits(max_depth=8)
    assert decode_client_frame(codec, make(8), limits) == [Ping(1)]
    assert code_of(codec, make(9), limits) is ErrorCode.TOO_DEEP
    # Far beyond every parser's own limit: still a clean error, no recursion.
    assert code_of(codec, make(100_000), Limits(max_frame_bytes=1 << 20)) is ErrorCode.TOO_DEEP


def test_batch_counts_as_one_level() -> None:
    limits = Limits(max_depth=2)
    assert decode_client_frame(Codec.JSON, f"[{PING_JSON}]", limits) == [Ping(1)]
    frame = '[{"type":"ping","t":1,"d":[]}]'
    assert code_of(Codec.JSON, frame, limits) is ErrorCode.TOO_DEEP


@pytest.mark.parametrize("codec", list(Codec))
def test_batch_shape_and_size(codec: Codec) -> None:
    def frame(value: Any) -> RawFrame:
        return orjson.dumps(value).decode() if codec is Codec.JSON else cbor2.dumps(value)

    ping = {"type": "ping", "t": 1}
    assert decode_client_frame(codec, frame([ping] * 3), Limits(max_batch=3)) == [Ping(1)] * 3
    assert code_of(codec, frame([ping] * 4), Limits(max_batch=3)) is ErrorCode.BATCH_TOO_LARGE
    assert code_of(codec, frame([]), Limits()) is ErrorCode.BAD_FRAME
    assert code_of(codec, frame([ping, 1]), Limits()) is ErrorCode.BAD_FRAME
    assert code_of(codec, frame([[ping]]), Limits()) is ErrorCode.BAD_FRAME
    for scalar in (1, "ping", None, True, 1.5):
        assert code_of(codec, frame(scalar), Limits()) is ErrorCode.BAD_FRAME


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        '{"type":"ping","t":1}}',
        '{"type":"ping","t":1} x',
        "{'type':'ping'}",
        '{"type":"ping","t":NaN}',
        '{"type":"ping","t":1e400}',
        "\ufeff" + PING_JSON,
        '{"type":"ping",}',
    ],
)
def test_invalid_json(text: str) -> None:
    assert code_of(Codec.JSON, text) is ErrorCode.BAD_JSON


@pytest.mark.parametrize(
    "text",
    ['{"type":"ping","t":1,"s":"\ud800"}', '{"type":"ping","t":1,"s":"\\udc00"}'],
)
def test_bad_utf8_in_text_frames(text: str) -> None:
    assert code_of(Codec.JSON, text) is ErrorCode.BAD_UTF8
    # also when the frame is big enough to be measured in bytes first
    assert code_of(Codec.JSON, text, Limits(max_frame_bytes=len(text) * 2)) is ErrorCode.BAD_UTF8


def test_bad_utf8_in_cbor() -> None:
    key = b"\xa2" + cbor2.dumps("type") + cbor2.dumps("ping") + b"\x62\xc3\x28" + b"\x01"
    value = b"\xa2" + cbor2.dumps("type") + b"\x64\x70\x69\x6e\xff" + cbor2.dumps("t") + b"\x01"
    surrogate = b"\xa3" + cbor2.dumps("type") + cbor2.dumps("ping") + cbor2.dumps("t") + b"\x01"
    surrogate += cbor2.dumps("s") + b"\x63\xed\xa0\x80"
    for frame in (key, value, surrogate):
        assert code_of(Codec.CBOR, frame) is ErrorCode.BAD_UTF8


def _ping_with(raw_value: bytes) -> bytes:
    """A CBOR ping map with an extra field ``x`` holding ``raw_value``."""
    return (
        b"\xa3"
        + cbor2.dumps("type")
        + cbor2.dumps("ping")
        + cbor2.dumps("t")
        + b"\x01"
        + (cbor2.dumps("x") + raw_value)
    )


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"\x43abc", id="byte string"),
        pytest.param(b"\xc1\x1a\x51\x4b\x67\xb0", id="epoch datetime tag"),
        pytest.param(b"\xc0\x74" + b"2013-03-21T20:04:00Z", id="datetime string tag"),
        pytest.param(b"\xc2\x49\x01" + b"\x00" * 8, id="bignum"),
        pytest.param(b"\xc5\x82\x1b\x7f\xff\xff\xff\xff\xff\xff\xff\x01", id="bigfloat"),
        pytest.param(b"\xd9\x01\x02\x81\x00", id="set"),
        pytest.param(b"\xd8\x1c\x80", id="shareable"),
        pytest.param(b"\xd8\x1c\x81\xd8\x1d\x00", id="shared cyclic"),
        pytest.param(b"\xd8\x19\x00", id="stringref"),
        pytest.param(b"\xd9\xd9\xf7\x00", id="self-describe"),
        pytest.param(b"\xd9\x99\x99\x00", id="unknown tag"),
        pytest.param(b"\xf7", id="undefined"),
        pytest.param(b"\xf0", id="simple value"),
        pytest.param(b"\xf9\x7e\x00", id="NaN"),
        pytest.param(b"\xf9\x7c\x00", id="infinity"),
        pytest.param(b"\x3b\xff\xff\xff\xff\xff\xff\xff\xff", id="-2**64"),
        pytest.param(b"\xa1\x01\x02", id="int key"),
        pytest.param(b"\xa1\x41a\x02", id="bytes key"),
        pytest.param(b"\xa1\x81\x01\x02", id="array key"),
        pytest.param(b"\xff", id="lone break"),
        pytest.param(b"\x9b\x00\x00\x00\x01\x00\x00\x00\x00", id="array claims 2**32 items"),
        pytest.param(b"\x7b\x7f\x00\x00\x00\x00\x00\x00\x00", id="text claims 2**63 bytes"),
    ],
)
def test_cbor_outside_the_json_data_model(raw: bytes) -> None:
    assert code_of(Codec.CBOR, _ping_with(raw)) is ErrorCode.BAD_CBOR


def test_cbor_in_the_model_is_accepted() -> None:
    # indefinite lengths, float16, the 64-bit extremes, duplicate keys (last wins, as in JSON)
    frame = _ping_with(b"\x9f\xf9\x3c\x00\x1b\xff\xff\xff\xff\xff\xff\xff\xff\xff")
    assert decode_client_frame(Codec.CBOR, frame) == [Ping(1)]
    dup = b"\xa2" + cbor2.dumps("type") + cbor2.dumps("ping") + cbor2.dumps("t") + b"\x01"
    dup = b"\xa3" + dup[1:] + cbor2.dumps("t") + b"\x02"
    assert decode_client_frame(Codec.CBOR, dup) == [Ping(2)]


def test_trailing_or_truncated_cbor() -> None:
    assert code_of(Codec.CBOR, PING_CBOR + b"\x00") is ErrorCode.BAD_CBOR
    assert code_of(Codec.CBOR, PING_CBOR + PING_CBOR) is ErrorCode.BAD_CBOR
    assert code_of(Codec.CBOR, PING_CBOR[:-1]) is ErrorCode.BAD_CBOR


def test_close_codes_of_frame_errors() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_client_frame(Codec.JSON, b"{}")
    assert info.value.close_code is CloseCode.UNSUPPORTED_DATA
    with pytest.raises(ProtocolError) as info:
        decode_client_frame(Codec.JSON, "x" * 200, Limits(max_frame_bytes=100))
    assert info.value.close_code is CloseCode.MESSAGE_TOO_BIG
    with pytest.raises(ProtocolError) as info:
        decode_client_frame(Codec.CBOR, b"\xf7")
    assert info.value.close_code is CloseCode.INVALID_PAYLOAD


def test_client_limits_accept_deeper_and_larger_frames_than_the_server() -> None:
    deep = nested_json(50)
    assert code_of(Codec.JSON, deep) is ErrorCode.TOO_DEEP
    deep_pong = deep.replace('"ping"', '"pong"')
    assert len(decode_server_frame(Codec.JSON, deep_pong, CLIENT_LIMITS)) == 1


def test_big_json_integers_become_floats_like_any_json_reader() -> None:
    [ping] = decode_client_frame(Codec.JSON, '{"type":"ping","t":1,"x":123456789012345678901234}')
    assert ping == Ping(1)
    with pytest.raises(ProtocolError) as info:
        decode_client_frame(Codec.JSON, '{"type":"ping","t":123456789012345678901234}')
    assert info.value.code is ErrorCode.INVALID_FIELD


def test_encode_output_kinds() -> None:
    assert isinstance(encode(Codec.JSON, Ping(1)), str)
    assert isinstance(encode(Codec.CBOR, Ping(1)), bytes)
