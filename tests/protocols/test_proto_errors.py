"""The error-code table."""

from __future__ import annotations

import pytest

from protocols import (
    CLOSE_CODES,
    CloseCode,
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    close_code_for,
)


def test_every_code_has_an_entry() -> None:
    assert set(CLOSE_CODES) == set(ErrorCode)


def test_close_codes_can_be_sent() -> None:
    for code, close in CLOSE_CODES.items():
        if close is None:
            continue
        # 1004-1006 and 1015 are reserved and must never be sent in a close frame.
        assert close in {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011} or 4000 <= close <= 4999, (
            code
        )


@pytest.mark.parametrize(
    ("code", "close"),
    [
        ("bad_frame", 1007),
        ("bad_json", 1007),
        ("bad_cbor", 1007),
        ("bad_utf8", 1007),
        ("wrong_frame_kind", 1003),
        ("frame_too_large", 1009),
        ("batch_too_large", 1009),
        ("too_deep", 1008),
        ("unsupported_protocol", 1002),
        ("invalid_state", 1002),
        ("duplicate_ref", 1002),
        ("not_authenticated", 4001),
        ("unauthorized", 4001),
        ("flood", 1008),
        ("server_error", 1011),
        ("going_away", 1001),
        ("heartbeat_timeout", 4000),
        ("too_many_connections", 1008),
        ("unknown_type", None),
        ("invalid_field", None),
        ("rate_limited", None),
        ("too_many_pending", None),
        ("too_many_subscriptions", None),
        ("unknown_ref", None),
        ("forbidden", None),
        ("not_found", None),
        ("conflict", None),
        ("invalid_data", None),
        ("internal", None),
        ("connection_lost", None),
    ],
)
def test_table(code: str, close: int | None) -> None:
    assert close_code_for(ErrorCode(code)) == close
    error = ProtocolError(ErrorCode(code), "m")
    assert error.close_code == close
    assert error.fatal is (close is not None)


def test_codes_are_stable_strings() -> None:
    assert ErrorCode.CONFLICT == "conflict"
    assert all(code.value == code.value.lower() and " " not in code.value for code in ErrorCode)
    assert CloseCode.UNAUTHORIZED == 4001


def test_protocol_error_text() -> None:
    error = ProtocolError(ErrorCode.BAD_JSON, "é" * 200, ref=3)
    assert str(error).startswith("bad_json: ")
    assert len(error.close_reason.encode()) <= 123
    assert error.ref == 3
    assert "bad_json" in repr(error)
    with pytest.raises(ValueError, match="nope"):
        ProtocolError("nope", "x")  # type: ignore[arg-type]


def test_local_errors_are_not_protocol_errors() -> None:
    assert not issubclass(LocalProtocolError, ProtocolError)
    assert (
        LocalProtocolError("x", code=ErrorCode.TOO_MANY_PENDING).code is ErrorCode.TOO_MANY_PENDING
    )
