"""The README's first-five-minutes examples, run as printed (the port
replaced by the test daemon's) against a real daemon whose data dir is
``.agor`` in the current directory, as after ``make serve``."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import sys

import pytest
import trio
from ops_support import REPO, daemon

README = (REPO / "README.md").read_text()
FIRST_MINUTES = README.split("## The first five minutes")[1].split("\n## ")[0]


def _block(language: str, containing: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", FIRST_MINUTES, re.S)
    [block] = [b for b in blocks if containing in b]
    return block


async def test_the_python_client_example_runs_as_printed(tmp_path: pathlib.Path) -> None:
    async with daemon(tmp_path / ".agor") as d:
        code = _block("python", "connect(").replace("3030", str(d.port))
        done = await trio.run_process(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr == b""
    lines = out.splitlines()
    assert "'streaming': False, 'rev': 2}" in lines[-1]  # the finish moved its rev
    chunks = re.findall(r"'chunk': '([^']*)'", out)
    assert "".join(chunks) == "Hello, world"


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("jq")), reason="needs curl and jq")
async def test_the_curl_example_runs_as_printed(tmp_path: pathlib.Path) -> None:
    async with daemon(tmp_path / ".agor") as d:
        script = _block("sh", "curl").replace("3030", str(d.port))
        done = await trio.run_process(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()
    out = done.stdout.decode()
    assert "Hello from curl" in out.splitlines()
    assert '"data":[]' in out.replace(" ", "")  # no tasks in the new session


def test_the_banner_shown_is_what_serve_prints() -> None:
    """The README's copy of the ready banner, as ``make serve`` prints it
    (the executable from the checkout's virtual environment)."""
    from agor_actors.server._serve import ready_banner

    shown = FIRST_MINUTES.split("what to try next:\n\n```\n")[1].split("```")[0]
    printed = ready_banner("127.0.0.1", 3030, pathlib.Path(".agor"), ".venv/bin/agor-actors")
    assert shown.rstrip("\n") == printed
