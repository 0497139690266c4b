"""Golden vectors of the agor wire protocol, version 1.

For every message type, the frame as JSON text (``<name>.json``, what goes in
an ``agor.v1.json`` text frame) and as CBOR (``<name>.cbor``, an
``agor.v1.cbor`` binary frame), plus invalid frames with the error code a
receiver must report.  ``manifest.json`` lists them all.

A client in any language can test itself against these files: decoding a
valid vector in either codec must give the same message; decoding an invalid
one must fail with the listed code.  Byte-for-byte equality of re-encoded
frames is only required of this implementation (other encoders may order keys
or size floats differently).

    python tests/vectors/regenerate.py          # rewrite the files
    python tests/vectors/regenerate.py --check  # exit 1 if they differ from the code
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import cbor2

from protocols import (
    DEFAULT_LIMITS,
    PROTOCOL_VERSION,
    Auth,
    Call,
    Codec,
    Cursor,
    Error,
    ErrorInfo,
    Event,
    Hello,
    Join,
    Joined,
    Lagged,
    Leave,
    Left,
    Limits,
    Message,
    Ping,
    Pong,
    Presence,
    PresenceUpdate,
    ProtocolError,
    Result,
    Since,
    Viewport,
    Welcome,
    decode_client_frame,
    encode,
)

HERE = Path(__file__).resolve().parent
TS = 1764100000000

CLIENT: dict[str, Message | list[Message]] = {
    "hello": Hello(PROTOCOL_VERSION, "eyJhbGciOiJIUzI1NiJ9.e30.c2ln", "tab-3f2a"),
    "hello_minimal": Hello(PROTOCOL_VERSION),
    "call_create": Call(
        7, "tasks", "create", data={"session_id": "s-1", "title": "Write tests"}, temp_id="tmp-1"
    ),
    "call_patch": Call(8, "sessions", "patch", id="s-1", data={"title": "Renamed"}, base_rev=3),
    "call_find": Call(9, "tasks", "find", query={"session_id": "s-1", "$limit": 50}),
    "call_stream": Call(10, "messages", "stream", id="m-1", data={"chunk": "Hello "}),
    "auth": Auth(11, "eyJhbGciOiJIUzI1NiJ9.e30.c2ln"),
    "join": Join("session:s-1"),
    "join_since": Join("session:s-1", Since("ep-1", 41)),
    "leave": Leave("board:b-1"),
    "presence_update": PresenceUpdate(
        board="b-1",
        cursor=Cursor(120.5, 80.0),
        viewport=Viewport(0.0, 0.0, 1920.0, 1080.0, 1.25),
        view="session:s-1",
        typing=True,
    ),
    "presence_update_follow": PresenceUpdate(hide_cursors=True, follow="u-2"),
    "ping": Ping(123),
    "batch_client": [Join("session:s-1", Since("ep-1", 41)), Join("board:b-1")],
}

SERVER: dict[str, Message | list[Message]] = {
    "welcome": Welcome("conn-1", "u-1", 15000, DEFAULT_LIMITS.to_wire()),
    "welcome_expiring": Welcome(
        "conn-1", "u-1", 15000, DEFAULT_LIMITS.to_wire(), expires_at=TS + 900_000
    ),
    "result_ok": Result(7, True, data={"id": "t-1", "rev": 1}),
    "result_error": Result(
        8,
        False,
        error=ErrorInfo("conflict", "stale base revision", {"rev": 4, "title": "Other"}),
    ),
    "joined": Joined("session:s-1", "ep-1", 41, True),
    "joined_reload": Joined("session:s-1", "ep-2", 3, False),
    "event": Event(
        "session:s-1",
        42,
        "task:created",
        data={"id": "t-1", "title": "Write tests"},
        ts=TS,
        user_id="u-1",
        origin="conn-1",
        temp_id="tmp-1",
    ),
    "event_merged": Event(
        "session:s-1",
        43,
        "task:message",
        data={"message_id": "m-1", "chunk": "Hello world, again"},
        ts=TS + 250,
        user_id="u-1",
        last_seq=45,
    ),
    "presence": Presence(
        "b-1",
        users=[
            {
                "user_id": "u-2",
                "name": "Bob",
                "color": "#e11d48",
                "status": "active",
                "view": "session:s-1",
            }
        ],
        cursors=[{"user_id": "u-2", "x": 300.0, "y": 200.5}],
    ),
    "presence_viewport": Presence("b-1", viewport=Viewport(100.0, 50.0, 1280.0, 720.0, 1.0)),
    "lagged": Lagged("board:b-1", 1042),
    "left": Left("session:s-2", "forbidden"),
    "left_refused": Left(
        "session:s-2", "invalid_field", "join: expected a map, got a string @ $.since"
    ),
    "error": Error("unknown_type", "unknown client message type 'subscribe'"),
    "pong": Pong(123),
    "batch_server": [
        Event("session:s-1", 46, "task:started", data={"id": "t-1"}, ts=TS + 500),
        Event("session:s-1", 47, "session:status_changed", data={"status": "running"}),
    ],
}


def _deep_json(depth: int) -> str:
    return '{"type":"ping","t":1,"d":' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


def _cbor_map(pairs: list[tuple[bytes, bytes]]) -> bytes:
    assert len(pairs) < 24
    return bytes([0xA0 | len(pairs)]) + b"".join(k + v for k, v in pairs)


_PING_CBOR = [(cbor2.dumps("type"), cbor2.dumps("ping")), (cbor2.dumps("t"), cbor2.dumps(1))]

# (name, codec, raw frame, expected error code); frames a *server* receives
# with the default limits.
INVALID: list[tuple[str, Codec, str | bytes, str]] = [
    ("bad_unknown_type", Codec.JSON, '{"type":"subscribe","room":"board:b-1"}', "unknown_type"),
    ("bad_missing_field", Codec.JSON, '{"type":"call","ref":1,"service":"tasks"}', "invalid_field"),
    (
        "bad_string_ref",
        Codec.JSON,
        '{"type":"call","ref":"1","service":"tasks","method":"get"}',
        "invalid_field",
    ),
    (
        "bad_float_ref",
        Codec.CBOR,
        cbor2.dumps({"type": "call", "ref": 1.0, "service": "tasks", "method": "get"}),
        "invalid_field",
    ),
    ("bad_bool_int", Codec.JSON, '{"type":"ping","t":true}', "invalid_field"),
    ("bad_no_type", Codec.JSON, '{"t":1}', "invalid_field"),
    ("bad_json", Codec.JSON, '{"type":"ping",', "bad_json"),
    ("bad_empty_batch", Codec.JSON, "[]", "bad_frame"),
    ("bad_scalar", Codec.JSON, "42", "bad_frame"),
    ("bad_nested_batch", Codec.JSON, '[[{"type":"ping","t":1}]]', "bad_frame"),
    ("bad_too_deep", Codec.JSON, _deep_json(40), "too_deep"),
    (
        "bad_batch_too_large",
        Codec.JSON,
        "[" + ",".join(['{"type":"ping","t":1}'] * 101) + "]",
        "batch_too_large",
    ),
    (
        "bad_cbor_datetime_tag",
        Codec.CBOR,
        _cbor_map([*_PING_CBOR, (cbor2.dumps("x"), b"\xc1\x1a\x51\x4b\x67\xb0")]),
        "bad_cbor",
    ),
    (
        "bad_cbor_byte_string",
        Codec.CBOR,
        _cbor_map([*_PING_CBOR, (cbor2.dumps("x"), b"\x43abc")]),
        "bad_cbor",
    ),
    (
        "bad_cbor_int_key",
        Codec.CBOR,
        _cbor_map([*_PING_CBOR, (b"\x01", b"\x02")]),
        "bad_cbor",
    ),
    ("bad_cbor_trailing", Codec.CBOR, _cbor_map(_PING_CBOR) + b"\x00", "bad_cbor"),
    ("bad_cbor_truncated", Codec.CBOR, _cbor_map(_PING_CBOR)[:-1], "bad_cbor"),
    (
        "bad_cbor_utf8",
        Codec.CBOR,
        _cbor_map([(cbor2.dumps("type"), b"\x64pin\xff"), _PING_CBOR[1]]),
        "bad_utf8",
    ),
]

_EXTENSION = {Codec.JSON: "json", Codec.CBOR: "cbor"}


def _bytes(frame: str | bytes) -> bytes:
    return frame.encode("utf-8") if isinstance(frame, str) else frame


def _type_of(message: Message | list[Message]) -> str:
    return "batch" if isinstance(message, list) else message.TYPE


def build() -> dict[str, bytes]:
    """Every file of the vectors directory, by name."""
    files: dict[str, bytes] = {}
    valid: list[dict[str, Any]] = []
    for direction, samples in (("client", CLIENT), ("server", SERVER)):
        for name, message in samples.items():
            entry: dict[str, Any] = {
                "name": name,
                "direction": direction,
                "type": _type_of(message),
            }
            if isinstance(message, list):
                entry["types"] = [m.TYPE for m in message]
            for codec, ext in _EXTENSION.items():
                files[f"{name}.{ext}"] = _bytes(encode(codec, message))
                entry[ext] = f"{name}.{ext}"
            valid.append(entry)
    invalid: list[dict[str, Any]] = []
    limits = Limits()
    for name, codec, raw, code in INVALID:
        file = f"{name}.{_EXTENSION[codec]}"
        files[file] = _bytes(raw)
        try:
            decode_client_frame(codec, raw, limits)
        except ProtocolError as exc:
            assert exc.code == code, (name, exc)
            close = exc.close_code
        else:
            raise AssertionError(f"{name} decodes")
        invalid.append(
            {
                "name": name,
                "direction": "client",
                "codec": codec.subprotocol,
                "file": file,
                "error": code,
                "close_code": None if close is None else int(close),
            }
        )
    manifest = {
        "protocol": PROTOCOL_VERSION,
        "subprotocols": {"json": Codec.JSON.subprotocol, "cbor": Codec.CBOR.subprotocol},
        "limits": limits.to_wire(),
        "valid": valid,
        "invalid": invalid,
    }
    files["manifest.json"] = (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode()
    return files


def differences(directory: Path = HERE) -> list[str]:
    """Files that are missing, stale or extra in ``directory``."""
    expected = build()
    problems = []
    for name, content in sorted(expected.items()):
        path = directory / name
        if not path.exists():
            problems.append(f"missing: {name}")
        elif path.read_bytes() != content:
            problems.append(f"differs: {name}")
    known = set(expected) | {Path(__file__).name}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name not in known:
            problems.append(f"extra: {path.name}")
    return problems


def write(directory: Path = HERE) -> None:
    for name, content in build().items():
        (directory / name).write_bytes(content)


def main(argv: list[str]) -> int:
    if "--check" in argv:
        problems = differences()
        for problem in problems:
            print(problem)
        return 1 if problems else 0
    write()
    print(f"wrote {len(build())} files to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
