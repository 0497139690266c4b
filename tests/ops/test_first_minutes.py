"""The first five minutes, as a new user meets them: ``serve`` says where
to connect, where the token is and what to try next; the common mistakes
(a port in use, no daemon data here, no daemon at the URL, a wrong token)
each get one clear line instead of a traceback or a silent new owner."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import shlex
import socket
import subprocess

import pytest
import trio
from ops_support import CLI, daemon, free_port, running

from agor_actors.client import CallError, connect


async def _cli(*args: str, cwd: pathlib.Path) -> tuple[int, str, str]:
    done = await trio.run_process(
        [*CLI, *args],
        cwd=cwd,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "AGOR_DATA_DIR"},
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def test_serve_says_where_to_connect_and_what_to_try_next(tmp_path: pathlib.Path) -> None:
    data_dir = tmp_path / "data"
    argv = [*CLI, "serve", "--port", "0", "--data-dir", str(data_dir), "--log-format", "json"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    async with running(argv, cwd=tmp_path, env=env) as daemon_process:
        banner = daemon_process.stdout
        port = int(daemon_process.ws_url.rsplit(":", 1)[1].split("/")[0])
        assert f"ws://127.0.0.1:{port}/ws" in banner
        assert f"http://127.0.0.1:{port}/" in banner
        assert f"{data_dir / 'token'}" in banner
        # the commands it suggests work as printed
        [top_line] = [line for line in banner.splitlines() if " top " in line]
        top = shlex.split(top_line.strip())
        assert top[0] == "agor-actors"
        status, out, err = await _cli(*top[1:], cwd=tmp_path)
        assert status == 0, err
        assert "store:writer" in out
        [curl_line] = [line for line in banner.splitlines() if "curl " in line]
        token_command = re.search(r"\$\((agor-actors token[^)]*)\)", curl_line)
        assert token_command is not None
        status, out, err = await _cli(*shlex.split(token_command.group(1))[1:], cwd=tmp_path)
        assert status == 0, err
        assert out.strip() == (data_dir / "token").read_text().strip()
        assert await daemon_process.stop() == 0
    records = [json.loads(line) for line in daemon_process.stderr.splitlines()]
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    [ready] = [r for r in records if r["msg"] == "ready"]
    assert ready["ws_url"] == f"ws://127.0.0.1:{port}/ws"
    assert [r["msg"] for r in records][-1] == "stopped"


async def test_a_port_in_use_is_one_line_and_exit_2(tmp_path: pathlib.Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, out, err = await _cli(
            "serve", "--port", str(port), "--data-dir", str(tmp_path / "data"), cwd=tmp_path
        )
    assert status == 2
    assert err.splitlines() == [
        f"agor-actors serve: port {port} is already in use on 127.0.0.1 (another agor-actors?): "
        "stop it, or choose another port with --port N (make serve PORT=N)"
    ]
    assert out == ""
    assert not (tmp_path / "data").exists()  # nothing was opened before the port


@pytest.mark.parametrize("command", ["token", "top"])
async def test_token_and_top_never_create_a_token(tmp_path: pathlib.Path, command: str) -> None:
    status, out, err = await _cli(command, cwd=tmp_path)
    assert status == 2 and out == ""
    [line] = err.splitlines()
    assert line.startswith(f"agor-actors {command}: no daemon data here: ")
    assert str(tmp_path / ".agor" / "token") in line and "--data-dir" in line
    assert list(tmp_path.iterdir()) == []


async def test_the_token_command_renews_the_owners_token(tmp_path: pathlib.Path) -> None:
    """``token --rotate``: the running daemon makes a new owner token, the
    old one is refused, and ``token`` prints the new one from then on.
    Without a daemon: one line that says how else to renew it."""
    data_dir = tmp_path / "agor"
    async with daemon(data_dir) as d:
        old = d.token
        status, out, err = await _cli(
            "token", "--rotate", "--url", d.http_url, "--data-dir", str(data_dir), cwd=tmp_path
        )
        assert status == 0, err
        new = out.strip()
        assert new != old and d.token == new
        status, out, _ = await _cli("token", "--data-dir", str(data_dir), cwd=tmp_path)
        assert status == 0 and out.strip() == new
        async with connect(d.ws_url, token=new) as client:
            assert await client.service("boards").find() is not None
        with pytest.raises(CallError) as refused:
            async with connect(d.ws_url, token=old):
                pass  # pragma: no cover - refused
        assert refused.value.code == "unauthorized"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    status, out, err = await _cli(
        "token", "--rotate", "--url", url, "--data-dir", str(data_dir), cwd=tmp_path
    )
    assert status == 1 and out == ""
    first, second = err.splitlines()
    assert first.startswith(f"agor-actors token: cannot reach {url} (is it running?)")
    assert str(data_dir / "token") in second
    assert (data_dir / "token").read_text().strip() == new


async def test_top_without_a_daemon_or_with_a_wrong_token(tmp_path: pathlib.Path) -> None:
    port = free_port()
    status, _, err = await _cli(
        "top", "--url", f"http://127.0.0.1:{port}", "--token", "t", cwd=tmp_path
    )
    assert status == 1
    assert err.splitlines() == [
        f"agor-actors top: cannot connect to http://127.0.0.1:{port}/debug/actors: "
        "connection refused (is the daemon running? start it with agor-actors serve)"
    ]
    async with daemon(tmp_path / "agor") as d:
        status, _, err = await _cli("top", "--url", d.http_url, "--token", "wrong", cwd=tmp_path)
    assert status == 1
    assert err.splitlines() == [
        f"agor-actors top: {d.http_url}/debug/actors answered 401 Unauthorized: invalid token; "
        "the token from --token is not this daemon's owner token: "
        "pass the daemon's --data-dir or --token"
    ]


async def test_the_client_says_why_it_cannot_connect(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"ws://127.0.0.1:{free_port()}/ws"
    with pytest.raises(CallError) as refused:
        async with connect(url, token="t"):
            pass
    assert str(refused.value) == f"unavailable: cannot connect to {url}: connection refused"
    caplog.set_level(logging.INFO, logger="agor_actors.client")
    async with daemon(tmp_path / "agor") as d:
        with pytest.raises(CallError) as unauthorized:
            async with connect(d.ws_url, token="wrong"):
                pass
    assert unauthorized.value.code == "unauthorized"
    assert str(unauthorized.value) == (
        f"unauthorized: invalid token (the server at {d.ws_url} refused the token)"
    )
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_data_dir_or_database_that_cannot_be_opened_is_one_line(
    tmp_path: pathlib.Path,
) -> None:
    (tmp_path / "a-file").write_text("")
    status, _, err = await _cli(
        "serve", "--port", "0", "--data-dir", str(tmp_path / "a-file" / "data"), cwd=tmp_path
    )
    assert status == 2
    assert err.splitlines() == [
        f"agor-actors serve: cannot use {tmp_path / 'a-file' / 'data'} as the data dir: "
        "Not a directory"
    ]
    status, _, err = await _cli(  # the data dir itself a file ("File exists", was)
        "serve", "--port", "0", "--data-dir", str(tmp_path / "a-file"), cwd=tmp_path
    )
    assert status == 2
    assert err.splitlines() == [
        f"agor-actors serve: cannot use {tmp_path / 'a-file'} as the data dir: "
        "it is a file, not a directory"
    ]
    url = f"postgresql+psycopg://agor:secret@127.0.0.1:{free_port()}/agor"
    status, _, err = await _cli(
        "serve", "--port", "0", "--data-dir", str(tmp_path / "d"), "--db", url, cwd=tmp_path
    )
    assert status == 2
    [line] = err.splitlines()
    assert line.startswith(
        "agor-actors serve: cannot open the database "
        f"postgresql+psycopg://agor:***@127.0.0.1:{url.rsplit(':', 1)[1].split('/')[0]}/agor: "
    )
    assert "refused" in line and "secret" not in line


@pytest.mark.parametrize(
    ("arguments", "said"),
    [
        # the socket layer took 70000 as port 4464, without a word
        (
            ("--port", "70000"),
            "error: argument --port: 70000 is not a port: 0 (any free port) to 65535",
        ),
        (("--port", "-5"), "error: argument --port: -5 is not a port: 0 (any free port) to 65535"),
        (("--metrics-port", "http"), "error: argument --metrics-port: 'http' is not a port number"),
        # tokens were issued expired: every sign-in refused, and no word of why
        (
            ("--access-token-ttl", "0"),
            "--access-token-ttl and --refresh-token-ttl must be at least 1 second",
        ),
        (
            ("--refresh-token-ttl", "-1"),
            "--access-token-ttl and --refresh-token-ttl must be at least 1 second",
        ),
        # a key that is no PEM was reported as a database that cannot be opened
        (("--jwt-private-key", "a-file"), "cannot use the JWT keys: cannot read the key: "),
        # users stayed on every facepile for ever
        (
            ("--presence-grace", "inf"),
            "--node-heartbeat, --node-liveness and --presence-grace must be positive (and finite)",
        ),
    ],
    ids=[
        "port-70000",
        "port-negative",
        "metrics-port-word",
        "access-ttl",
        "refresh-ttl",
        "key",
        "grace-inf",
    ],
)
async def test_serve_refuses_settings_it_cannot_honour_in_one_line(
    tmp_path: pathlib.Path, arguments: tuple[str, ...], said: str
) -> None:
    (tmp_path / "a-file").write_text("not a key\n")
    data = tmp_path / "data"
    status, out, err = await _cli(
        "serve", "--port", "0", "--data-dir", str(data), *arguments, cwd=tmp_path
    )
    assert status == 2 and out == ""
    assert err.splitlines()[-1].startswith(f"agor-actors serve: {said}"), err


@pytest.mark.parametrize("watch", ["inf", "-1", "nan", "often"])
async def test_top_refuses_a_watch_that_is_no_number_of_seconds(
    tmp_path: pathlib.Path, watch: str
) -> None:
    """``top --watch inf`` ended in a traceback (``time.sleep``'s
    OverflowError); -1 and nan drew once without a word."""
    status, out, err = await _cli("top", "--watch", watch, cwd=tmp_path)
    assert status == 2 and out == ""
    assert err.splitlines()[-1].startswith(
        f"agor-actors top: error: argument --watch: {watch!r}"
        if watch == "often"
        else f"agor-actors top: error: argument --watch: {watch} is not a number of seconds"
    ), err


async def test_serve_with_a_metrics_port(tmp_path: pathlib.Path) -> None:
    """``--metrics-port``: the banner names the metrics URL, a scrape with the
    ``--metrics-token`` works there; a metrics port in use is one line."""
    import urllib.request

    metrics_port = free_port()
    data_dir = tmp_path / "data"
    argv = [*CLI, "serve", "--port", "0", "--data-dir", str(data_dir)]
    argv += ["--metrics-port", str(metrics_port), "--metrics-token", "scrape"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    async with running(argv, cwd=tmp_path, env=env) as daemon_process:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        assert f"metrics    {url}" in daemon_process.stdout

        def get() -> str:
            request = urllib.request.Request(url, headers={"Authorization": "Bearer scrape"})
            with urllib.request.urlopen(request, timeout=10) as response:
                return str(response.read().decode())

        assert "agor_connections" in await trio.to_thread.run_sync(get)
        status, _, err = await _cli(
            "serve",
            "--port",
            "0",
            "--metrics-port",
            str(metrics_port),
            "--data-dir",
            str(tmp_path / "other"),
            cwd=tmp_path,
        )
        assert status == 2
        assert err.splitlines() == [
            f"agor-actors serve: port {metrics_port} is already in use on 127.0.0.1 (another"
            " agor-actors?): stop it, or choose another port with --metrics-port N"
        ]
        assert await daemon_process.stop() == 0


async def test_serve_with_metrics_port_0_names_the_port_it_took(tmp_path: pathlib.Path) -> None:
    """``--metrics-port 0`` takes any free port, and the banner names that
    one (it said 0)."""
    import re
    import urllib.request

    argv = [*CLI, "serve", "--port", "0", "--data-dir", str(tmp_path / "data")]
    argv += ["--metrics-port", "0", "--metrics-token", "scrape"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    async with running(argv, cwd=tmp_path, env=env) as daemon_process:
        found = re.search(r"metrics    (http://127\.0\.0\.1:(\d+)/metrics)", daemon_process.stdout)
        assert found is not None and int(found.group(2)) > 0, daemon_process.stdout
        url = found.group(1)

        def get() -> str:
            request = urllib.request.Request(url, headers={"Authorization": "Bearer scrape"})
            with urllib.request.urlopen(request, timeout=10) as response:
                return str(response.read().decode())

        assert "agor_connections" in await trio.to_thread.run_sync(get)
        assert await daemon_process.stop() == 0


async def test_top_finds_the_daemon_through_its_data_dir_and_creates_nothing(
    tmp_path: pathlib.Path,
) -> None:
    """``top --data-dir D`` (no ``--url``) reads the URL and the token the
    daemon wrote there, from a directory where it then leaves nothing;
    ``--watch`` redraws in place with rates per connection."""
    data_dir = tmp_path / "data"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    argv = [*CLI, "serve", "--port", "0", "--data-dir", str(data_dir)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    async with running(argv, cwd=tmp_path, env=env) as daemon_process:
        assert (data_dir / "url").read_text().strip() == daemon_process.http_url
        assert (data_dir / "url").stat().st_mode & 0o777 == 0o600
        async with connect(
            daemon_process.ws_url, token=(data_dir / "token").read_text().strip()
        ) as c:
            await c.service("sessions").create({"title": "seen by top"})
            connection_id = c.connection_id
            status, out, err = await _cli("top", "--data-dir", str(data_dir), cwd=elsewhere)
            assert status == 0, err
            assert connection_id is not None and connection_id in out
            watch = await trio.lowlevel.open_process(
                [*CLI, "top", "--data-dir", str(data_dir), "--watch", "0.2"],
                cwd=elsewhere,
                stdout=subprocess.PIPE,
                env=env,
            )
            assert watch.stdout is not None
            seen = b""
            try:
                with trio.fail_after(20):
                    while seen.count(b"\x1b[H") < 3:
                        seen += await watch.stdout.receive_some()
            finally:
                watch.kill()
                await watch.wait()
                await watch.stdout.aclose()
        third = seen.decode().split("\x1b[H")[2]
        line = next(x for x in third.splitlines() if x.startswith(connection_id))
        assert re.search(r" \d+\.\d/\d+\.\d ", line)  # frames a second, in and out
        assert list(elsewhere.iterdir()) == []  # nothing made where top ran
        assert await daemon_process.stop() == 0
    assert not (data_dir / "url").exists()
