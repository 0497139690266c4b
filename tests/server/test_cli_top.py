"""``agor-actors top``: the supervision tree of a running daemon."""

from __future__ import annotations

import pathlib

import pytest
import trio
from server_support import daemon

from agor_actors.cli import format_top, main
from agor_actors.daemon import Principal

OWNER = Principal("owner", "owner", True)


async def test_top_shows_supervisors_and_busiest_actors(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with daemon(tmp_path / "agor") as d:
        session = await d.hub.call(
            OWNER, connection_id=None, service="sessions", method="create", data={"title": "S"}
        )
        table = format_top(d.hub.snapshot(), limit=10)
        assert "registry" in table and "store:writer" in table
        assert f"session:{session['id']}" in table
        # end to end over HTTP, from another thread (the CLI blocks)
        argv = ["top", "--url", d.http_url, "--data-dir", str(d.data_dir), "--limit", "5"]
        status = await trio.to_thread.run_sync(main, argv)
        assert status == 0
        out = capsys.readouterr().out
        assert "store:writer" in out and "supervisor" in out
        bad = ["top", "--url", d.http_url, "--token", "wrong", "--limit", "5"]
        assert await trio.to_thread.run_sync(main, bad) == 1
