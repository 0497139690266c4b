"""The data dir is private whatever the umask, and one runtime at a time
holds it: a second daemon exits 2 with one clear line, an embedded runtime
gets :class:`DataDirLocked`."""

from __future__ import annotations

import collections.abc
import os
import pathlib
import stat
import subprocess

import pytest
import trio
from ops_support import CLI, free_port, running

from agor_actors.embed import DataDirLocked, open_runtime


def _mode(path: pathlib.Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o022, 0o000])
def umask(request: pytest.FixtureRequest) -> collections.abc.Iterator[int]:
    mask = int(request.param)
    old = os.umask(mask)
    try:
        yield mask
    finally:
        os.umask(old)


async def test_data_dir_and_its_files_are_private(tmp_path: pathlib.Path, umask: int) -> None:
    data_dir = tmp_path / "agor"
    async with open_runtime(data_dir=data_dir) as rt:
        session = await rt.create_session(title="private")
        async with rt.reporter(session["id"]).message(None) as stream:
            await stream.write("secret words")
        # while it runs the WAL and the shared memory file exist
        present = {p.name for p in data_dir.iterdir()}
        assert {"agor.db", "agor.db-wal", "agor.db-shm", "token", "lock"} <= present
        assert _mode(data_dir) == 0o700
        for path in data_dir.iterdir():
            assert _mode(path) == 0o600, (path.name, oct(_mode(path)))


async def test_files_left_wide_open_are_narrowed(tmp_path: pathlib.Path, umask: int) -> None:
    async with open_runtime(data_dir=tmp_path):
        pass
    os.chmod(tmp_path, 0o755)
    for path in tmp_path.iterdir():
        os.chmod(path, 0o644)
    async with open_runtime(data_dir=tmp_path):
        assert _mode(tmp_path) == 0o700
        assert {path.name: _mode(path) for path in tmp_path.iterdir()} == {
            path.name: 0o600 for path in tmp_path.iterdir()
        }


async def test_a_second_runtime_in_this_process_is_refused(tmp_path: pathlib.Path) -> None:
    async with open_runtime(data_dir=tmp_path):
        with pytest.raises(DataDirLocked, match="in use by another agor-actors process"):
            async with open_runtime(data_dir=tmp_path):
                pass  # pragma: no cover
    async with open_runtime(data_dir=tmp_path):  # released on the way out
        pass


async def test_a_second_daemon_on_the_same_dir_exits_2(tmp_path: pathlib.Path) -> None:
    data_dir = tmp_path / "agor"
    first = [*CLI, "serve", "--port", str(free_port()), "--data-dir", str(data_dir)]
    async with running(first, cwd=tmp_path) as daemon:
        second = await trio.run_process(
            [*CLI, "serve", "--port", str(free_port()), "--data-dir", str(data_dir)],
            cwd=tmp_path,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        assert second.returncode == 2
        lines = second.stderr.decode().strip().splitlines()
        assert len(lines) == 1, lines
        assert "in use by another agor-actors process" in lines[0]
        assert f"(pid {daemon.process.pid})" in lines[0]
        # an embedded runtime in this process is refused too
        with pytest.raises(DataDirLocked):
            async with open_runtime(data_dir=data_dir):
                pass  # pragma: no cover
        assert daemon.process.returncode is None  # the first one is untouched
        assert await daemon.stop() == 0
    async with open_runtime(data_dir=data_dir):  # free once it exited
        pass
