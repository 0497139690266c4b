"""Running ``python -m sim`` from the tests (in a fresh process, as the
simulator requires: it pins ``PYTHONHASHSEED`` and owns trio's scheduler)."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[2]


def run_sim(
    tmp_path: pathlib.Path, *args: str, timeout_s: float = 120.0
) -> tuple[int, dict[str, Any], str]:
    """``python -m sim <args> --json FILE``: exit status, JSON, output."""
    out = tmp_path / f"sim-{len(list(tmp_path.glob('sim-*.json')))}.json"
    # its own process group: on a timeout the worker processes go too
    # (killing only the parent left them running, orphaned)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sim", *args, "--quiet", "--json", str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(
            f"python -m sim {' '.join(args)} took over {timeout_s} s:\n{(stdout + stderr)[-2000:]}"
        ) from None
    output = stdout + stderr
    if not out.exists():
        raise AssertionError(f"python -m sim {' '.join(args)} wrote no JSON:\n{output}")
    return proc.returncode, json.loads(out.read_text()), output
