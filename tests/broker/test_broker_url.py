"""The broker a URL names (pure, and the refusals of an unknown scheme by
``open_hub`` and ``serve``, before anything opens); LISTEN/NOTIFY's
connection strings and channel names (pure)."""

from __future__ import annotations

import pathlib

import pytest
from psycopg.conninfo import conninfo_to_dict

from agor_actors.broker import broker_kind, pg_channel
from agor_actors.broker._pglink import pg_conninfo
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
    # --new-keys means something only on a cluster's node: alone it would do nothing, silently
    assert main([*argv, "--new-keys"]) == 2
    assert capsys.readouterr().err == (
        "agor-actors serve: --new-keys is for a node of a cluster (--broker): a daemon alone"
        " has its own keys\n"
    )
    assert not (tmp_path / "d").exists()


def test_channel_names_fit_an_identifier_and_hash_the_same_everywhere() -> None:
    short = "agor:room:session:0192f0a1-7c3e-7000-8000-000000000000"
    assert pg_channel(short) == short
    a, b = "agor:room:" + "é" * 40, "agor:room:" + "é" * 39 + "e"
    assert len(pg_channel(a).encode()) <= 63 and len(pg_channel(b).encode()) <= 63
    assert pg_channel(a) != pg_channel(b)
    assert pg_channel(a) == pg_channel("agor:room:" + "é" * 40)
    assert pg_channel(a).startswith("agor:room:")


def test_urls_of_either_spelling_become_a_conninfo() -> None:
    for url in (
        "postgresql+psycopg://postgres@127.0.0.1:5432/test",
        "postgresql://postgres@127.0.0.1:5432/test",
        "postgres://postgres@127.0.0.1:5432/test",
    ):
        assert conninfo_to_dict(pg_conninfo(url)) == {
            "user": "postgres",
            "host": "127.0.0.1",
            "port": "5432",
            "dbname": "test",
        }
    with pytest.raises(ValueError, match="not a PostgreSQL URL"):
        pg_conninfo("redis://127.0.0.1:6379/0")
