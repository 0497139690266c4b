"""Load generation shared by ``bench/fanout.py`` and ``bench/presence.py``.

* Servers in their own processes: the daemon (``agor-actors serve`` on a
  temporary data dir) and ``bench/bare_ws.py``, both on 127.0.0.1 with a
  port picked by the kernel (read back from their output).
* What a process costs, from ``/proc``: CPU seconds (utime + stime, all
  threads) and memory (VmRSS, VmHWM).
* :class:`Peer`: one protocol connection, the protocol's own client machine
  (``protocols.ClientConnection``) over a trio-websocket connection; calls
  awaited (:meth:`Peer.request`) or fired at a pace (:meth:`Peer.fire`).
* Receivers in load processes of their own (:class:`Workers`): many
  :class:`Receiver` connections per process, each joined to one room; they
  take the send time out of every chunk they apply (``t<ns> s<step>`` at the
  start of the chunk text; merged chunks carry several) and record the
  latency in a :class:`Histogram` per step.  ``time.monotonic_ns`` is the
  same clock in every process of the machine, so producer and receivers
  need no synchronisation.

Every loop here is bounded in count or in time.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import multiprocessing.connection
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
import trio_websocket

from agor_actors.client import open_websocket
from agor_actors.server import tune_gc
from protocols import (
    CallResult,
    ClientConnection,
    Codec,
    Event,
    EventApplied,
    LocalProtocolError,
    Presence,
    PresenceChanged,
    ProtocolViolation,
    ResumeRequested,
    RoomJoined,
    RoomStatus,
    ServerError,
    Welcomed,
)

BENCH_DIR = pathlib.Path(__file__).resolve().parent
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
STAMP = re.compile(r"t(\d+) s(\d+) ")
"""The send time (monotonic ns) and step of a chunk, at its start."""

# ------------------------------------------------------------------ processes


def cpu_seconds(pid: int) -> float:
    """CPU time used so far by process ``pid`` (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as file:
        text = file.read()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of process ``pid``, in KiB."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(rest.split()[0])
    return found


class CpuMeter:
    """CPU used by a process over a window, as a share of one core."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.cpu0 = cpu_seconds(pid)
        self.t0 = time.monotonic()

    def percent(self) -> float:
        elapsed = max(1e-9, time.monotonic() - self.t0)
        return 100.0 * (cpu_seconds(self.pid) - self.cpu0) / elapsed


@attrs.define
class ServerProcess:
    """A server started by :func:`start_daemon` or :func:`start_bare`."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    token: str
    log_path: pathlib.Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.port}/ws"

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout_s``; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout_s)


