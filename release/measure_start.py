"""Size and start time of the one-file executable, next to the same daemon
started from the virtual environment (runs interleaved, one after the other).

    python release/measure_start.py [--executable dist/agor-actors] [--runs 5]

Each run copies nothing new: the executable sits alone in an empty
temporary directory and is started there with ``env -i PATH=/usr/bin:/bin``
and a fresh data dir.  Printed per kind: the median (min-max) seconds from
the spawn to the ready banner on stdout, and to the first ``/health`` 200.
The one-file executable unpacks itself into a temporary directory at every
start, so each of its starts is a cold one as far as its own files go (the
operating system's page cache stays warm after the first).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
BANNER_RE = re.compile(rb"WebSocket\s+ws://127\.0\.0\.1:(\d+)/ws")


def start_once(argv: list[str], cwd: pathlib.Path, env: dict[str, str]) -> tuple[float, float]:
    """(seconds to the banner, seconds to the first /health 200)."""
    started = time.perf_counter()
    process = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert process.stdout is not None
        seen = b""
        while (found := BANNER_RE.search(seen)) is None:
            line = process.stdout.readline()
            if not line:
                raise RuntimeError(f"{argv[0]} ended before its banner")
            seen += line
        banner_s = time.perf_counter() - started
        url = f"http://127.0.0.1:{int(found.group(1))}/health"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.005)
        return banner_s, time.perf_counter() - started
    finally:
        process.terminate()
        process.wait(timeout=15)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--executable", type=pathlib.Path, default=ROOT / "dist" / "agor-actors")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    built: pathlib.Path = args.executable
    if not built.exists():
        print(f"no {built}: make dist first", file=sys.stderr)
        return 2
    venv_cli = pathlib.Path(sys.executable).parent / "agor-actors"
    timings: dict[str, list[tuple[float, float]]] = {"executable": [], "venv": []}
    with tempfile.TemporaryDirectory() as tmp:
        alone = pathlib.Path(tmp) / "empty"
        alone.mkdir()
        shutil.copy2(built, alone / "agor-actors")
        for run in range(args.runs):
            for kind in ("executable", "venv"):
                data = pathlib.Path(tmp) / f"data-{kind}-{run}"
                if kind == "executable":
                    command = ["./agor-actors"]
                    env = {"PATH": "/usr/bin:/bin"}
                else:
                    command = [str(venv_cli)]
                    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
                serve = [*command, "serve", "--port", "0", "--data-dir", str(data)]
                timings[kind].append(start_once(serve, alone, env))
    size_mb = built.stat().st_size / 1e6
    print(f"{built}: {size_mb:.1f} MB")
    for kind, runs in timings.items():
        banner = [b for b, _ in runs]
        health = [h for _, h in runs]
        print(
            f"{kind:<10} ready banner {statistics.median(banner):.2f} s "
            f"({min(banner):.2f}-{max(banner):.2f}), first /health 200 "
            f"{statistics.median(health):.2f} s ({min(health):.2f}-{max(health):.2f}), "
            f"{len(runs)} runs"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
