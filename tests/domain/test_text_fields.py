"""The bounds on what a client writes (``agor_actors.domain.fields``): a
text past its length, and a NUL anywhere in a text or a JSON value, which
PostgreSQL cannot keep and every store now refuses alike."""

from __future__ import annotations

from typing import Any

import pytest

from agor_actors.domain import ServiceError
from agor_actors.domain.fields import check_json, check_text


def test_a_text_past_its_bound_or_with_a_nul_is_refused() -> None:
    check_text("title", "x" * 10, 10)
    check_text("title", 7, 1)  # (other types are the caller's)
    with pytest.raises(ServiceError) as long:
        check_text("title", "x" * 11, 10)
    assert long.value.code == "invalid_field" and long.value.data == {
        "field": "title",
        "chars_max": 10,
    }
    with pytest.raises(ServiceError) as nul:
        check_text("chunk", "a\x00b", 10)
    assert (nul.value.code, nul.value.data) == ("invalid_field", {"field": "chunk"})
    assert nul.value.message == (
        "chunk holds a NUL character (\\u0000), which the store does not keep"
    )


@pytest.mark.parametrize(
    "value",
    ["\x00", ["ok", "\x00"], {"k": "\x00"}, {"k\x00": 1}, {"a": [{"b": ["c", {"d": "\x00"}]}]}],
)
def test_a_nul_anywhere_in_a_json_value_is_refused(value: Any) -> None:
    with pytest.raises(ServiceError) as nul:
        check_json("git_state", value)
    assert nul.value.data == {"field": "git_state"}


@pytest.mark.parametrize(
    "value", [None, 0, 1.5, True, "\\u0000 as written in code", ["a"], {"k": {"l": [1, "m"]}}]
)
def test_json_values_without_a_nul_pass(value: Any) -> None:
    check_json("result", value)
