"""The JavaScript client (``agor_actors/web/agor-client.js``) against a real
daemon: ``node --test tests/web/client_test.mjs`` must pass."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest
from web_support import REPO, daemon_process, request

NODE = shutil.which("node")


def _node_major() -> int:
    assert NODE is not None
    out = subprocess.run([NODE, "--version"], capture_output=True, text=True, check=True).stdout
    return int(out.strip().lstrip("v").split(".")[0])


@pytest.mark.slow
@pytest.mark.skipif(NODE is None, reason="node (20+) is not installed: apt-get install -y nodejs")
def test_the_js_client_passes_its_node_tests(tmp_path: pathlib.Path) -> None:
    major = _node_major()
    if major < 20:
        pytest.skip(f"node {major} is too old: the client needs Node 20+")
    flags = ["--experimental-websocket"] if major < 22 else []
    # access tokens live 3 s: the client's renewal and 4002 test
    with daemon_process(tmp_path / "agor", ("--access-token-ttl", "3")) as daemon:
        env = {**os.environ, "AGOR_URL": daemon.ws_url, "AGOR_TOKEN": daemon.token}
        assert NODE is not None
        result = subprocess.run(
            [NODE, *flags, "--test", "--test-reporter=tap", "tests/web/client_test.mjs"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "# fail 0" in result.stdout and "# pass 16" in result.stdout, result.stdout[-3000:]


def test_the_daemon_serves_the_client_module_and_the_page(tmp_path: pathlib.Path) -> None:
    with daemon_process(tmp_path / "agor") as daemon:
        status, headers, body = request("GET", daemon.http_url + "/client/agor-client.js")
        assert status == 200 and headers["content-type"].startswith("text/javascript")
        assert "export async function connect" in body
        on_disk = (REPO / "agor_actors" / "web" / "agor-client.js").read_text()
        assert body == on_disk
        status, headers, body = request("GET", daemon.http_url + "/")
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert "/web/app.js" in body and "default-src 'self'" in headers["content-security-policy"]
        status, _, _ = request("GET", daemon.http_url + "/web/style.css")
        assert status == 200
        status, _, body = request("GET", daemon.http_url + "/web/../token")
        assert status >= 400 and daemon.token not in str(body)
        status, _, body = request("GET", daemon.http_url + "/web/secret.txt")
        assert status == 404 and body["code"] == "not_found"


@pytest.mark.skipif(NODE is None, reason="node (20+) is not installed: apt-get install -y nodejs")
def test_the_js_client_follows_the_golden_vectors() -> None:
    assert NODE is not None
    result = subprocess.run(
        [NODE, "--test", "--test-reporter=tap", "tests/web/vectors_test.mjs"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "# fail 0" in result.stdout and "# pass 12" in result.stdout, result.stdout[-3000:]
