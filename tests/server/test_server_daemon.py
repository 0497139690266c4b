"""The daemon as a whole: graceful drain (1001) in process, and a daemon
subprocess that is killed with SIGKILL, restarted, and stopped with SIGTERM:
every acknowledged write survives, and a client resumes with ``since``
across the restart."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import attrs
import pytest
import trio
from server_support import http, raw_client, until_closed

from agor_actors.client import connect
from agor_actors.daemon import Principal, open_hub
from agor_actors.server import run_server
from agor_actors.world import real_world
from protocols import Call, Error, Join, Joined, Result, Welcome

REPO = pathlib.Path(__file__).resolve().parents[2]


async def test_drain_answers_then_closes_every_websocket_with_1001(tmp_path: pathlib.Path) -> None:
    world = real_world()
    async with open_hub(world, data_dir=tmp_path / "agor") as hub, trio.open_nursery() as nursery:
        shutdown = trio.Event()
        stopped = trio.Event()

        async def serve(task_status: trio.TaskStatus[int]) -> None:
            await run_server(hub, world, port=0, shutdown=shutdown, task_status=task_status)
            stopped.set()

        port = await nursery.start(serve)
        url = f"ws://127.0.0.1:{port}/ws"
        async with (
            raw_client(url, token=hub.owner_token) as raw,
            connect(url, token=hub.owner_token, backoff_cap_s=0.2) as client,
        ):
            await raw.expect(Welcome)
            await raw.send(Call(1, "sessions", "create", data={"title": "draining"}))
            session = (await raw.expect(Result)).data
            await raw.send(Join(f"session:{session['id']}"))
            await raw.expect(Joined)
            mirror = await client.join(f"session:{session['id']}")
            assert mirror.get("sessions", session["id"]) is not None
            shutdown.set()
            messages, reason = await until_closed(raw)
            assert reason.code == 1001
            assert [m.code for m in messages if isinstance(m, Error)] == ["going_away"]
            with trio.fail_after(10):
                await stopped.wait()
            assert client.close_reason is not None and client.close_reason.code == 1001
            assert not client.connected
        # the drained write is durable
        row = await hub.call(
            Principal("owner", "owner", True),
            connection_id=None,
            service="sessions",
            method="get",
            id=session["id"],
        )
        assert row["title"] == "draining"


# ------------------------------------------------------------- subprocess


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@attrs.define
class _Process:
    process: trio.Process
    log: bytearray

    @property
    def text(self) -> str:
        return self.log.decode("utf-8", "replace")


@asynccontextmanager
async def _daemon_process(data_dir: pathlib.Path, port: int) -> AsyncIterator[_Process]:
    """``python -m agor_actors.cli serve`` until it logs that it listens."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "agor_actors.cli",
            "serve",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=env,
    )
    assert process.stderr is not None
    log = bytearray()
    listening = trio.Event()

    async def pump() -> None:
        assert process.stderr is not None
        async for chunk in process.stderr:
            log.extend(chunk)
            if b"listening on" in log:
                listening.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            with trio.fail_after(10):
                await listening.wait()
            yield _Process(process, log)
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
            await process.stderr.aclose()


@pytest.mark.slow
async def test_kill_9_loses_no_acknowledged_write_and_clients_resume(
    tmp_path: pathlib.Path,
) -> None:
    data_dir = tmp_path / "agor"
    port = _free_port()
    url = f"ws://127.0.0.1:{port}/ws"
    acknowledged: list[str] = []
    async with _daemon_process(data_dir, port) as first:
        token = (data_dir / "token").read_text().strip()
        assert (data_dir / "token").stat().st_mode & 0o777 == 0o600
        async with connect(
            url, token=token, backoff_base_s=0.05, backoff_cap_s=0.3, seed=9
        ) as client:
            tasks = client.service("tasks")
            session = await client.service("sessions").create({"title": "survivor"})
            room = f"session:{session['id']}"
            mirror = await client.join(room)
            last_seq = 0
            for n in range(20):
                created = await tasks.create({"session_id": session["id"], "prompt": f"p{n}"})
                acknowledged.append(created["id"])
                last_seq = created["_seq"]  # its event's seq in the session room
            # a result may overtake its own event (they leave different actors)
            with trio.fail_after(10):
                await mirror.wait_until(lambda m: m.seq >= last_seq)
            seq_before = mirror.seq
            first.process.kill()  # SIGKILL: no drain, no commit at exit
            with trio.fail_after(5):
                await first.process.wait()
            assert first.process.returncode == -signal.SIGKILL

            # While the daemon is down the client keeps trying (backoff).
            async with _daemon_process(data_dir, port) as second:
                with trio.fail_after(10):
                    await client.wait_connected()
                for n in range(5):
                    created = await tasks.create(
                        {"session_id": session["id"], "prompt": f"after{n}"}
                    )
                    acknowledged.append(created["id"])
                    last_seq = created["_seq"]
                with trio.fail_after(10):
                    await mirror.wait_until(
                        lambda m: m.seq >= last_seq and all(m.get("tasks", i) for i in acknowledged)
                    )
                stats = client.statistics()
                assert (
                    stats.reloads == 1
                )  # the first join only: the restart was resumed, not reloaded
                assert stats.reconnects >= 1 and stats.duplicates_dropped == 0 and stats.gaps == 0
                assert mirror.seq == seq_before + 5 and mirror.applied == mirror.seq - 1, (
                    mirror.seq,
                    seq_before,
                    mirror.applied,
                )

                found = await http(
                    "GET",
                    f"http://127.0.0.1:{port}/tasks?session_id={session['id']}&$limit=100",
                    token=token,
                )
                assert sorted(row["id"] for row in found.body["data"]) == sorted(acknowledged)

                # A fresh client's reload equals the resumed mirror.
                async with connect(url, token=token) as fresh:
                    other = await fresh.join(room)
                    assert other.snapshot() == mirror.snapshot()

                second.process.send_signal(signal.SIGTERM)
                with trio.fail_after(10):
                    await second.process.wait()
                assert second.process.returncode == 0, second.text
                assert "draining" in second.text and "stopped" in second.text
                assert client.close_reason is not None and client.close_reason.code == 1001


async def test_the_token_command_prints_the_daemons_token(tmp_path: pathlib.Path) -> None:
    run = partial(
        trio.run_process,
        [sys.executable, "-m", "agor_actors.cli", "token", "--data-dir", str(tmp_path / "agor")],
        capture_stdout=True,
        cwd=REPO,
    )
    async with open_hub(real_world(), data_dir=tmp_path / "agor") as hub:
        token = hub.owner_token
    assert len(token) >= 32
    assert (tmp_path / "agor" / "token").stat().st_mode & 0o777 == 0o600
    assert (await run()).stdout.decode().strip() == token
