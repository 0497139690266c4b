"""``agor-actors top``: the supervision tree of a running daemon."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import trio
from server_support import daemon, stream_chunks

from agor_actors.cli import format_connections, format_top, frame_counts, handled_counts, main
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


async def test_top_shows_the_busiest_connections(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agor_actors.client import connect

    async with (
        daemon(tmp_path / "agor") as d,
        connect(d.ws_url, token=d.token, codec="json") as agent,
        connect(d.ws_url, token=d.token, codec="cbor") as viewer,
    ):
        session = await agent.service("sessions").create({"title": "watched"})
        room = f"session:{session['id']}"
        mirror = await viewer.join(room)
        message = await agent.service("messages").create({"session_id": session["id"]})
        await stream_chunks(agent, mirror, message["id"], 12)
        agent_id, viewer_id = agent.connection_id, viewer.connection_id
        assert agent_id is not None and viewer_id is not None
        argv = ["top", "--url", d.http_url, "--data-dir", str(d.data_dir), "--limit", "5"]
        assert await trio.to_thread.run_sync(main, argv) == 0
        out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("connection "))
    for column in ("user", "codec", "frames in/out", "bytes in/out", "outbox", "rooms"):
        assert column in header
    agent_line = next(line for line in out.splitlines() if line.startswith(agent_id))
    viewer_line = next(line for line in out.splitlines() if line.startswith(viewer_id))
    assert " owner " in agent_line and " json " in agent_line
    assert " cbor " in viewer_line and viewer_line.endswith(room)
    received, sent = agent_line.split()[3].split("/")
    assert int(received) >= 14 and int(sent) >= 14  # a call a frame, each answered
    # the agent sent and received more frames: it is listed first
    assert out.index(agent_id) < out.index(viewer_id)


def test_connection_rates_put_the_busiest_first() -> None:
    def row(cid: str, received: int, sent: int, queued: int = 0) -> dict[str, object]:
        return {
            "connection_id": cid,
            "user_id": "u",
            "codec": "agor.v1.json",
            "rooms": [f"session:{n}" for n in range(5)],
            "frames_received": received,
            "frames_sent": sent,
            "bytes_received": 2048,
            "bytes_sent": 3 << 20,
            "outbox_messages": queued,
            "outbox_bytes": 0,
            "pending_calls": 0,
        }

    listing = {
        "total": 4,
        "connections": [row("old-busy", 1000, 1000), row("new-busy", 40, 40), row("idle", 5, 5)],
    }
    before = frame_counts({"connections": [row("old-busy", 1000, 1000), row("new-busy", 0, 0)]})
    table = format_connections(listing, limit=10, previous=before, interval_s=2.0)
    lines = table.splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["new-busy", "old-busy", "idle"]
    assert " 20.0/20.0 " in lines[1] and " 0.0/0.0 " in lines[2] and " - " in lines[3]
    assert " 2.0K/3.0M " in lines[1]
    assert lines[1].endswith("session:0, session:1, session:2 +2")
    assert lines[-1] == "... 4 connections in all"
    stuck = {"total": 2, "connections": [row("idle", 5, 5), row("stuck", 5, 5, queued=900)]}
    assert format_connections(stuck, limit=10).splitlines()[1].startswith("stuck")


def test_control_characters_in_names_are_shown_escaped() -> None:
    """An escape sequence in a name (a crash message may quote what a
    client sent) is printed as text, not run by the operator's terminal."""
    tree = {
        "children": [
            {
                "id": "registry",
                "state": "running",
                "restarts": 0,
                "supervisor": {
                    "children": [
                        {
                            "id": "room:board:\x1b[2J",
                            "state": "running",
                            "restarts": 1,
                            "handled": 3,
                            "last_crash": "KeyError: '\x1b]0;pwned\x07'",
                        }
                    ]
                },
            }
        ]
    }
    table = format_top(tree, limit=10)
    assert "\x1b" not in table and "\x07" not in table
    assert "room:board:\\x1b[2J" in table and "KeyError: '\\x1b]0;pwned\\x07'" in table
    row = {
        "connection_id": "c\x9b1",
        "user_id": "u\x00",
        "codec": "agor.v1.json",
        "rooms": ["session:\x1b[31m"],
        "frames_received": 1,
        "frames_sent": 1,
        "bytes_received": 1,
        "bytes_sent": 1,
        "outbox_messages": 0,
        "outbox_bytes": 0,
        "pending_calls": 0,
    }
    shown = format_connections({"total": 1, "connections": [row]}, limit=10)
    assert not any(ch in shown for ch in "\x1b\x9b\x00")
    assert shown.splitlines()[1].startswith("c\\x9b1") and "session:\\x1b[31m" in shown
