"""``agor-actors backup``: a copy of a data dir that a daemon starts on,
made while a daemon runs on the original."""

from __future__ import annotations

import os
import pathlib
import stat

import pytest
import trio
from ops_support import daemon

from agor_actors.cli import main
from agor_actors.client import connect


async def test_a_backup_made_while_the_daemon_runs_holds_every_acknowledged_write(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The daemon's recent writes are in agor.db-wal: a copy of agor.db
    alone may hold none of them (on a young data dir, not even the tables).
    The backup is one consistent snapshot, with the token and the keys, and
    a daemon started on it has every write and takes the same token."""
    original, copy = tmp_path / "agor", tmp_path / "copy"
    async with daemon(original) as d:
        async with connect(d.ws_url, token=d.token) as client:
            made = [
                (await client.service("sessions").create({"title": f"s{i}"}))["id"]
                for i in range(20)
            ]
            argv = ["backup", "--data-dir", str(original), str(copy)]
            assert await trio.to_thread.run_sync(main, argv) == 0
            # written after the snapshot: not in it
            await client.service("sessions").create({"title": "later"})
        token = d.token
    (original / "web-secret").write_text("w" * 32 + "\n")  # (made by serve; kept if there)
    assert main(["backup", "--data-dir", str(original), str(tmp_path / "second")]) == 0
    assert (tmp_path / "second" / "web-secret").read_text() == "w" * 32 + "\n"
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [
        f"backed up {original} to {copy}: agor.db, token, jwt-secret",
        f"to run on the copy: agor-actors serve --data-dir {copy}",
    ]
    assert stat.S_IMODE(os.stat(copy).st_mode) == 0o700
    for name in ("agor.db", "token", "jwt-secret"):
        assert stat.S_IMODE(os.stat(copy / name).st_mode) == 0o600, name
        if name != "agor.db":
            assert (copy / name).read_text() == (original / name).read_text()
    async with daemon(copy) as restored, connect(restored.ws_url, token=token) as client:
        page = await client.service("sessions").find({"$limit": 100})
        assert sorted(s["id"] for s in page["data"]) == sorted(made)


def test_a_backup_refuses_what_it_cannot_do(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["backup", "--data-dir", str(empty), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(
        f"agor-actors backup: no SQLite database at {empty / 'agor.db'}: pass the daemon's"
        " --data-dir (a daemon on PostgreSQL is backed up with pg_dump"
    )
    assert not (tmp_path / "out").exists()
    (empty / "agor.db").write_text("not a database")
    assert main(["backup", "--data-dir", str(empty), str(tmp_path / "out")]) == 2
    assert "cannot back up" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing left half made
    (tmp_path / "taken").mkdir()
    assert main(["backup", "--data-dir", str(empty), str(tmp_path / "taken")]) == 2
    assert capsys.readouterr().err == (
        f"agor-actors backup: {tmp_path / 'taken'} exists: name a new directory\n"
    )
