"""Running ``python -m sim`` from the tests (in a fresh process, as the
simulator requires: it pins ``PYTHONHASHSEED`` and owns trio's scheduler)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[2]


def run_sim(
    tmp_path: pathlib.Path, *args: str, timeout_s: float = 120.0
) -> tuple[int, dict[str, Any], str]:
    """``python -m sim <args> --json FILE``: exit status, JSON, output."""
    out = tmp_path / f"sim-{len(list(tmp_path.glob('sim-*.json')))}.json"
    done = subprocess.run(
        [sys.executable, "-m", "sim", *args, "--quiet", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    output = done.stdout + done.stderr
    if not out.exists():
        raise AssertionError(f"python -m sim {' '.join(args)} wrote no JSON:\n{output}")
    return done.returncode, json.loads(out.read_text()), output