def _wait_for_port(proc: subprocess.Popen[bytes], log_path: pathlib.Path, timeout_s: float) -> int:
    pattern = re.compile(rf"listening on {re.escape(HOST)}:(\d+)")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        match = pattern.search(log_path.read_text(errors="replace"))
        if match:
            return int(match.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    raise RuntimeError(
        f"{proc.args!r} did not start listening:\n{log_path.read_text(errors='replace')[-2000:]}"
    )


def _agor_actors() -> list[str]:
    script = pathlib.Path(sys.executable).with_name("agor-actors")
    if script.exists():
        return [str(script)]
    found = shutil.which("agor-actors")
    return [found] if found else [sys.executable, "-m", "agor_actors.cli"]


def start_daemon(work: pathlib.Path, timeout_s: float = 60.0) -> ServerProcess:
    """``agor-actors serve`` on 127.0.0.1, a free port and ``work/agor``."""
    work.mkdir(parents=True, exist_ok=True)
    data_dir = work / "agor"
    log_path = work / "daemon.log"
    argv = [
        *_agor_actors(),
        "serve",
        "--host",
        HOST,
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
        "--log-level",
        "INFO",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    port = _wait_for_port(proc, log_path, timeout_s)
    token = (data_dir / "token").read_text().strip()
    return ServerProcess("agor daemon", proc, port, token, log_path)


def start_bare(work: pathlib.Path, timeout_s: float = 30.0) -> ServerProcess:
    """``bench/bare_ws.py`` on 127.0.0.1 and a free port."""
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "bare.log"
    token = os.urandom(16).hex()
    argv = [sys.executable, str(BENCH_DIR / "bare_ws.py"), "--port", "0", "--token", token]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    port = _wait_for_port(proc, log_path, timeout_s)
    return ServerProcess("bare trio-websocket", proc, port, token, log_path)


# ----------------------------------------------------------------- histogram


class Histogram:
    """Latencies in microseconds, in log buckets 1/64 wide (1.6%), with the
    exact maximum.  ``missing`` counts deliveries that never came: they rank
    above everything (a percentile that falls among them is infinite)."""

    __slots__ = ("buckets", "count", "max_us", "missing")

    def __init__(self) -> None:
        self.buckets: Counter[int] = Counter()
        self.count = 0
        self.max_us = 0
        self.missing = 0

    def record(self, us: int) -> None:
        if us < 0:
            us = 0
        shift = us.bit_length() - 7
        self.buckets[us if shift <= 0 else (shift << 7) | (us >> shift)] += 1
        self.count += 1
        if us > self.max_us:
            self.max_us = us

    def merge(self, other: Histogram) -> None:
        self.buckets.update(other.buckets)
        self.count += other.count
        self.missing += other.missing
        self.max_us = max(self.max_us, other.max_us)

    def percentile_ms(self, q: float) -> float:
        total = self.count + self.missing
        if total == 0:
            return math.nan
        rank = max(1, math.ceil(q * total))
        if rank > self.count:
            return math.inf
        seen = 0
        for key in sorted(self.buckets):
            seen += self.buckets[key]
            if seen >= rank:
                if key < 128:
                    return key / 1000
                shift, mantissa = key >> 7, key & 127
                return ((mantissa << shift) + (1 << (shift - 1))) / 1000
        return self.max_us / 1000

    @property
    def max_ms(self) -> float:
        return math.inf if self.missing else self.max_us / 1000


def chunk_text(step: int, size: int) -> str:
    """A chunk that starts with its send time and step, padded to ``size``."""
    head = f"t{time.monotonic_ns()} s{step} "
    return head + "x" * max(1, size - len(head))


# ---------------------------------------------------------------------- peers


class PeerError(Exception):
    pass


class Peer:
    """One connection driven by the protocol's client machine.  Start
    :meth:`run` (the reader and the heartbeat) in a nursery, then
    :meth:`handshake`."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, codec: Codec, name: str) -> None:
        self.ws = ws
        self.codec = codec
        self.name = name
        self.machine = ClientConnection(codec=codec, client_id=name)
        self.welcomed = trio.Event()
        self.heartbeat_s = 15.0
        self.closed: str | None = None
        self.ok = 0
        self.failed: Counter[str] = Counter()
        self.violations = 0
        self._results: dict[int, Any] = {}
        self._waiting: dict[int, trio.Event] = {}
        self._fired: set[int] = set()
        self._changed = trio.lowlevel.ParkingLot()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._heartbeat)
            task_status.started()
            await self._read()
            nursery.cancel_scope.cancel()

    async def _read(self) -> None:
        try:
            while True:
                frame = await self.ws.get_message()
                now_ns = time.monotonic_ns()
                self.received(frame, now_ns)
                for event in self.machine.receive_data(frame, now_ns / 1e9):
                    if isinstance(event, EventApplied):
                        self.applied(event.event, now_ns)
                    elif isinstance(event, CallResult):
                        self._result(event.result)
                    elif isinstance(event, ResumeRequested):
                        await self.ws.send_message(event.data)
                    elif isinstance(event, PresenceChanged):
                        self.presence(event.presence, now_ns)
                    elif isinstance(event, RoomJoined):
                        self._changed.unpark_all()
                    elif isinstance(event, Welcomed):
                        self.heartbeat_s = event.welcome.heartbeat_ms / 1000
                        self.welcomed.set()
                    elif isinstance(event, ProtocolViolation | ServerError):
                        self.violations += 1
        except (trio_websocket.ConnectionClosed, trio.BrokenResourceError) as exc:
            self.closed = repr(exc)
        finally:
            self._changed.unpark_all()
            for waiter in self._waiting.values():
                waiter.set()

    def applied(self, event: Event, now_ns: int) -> None:
        """A room event, once, in order (override)."""

    def received(self, frame: str | bytes, now_ns: int) -> None:
        """Every frame, before it is handled (override)."""

    def presence(self, presence: Presence, now_ns: int) -> None:
        """A presence message (override)."""

    def _result(self, result: Any) -> None:
        if result.ok:
            self.ok += 1
        else:
            self.failed[result.error.code if result.error else "?"] += 1
        waiter = self._waiting.pop(result.ref, None)
        if waiter is not None:
            self._results[result.ref] = result
            waiter.set()
        self._fired.discard(result.ref)
        self._changed.unpark_all()

    async def _heartbeat(self) -> None:
        while True:
            await trio.sleep(self.heartbeat_s * 0.8)
            if self.welcomed.is_set() and self.closed is None:
                try:
                    await self.ws.send_message(self.machine.ping(trio.current_time()))
                except (trio_websocket.ConnectionClosed, trio.BrokenResourceError):
                    return

    async def handshake(self, token: str, timeout_s: float = 30.0) -> None:
        with trio.fail_after(timeout_s):
            await self.ws.send_message(self.machine.hello(token))
            await self.welcomed.wait()

    async def join(self, room: str, timeout_s: float = 60.0) -> None:
        """Join ``room`` and wait for ``joined``."""
        with trio.fail_after(timeout_s):
            await self.ws.send_message(self.machine.join(room))
            await self._until(lambda: self._live(room))

    def _live(self, room: str) -> bool:
        track = self.machine.rooms.get(room)
        return track is not None and track.status is RoomStatus.LIVE

    async def _until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            if self.closed is not None:
                raise PeerError(f"{self.name}: connection closed: {self.closed}")
            await self._changed.park()

    async def _slot(self) -> None:
        await self._until(lambda: self.machine.can_call)

    async def request(
        self, service: str, method: str, *, id: str | None = None, data: Any = None
    ) -> Any:
        """A call, awaited: its result data (raises :class:`PeerError`)."""
        with trio.fail_after(60):
            await self._slot()
            ref, frame = self.machine.call(service, method, id=id, data=data)
            waiter = self._waiting[ref] = trio.Event()
            await self.ws.send_message(frame)
            await waiter.wait()
        result = self._results.pop(ref, None)
        if result is None:
            raise PeerError(f"{self.name}: {service}.{method}: connection lost")
        if not result.ok:
            raise PeerError(f"{self.name}: {service}.{method}: {result.error}")
        return result.data

    async def fire(
        self, service: str, method: str, *, id: str | None = None, data: Any = None
    ) -> None:
        """A call whose result is only counted (``ok``, ``failed``); waits
        only for a free slot (``max_pending_calls``)."""
        await self._slot()
        try:
            ref, frame = self.machine.call(service, method, id=id, data=data)
        except LocalProtocolError as exc:
            raise PeerError(f"{self.name}: {exc}") from None
        self._fired.add(ref)
        await self.ws.send_message(frame)

    async def settle(self, timeout_s: float) -> bool:
        """Wait until every fired call is answered; False on timeout."""
        with trio.move_on_after(timeout_s):
            await self._until(lambda: not self._fired)
            return True
        return False


@asynccontextmanager
async def open_peer(
    url: str,
    token: str,
    *,
    codec: Codec = Codec.JSON,
    name: str = "peer",
    factory: Callable[[trio_websocket.WebSocketConnection, Codec, str], Peer] = Peer,
) -> AsyncIterator[Peer]:
    """A welcomed :class:`Peer` for the block (closed on exit)."""
    async with (
        open_websocket(url, subprotocols=[codec.subprotocol], connect_timeout_s=30.0) as ws,
        trio.open_nursery() as nursery,
    ):
        peer = factory(ws, codec, name)
        await nursery.start(peer.run)
        try:
            await peer.handshake(token)
            yield peer
        finally:
            nursery.cancel_scope.cancel()


# ----------------------------------------------------------------- receivers


class StepStats:
    """What the receivers of one load process saw of one step."""

    def __init__(self) -> None:
        self.histogram = Histogram()
        self.first_ns = 0
        self.last_ns = 0


class Receiver(Peer):
    """A client in one room that takes the latency out of every chunk."""

    room = ""
    steps: dict[int, StepStats]

    def __init__(self, ws: trio_websocket.WebSocketConnection, codec: Codec, name: str) -> None:
        super().__init__(ws, codec, name)
        self.counts: Counter[int] = Counter()
        self.frames = 0
        self.bytes = 0

    def applied(self, event: Event, now_ns: int) -> None:
        data = event.data
        if type(data) is not dict:
            return
        chunk = data.get("chunk")
        if type(chunk) is not str:
            return
        for match in STAMP.finditer(chunk):
            step = int(match.group(2))
            stats = self.steps.get(step)
            if stats is None:
                stats = self.steps[step] = StepStats()
                stats.first_ns = now_ns
            stats.histogram.record((now_ns - int(match.group(1))) // 1000)
            if now_ns > stats.last_ns:
                stats.last_ns = now_ns
            self.counts[step] += 1


async def _hold_receiver(
    url: str,
    token: str,
    codec: Codec,
    name: str,
    room: str,
    steps: dict[int, StepStats],
    gate: trio.Semaphore,
    receivers: list[Receiver],
    failures: list[str],
    stop: trio.Event,
) -> None:
    """Connect and join (at most ``gate`` at a time), then hold the
    connection until ``stop``."""
    await gate.acquire()
    held = True
    try:
        async with open_peer(url, token, codec=codec, name=name, factory=Receiver) as peer:
            assert isinstance(peer, Receiver)
            peer.room = room
            peer.steps = steps
            await peer.join(room)
            gate.release()
            held = False
            receivers.append(peer)
            await stop.wait()
    except (PeerError, trio_websocket.HandshakeError, trio.TooSlowError, OSError) as exc:
        failures.append(f"{name}: {exc!r}")
    finally:
        if held:
            gate.release()


def receiver_worker(conn: multiprocessing.connection.Connection, spec: dict[str, Any]) -> None:
    """A load process: ``spec["clients"]`` receivers (``(name, room)``),
    driven by commands on ``conn`` (see :class:`Workers`).  It takes the
    daemon's GC settings, so that the load spends no more of the shared
    cores on the collector than it must."""
    tune_gc()
    trio.run(_receiver_worker, conn, spec)


async def _receiver_worker(
    conn: multiprocessing.connection.Connection, spec: dict[str, Any]
) -> None:
    codec = Codec(spec["codec"])
    clients: list[tuple[str, str]] = spec["clients"]
    steps: dict[int, StepStats] = {}
    receivers: list[Receiver] = []
    failures: list[str] = []
    stop = trio.Event()
    pid = os.getpid()
    async with trio.open_nursery() as nursery:
        gate = trio.Semaphore(spec.get("connect_concurrency", 32))
        for name, room in clients:
            nursery.start_soon(
                _hold_receiver,
                spec["url"],
                spec["token"],
                codec,
                name,
                room,
                steps,
                gate,
                receivers,
                failures,
                stop,
            )
        with trio.move_on_after(spec.get("connect_timeout_s", 120.0)):
            while len(receivers) + len(failures) < len(clients):
                await trio.sleep(0.05)
        conn.send(("ready", {"connected": len(receivers), "failures": failures[:5]}))
        for _ in range(100_000):
            command = await trio.to_thread.run_sync(conn.recv, abandon_on_cancel=True)
            if command[0] == "collect":
                _, step, expected, timeout_s = command
                conn.send(
                    ("collected", await _collect(receivers, steps, step, expected, timeout_s, pid))
                )
            elif command[0] == "stop":
                closed = sum(1 for r in receivers if r.closed is not None)
                totals = Counter[str]()
                for receiver in receivers:
                    stats = receiver.machine.statistics()
                    totals.update(
                        lagged=stats.lagged,
                        gaps=stats.gaps,
                        reloads=stats.reloads - 1,  # the first join loads the room
                        resumes=stats.resumes,
                        violations=receiver.violations,
                    )
                conn.send(("stopped", {"closed": closed, **totals}))
                stop.set()
                nursery.cancel_scope.deadline = trio.current_time() + 5.0
                return
            else:
                raise RuntimeError(f"unknown command {command!r}")


async def _collect(
    receivers: list[Receiver],
    steps: dict[int, StepStats],
    step: int,
    expected: dict[str, int],
    timeout_s: float,
    pid: int,
) -> dict[str, Any]:
    """Wait (up to ``timeout_s``) until every receiver has applied the
    ``expected`` number of chunks of ``step`` in its room; the step's
    latencies, with what never came counted as missing."""

    def missing() -> int:
        return sum(max(0, expected.get(r.room, 0) - r.counts[step]) for r in receivers)

    with trio.move_on_after(timeout_s):
        while missing():
            await trio.sleep(0.02)
    stats = steps.get(step) or StepStats()
    stats.histogram.missing = missing()
    return {
        "histogram": stats.histogram,
        "first_ns": stats.first_ns,
        "last_ns": stats.last_ns,
        "cpu_s": cpu_seconds(pid),
    }


class Workers:
    """Load processes holding receivers; blocking methods (call them from a
    thread when inside trio)."""

    def __init__(
        self,
        url: str,
        token: str,
        clients: list[tuple[str, str]],
        *,
        processes: int = 1,
        codec: Codec = Codec.JSON,
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipes: list[multiprocessing.connection.Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.clients = len(clients)
        processes = max(1, min(processes, len(clients)))
        for i in range(processes):
            ours, theirs = context.Pipe()
            spec = {
                "url": url,
                "token": token,
                "codec": codec.value,
                "clients": clients[i::processes],
            }
            proc = context.Process(target=receiver_worker, args=(theirs, spec), daemon=True)
            proc.start()
            theirs.close()
            self.pipes.append(ours)
            self.procs.append(proc)

    def _receive(self, pipe: multiprocessing.connection.Connection, timeout_s: float) -> Any:
        try:
            if not pipe.poll(timeout_s):
                raise RuntimeError(f"a load process did not answer within {timeout_s:.0f} s")
            return pipe.recv()
        except EOFError:
            raise RuntimeError("a load process exited (see its traceback above)") from None

    def ready(self, timeout_s: float = 180.0) -> int:
        """Wait until every receiver is connected and joined; how many are."""
        connected = 0
        for pipe in self.pipes:
            kind, info = self._receive(pipe, timeout_s)
            assert kind == "ready"
            connected += info["connected"]
            if info["failures"]:
                print(f"# receivers failed to connect: {info['failures']}", file=sys.stderr)
        return connected

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def collect(self, step: int, expected: dict[str, int], timeout_s: float) -> dict[str, Any]:
        for pipe in self.pipes:
            pipe.send(("collect", step, expected, timeout_s))
        merged = Histogram()
        first = last = 0
        for pipe in self.pipes:
            kind, info = self._receive(pipe, timeout_s + 30)
            assert kind == "collected"
            merged.merge(info["histogram"])
            if info["first_ns"]:
                first = info["first_ns"] if not first else min(first, info["first_ns"])
            last = max(last, info["last_ns"])
        return {"histogram": merged, "first_ns": first, "last_ns": last}

    def stop(self) -> dict[str, int]:
        totals: Counter[str] = Counter()
        for pipe in self.pipes:
            try:
                pipe.send(("stop",))
                _, info = self._receive(pipe, 30)
                totals.update(info)
            except (OSError, EOFError, RuntimeError):
                totals["unanswered"] += 1
        for proc in self.procs:
            proc.join(15)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        return dict(totals)


def load_cpu(pids: list[int]) -> float:
    """CPU seconds of the load processes still alive."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total
