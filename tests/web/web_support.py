"""A real daemon (``python -m agor_actors.cli serve``) in a subprocess, for the
tests that drive it from Node or Chromium, and small HTTP helpers."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 15.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DaemonProcess:
    """``agor-actors serve`` on ``port`` with ``data_dir``; restartable."""

    def __init__(self, data_dir: pathlib.Path, port: int, extra_args: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.port = port
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None
        self.log = bytearray()
        self._listening = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def token(self) -> str:
        return (self.data_dir / "token").read_text().strip()

    def start(self) -> None:
        self._listening.clear()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agor_actors.cli",
                "serve",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
                *self.extra_args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._reader = threading.Thread(target=self._pump, args=(self.process,), daemon=True)
        self._reader.start()
        if not self._listening.wait(START_TIMEOUT_S):
            self.stop()
            raise RuntimeError(f"the daemon did not start: {self.text}")

    def _pump(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            self.log.extend(line)
            if b"listening on" in line:
                self._listening.set()

    @property
    def text(self) -> str:
        return self.log.decode("utf-8", "replace")

    def kill(self) -> None:
        """SIGKILL, no drain (as a crash)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.stop()

    def stop(self) -> None:
        """SIGTERM: drain and exit."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self._reader is not None:
            self._reader.join(5)
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()


@contextmanager
def daemon_process(
    data_dir: pathlib.Path, extra_args: tuple[str, ...] = ()
) -> Iterator[DaemonProcess]:
    daemon = DaemonProcess(data_dir, free_port(), extra_args)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


def request(
    method: str,
    url: str,
    *,
    token: str | None = None,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """One HTTP request: (status, lower-cased headers, JSON body or text)."""
    data = None if body is None else json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=all_headers)

    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(req, timeout=10) as response:
            status, raw, got = response.status, response.read(), response.headers
    except urllib.error.HTTPError as exc:
        with exc:
            status, raw, got = exc.code, exc.read(), exc.headers
    lowered = {k.lower(): v for k, v in got.items()}
    if "set-cookie" in lowered:
        lowered["set-cookie"] = "\n".join(got.get_all("Set-Cookie") or [])
    text = raw.decode("utf-8", "replace")
    try:
        return status, lowered, json.loads(text)
    except ValueError:
        return status, lowered, text
