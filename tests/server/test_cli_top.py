"""``agor-actors top``: the supervision tree of a running daemon."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import trio
from server_support import daemon

from agor_actors.cli import format_top, handled_counts, main
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


async def test_top_shows_message_rates_and_puts_the_busiest_first(tmp_path: pathlib.Path) -> None:
    async with daemon(tmp_path / "agor") as d:
        quiet = await d.hub.call(
            OWNER, connection_id=None, service="sessions", method="create", data={"title": "q"}
        )
        busy = await d.hub.call(
            OWNER, connection_id=None, service="sessions", method="create", data={"title": "b"}
        )
        before = handled_counts(d.hub.snapshot())
        for n in range(20):
            await d.hub.call(
                OWNER,
                connection_id=None,
                service="sessions",
                method="patch",
                id=busy["id"],
                data={"title": f"b{n}"},
            )
        table = format_top(d.hub.snapshot(), limit=50, previous=before, interval_s=2.0)
    lines = table.splitlines()
    assert "msgs/s" in lines[[i for i, line in enumerate(lines) if "actor" in line][-1]]
    busy_line = next(line for line in lines if line.startswith(f"session:{busy['id']}"))
    quiet_line = next(line for line in lines if line.startswith(f"session:{quiet['id']}"))
    assert " 20.0 " in busy_line  # 20 patches over 2 s: each a call and its write's answer
    assert " 0.0 " in quiet_line
    assert lines.index(busy_line) < lines.index(quiet_line)


def test_sim_takes_its_own_options_and_others_refuse_unknown_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # the simulator re-executes its process (hash seed pinned): run it apart
    done = subprocess.run(
        [sys.executable, "-m", "agor_actors.cli", "sim", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0
    assert "python -m sim" in done.stdout  # the simulator's help, not agor-actors'
    with pytest.raises(SystemExit) as bad:
        main(["token", "--bogus"])
    assert bad.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
