"""The golden vectors in tests/vectors/ match the code."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import cbor2
import orjson
import pytest

from protocols import (
    CLIENT_MESSAGE_TYPES,
    SERVER_MESSAGE_TYPES,
    Codec,
    Limits,
    ProtocolError,
    decode_client_frame,
    decode_server_frame,
    encode,
)

VECTORS = Path(__file__).resolve().parents[1] / "vectors"


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("agor_vectors", VECTORS / "regenerate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATOR = _load_generator()
MANIFEST: dict[str, Any] = json.loads((VECTORS / "manifest.json").read_text())


def _read(name: str, codec: Codec) -> str | bytes:
    raw = (VECTORS / name).read_bytes()
    return raw.decode("utf-8") if codec is Codec.JSON else raw


def test_files_are_what_the_code_produces() -> None:
    assert GENERATOR.differences() == [], "run: python tests/vectors/regenerate.py"


def test_every_message_type_has_a_vector_in_both_codecs() -> None:
    client = {e["type"] for e in MANIFEST["valid"] if e["direction"] == "client"}
    server = {e["type"] for e in MANIFEST["valid"] if e["direction"] == "server"}
    assert client - {"batch"} == set(CLIENT_MESSAGE_TYPES)
    assert server - {"batch"} == set(SERVER_MESSAGE_TYPES)
    assert "batch" in client and "batch" in server
    for entry in MANIFEST["valid"]:
        assert (VECTORS / entry["json"]).is_file() and (VECTORS / entry["cbor"]).is_file()


@pytest.mark.parametrize("entry", MANIFEST["valid"], ids=lambda e: e["name"])
def test_valid_vectors_decode_to_the_expected_messages(entry: dict[str, Any]) -> None:
    samples = GENERATOR.CLIENT if entry["direction"] == "client" else GENERATOR.SERVER
    expected = samples[entry["name"]]
    expected_list = expected if isinstance(expected, list) else [expected]
    decode = decode_client_frame if entry["direction"] == "client" else decode_server_frame
    as_json = _read(entry["json"], Codec.JSON)
    as_cbor = _read(entry["cbor"], Codec.CBOR)
    assert decode(Codec.JSON, as_json) == expected_list
    assert decode(Codec.CBOR, as_cbor) == expected_list
    # the same map in both codecs
    assert orjson.loads(as_json) == cbor2.loads(as_cbor)
    # and re-encoding gives the same bytes
    assert encode(Codec.JSON, expected) == as_json
    assert encode(Codec.CBOR, expected) == as_cbor


@pytest.mark.parametrize("entry", MANIFEST["invalid"], ids=lambda e: e["name"])
def test_invalid_vectors_fail_with_their_code(entry: dict[str, Any]) -> None:
    codec = Codec(entry["codec"])
    with pytest.raises(ProtocolError) as info:
        decode_client_frame(codec, _read(entry["file"], codec), Limits())
    assert info.value.code == entry["error"]
    assert info.value.close_code == entry["close_code"]


def test_the_check_notices_a_stale_file(tmp_path: Path) -> None:
    GENERATOR.write(tmp_path)
    assert GENERATOR.differences(tmp_path) == []
    (tmp_path / "ping.json").write_text('{"type":"ping","t":124}')
    (tmp_path / "extra.json").write_text("{}")
    (tmp_path / "pong.cbor").unlink()
    assert GENERATOR.differences(tmp_path) == [
        "differs: ping.json",
        "missing: pong.cbor",
        "extra: extra.json",
    ]
