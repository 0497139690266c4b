"""The broker a URL names (pure, and the refusals of an unknown scheme by
``open_hub`` and ``serve``, before anything opens)."""

from __future__ import annotations

import pathlib

import pytest

from agor_actors.broker import broker_kind
from agor_actors.cli import main
from agor_actors.daemon import open_hub
from agor_actors.world import real_world


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("redis://127.0.0.1:6379/0", "redis"),
        ("rediss://cache.example:6380/0", "redis"),
        ("postgresql://postgres@127.0.0.1:5432/agor", "postgresql"),
        ("postgres://postgres@127.0.0.1/agor", "postgresql"),
        ("postgresql+psycopg://postgres@127.0.0.1:5432/agor", "postgresql"),
    ],
)
def test_the_scheme_picks_the_link(url: str, kind: str) -> None:
    assert broker_kind(url) == kind


@pytest.mark.parametrize("url", ["amqp://127.0.0.1", "127.0.0.1:6379", "sqlite:///agor.db", ""])
def test_an_unknown_scheme_is_refused_saying_what_is_known(url: str) -> None:
    with pytest.raises(ValueError, match=r"unknown broker URL .* redis://, .*postgresql://"):
        broker_kind(url)


async def test_open_hub_refuses_an_unknown_broker_before_opening_a_store(
    tmp_path: pathlib.Path,
) -> None:
    with pytest.raises(ValueError, match="unknown broker URL"):
        async with open_hub(real_world(), data_dir=tmp_path / "d", broker_url="amqp://x"):
            pass  # pragma: no cover - it must not start
    assert not (tmp_path / "d" / "agor.db").exists()


def test_serve_refuses_an_unknown_broker(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["serve", "--data-dir", str(tmp_path / "d"), "--db", "sqlite:///x.db"]
    assert main([*argv, "--broker", "amqp://127.0.0.1"]) == 2
    assert "--broker: unknown broker URL 'amqp://127.0.0.1'" in capsys.readouterr().err
