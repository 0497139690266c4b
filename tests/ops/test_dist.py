"""``make dist``: the daemon as one executable.  Built here with PyInstaller
(``release/build_dist.py``), copied alone into an empty directory and run
there with a bare environment (``env -i PATH=/usr/bin:/bin``: no Python, no
virtual environment) and a fresh data dir, then driven by the Python
client: a session is created, a message streamed, the executable stopped
and started again, and a client that was away resumes with ``since``
(``recovered``, nothing reloaded) and has every chunk, in order."""

from __future__ import annotations

import itertools
import pathlib
import shutil
import sys

import pytest
import trio
from ops_support import BARE_ENV, REPO, free_port, running

from agor_actors.client import Client, Mirror, connect

pytest.importorskip(
    "PyInstaller",
    reason="PyInstaller is not installed (pip install -e '.[dist]'; make test installs it)",
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


async def _build(tmp_path: pathlib.Path) -> pathlib.Path:
    dist = tmp_path / "dist"
    await trio.run_process(
        [
            sys.executable,
            str(REPO / "release" / "build_dist.py"),
            "--dist-dir",
            str(dist),
            "--work-dir",
            str(tmp_path / "build"),
        ],
        capture_stdout=True,
        capture_stderr=True,
    )
    return dist / "agor-actors"


async def _stream(client: Client, message_id: str, chunks: list[str]) -> None:
    messages = client.service("messages")
    for chunk in chunks:
        await messages.call("stream", message_id, {"chunk": chunk})


def _content(mirror: Mirror, message_id: str) -> str | None:
    row = mirror.get("messages", message_id)
    return None if row is None else row["content"]


async def test_the_executable_serves_from_an_empty_directory_and_resumes_after_a_restart(
    tmp_path: pathlib.Path,
) -> None:
    built = await _build(tmp_path)
    assert built.stat().st_size > 1_000_000
    alone = tmp_path / "empty"
    alone.mkdir()
    shutil.copy2(built, alone / "agor-actors")
    assert sorted(p.name for p in alone.iterdir()) == ["agor-actors"]
    port = free_port()
    argv = ["./agor-actors", "serve", "--port", str(port), "--data-dir", "data"]
    chunks = [f"chunk {n}; " for n in range(30)]

    async with running(argv, cwd=alone, env=BARE_ENV) as first:
        assert first.ws_url == f"ws://127.0.0.1:{port}/ws"
        token = (alone / "data" / "token").read_text().strip()
        async with (
            connect(first.ws_url, token=token, seed=1) as writer,
            connect(first.ws_url, token=token, seed=2, backoff_cap_s=0.3) as watcher,
        ):
            session = await writer.service("sessions").create({"title": "from the executable"})
            room = f"session:{session['id']}"
            mirror = await watcher.join(room)
            message = await writer.service("messages").create(
                {"session_id": session["id"], "role": "assistant", "streaming": True}
            )
            async with watcher.events(room) as events:
                await _stream(writer, message["id"], chunks[:10])
                with trio.fail_after(10):
                    await mirror.wait_until(
                        lambda m: _content(m, message["id"]) == "".join(chunks[:10])
                    )
                # the watcher goes away; the stream goes on without it
                await watcher.disconnect()
                await _stream(writer, message["id"], chunks[10:20])
                assert await first.stop() == 0, first.stderr

                async with running(argv, cwd=alone, env=BARE_ENV) as second:
                    assert "listening on" in second.stderr
                    async with connect(second.ws_url, token=token, seed=3) as again:
                        await _stream(again, message["id"], chunks[20:])
                        # pages go on with sealed cursors (AES-SIV, in the executable too)
                        sessions = again.service("sessions")
                        await sessions.create({"title": "a second"})
                        page = await sessions.find({"$limit": 1})
                        rest = await sessions.find({"$limit": 1, "$cursor": page["next_cursor"]})
                        assert len(page["data"]) == len(rest["data"]) == 1
                        assert page["data"] != rest["data"] and rest["next_cursor"] is None
                    watcher.reconnect()
                    with trio.fail_after(15):
                        await mirror.wait_until(
                            lambda m: _content(m, message["id"]) == "".join(chunks)
                        )
                    seen = []
                    async for event in events:
                        seen.append(event)
                        if event.end_seq >= mirror.seq:
                            break
                    stats = watcher.statistics()
                    assert stats.reloads == 1  # the first join only: the restart was resumed
                    assert stats.gaps == 0 and stats.reconnects == 1
                    assert all(event.missed == 0 for event in seen)
                    got = "".join(e.data.get("chunk", "") for e in seen if e.name == "task:message")
                    assert got == "".join(chunks)
                    assert all(a.end_seq < b.seq for a, b in itertools.pairwise(seen))
                    assert await second.stop() == 0, second.stderr
