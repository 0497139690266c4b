"""Presence: cursors of 10 users at 60 moves/s on one board with 50 watchers.

    .venv/bin/python bench/presence.py [--scale 1] [--seconds 10] [--repeat 1]

The daemon runs as ``agor-actors serve`` (a subprocess on a temporary data
dir); the clients run in this process, all of them real WebSocket clients
speaking the protocol through its client machine.  The owner creates a board
and one user per client (each client is a user of its own, so no cursor is
another's).  Every client joins ``board:<id>`` and announces itself on the
board (a ``presence`` frame with ``board``); the movers then send a
``presence`` frame with a new cursor 60 times a second each, the watchers
send nothing more.  No client sends a viewport, so no cursor is culled: the
most a client can be sent.

After a second of warm-up, for ``--seconds``, each client counts the frames
holding presence it receives and their bytes (as sent on the wire), and the
most presence frames it got in any one-second window (the protocol allows
30).  Each cursor's ``x`` carries the time it was sent (milliseconds of
``time.monotonic_ns``), so the receivers also give the latency from move to
delivery (it includes the wait for the room's next 30 Hz flush).  The
daemon's CPU comes from ``/proc/<pid>/stat`` (utime+stime, all threads) over
the measuring window.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import attrs
import trio
import trio_websocket
from _loadgen import (
    CpuMeter,
    Histogram,
    Peer,
    ServerProcess,
    cpu_seconds,
    memory_kib,
    open_peer,
    start_daemon,
)

from protocols import Codec, Cursor, Presence, PresenceUpdate

MOD_US = 1_000_000_000
"""Cursor ``x`` is the send time in milliseconds modulo 10^6 s (exact in a float)."""


class BoardClient(Peer):
    """A client on the board that measures the presence it is sent."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, codec: Codec, name: str) -> None:
        super().__init__(ws, codec, name)
        self.window: tuple[int, int] = (0, 0)
        self.frame_times: list[int] = []
        self.bytes = 0
        self.presence_messages = 0
        self.cursors = 0
        self.latency = Histogram()
        self._pending_frame: tuple[int, int] | None = None

    def _in_window(self, now_ns: int) -> bool:
        start, end = self.window
        return start <= now_ns < end if end else start != 0 and start <= now_ns

    def received(self, frame: str | bytes, now_ns: int) -> None:
        # counted in ``presence`` once the frame is known to hold presence
        size = len(frame) if isinstance(frame, bytes) else len(frame.encode("utf-8"))
        self._pending_frame = (now_ns, size)

    def presence(self, presence: Presence, now_ns: int) -> None:
        if not self._in_window(now_ns):
            return
        if self._pending_frame is not None and self._pending_frame[0] == now_ns:
            self.frame_times.append(now_ns)
            self.bytes += self._pending_frame[1]
            self._pending_frame = None
        self.presence_messages += 1
        now_us = (now_ns // 1000) % MOD_US
        for cursor in presence.cursors or ():
            x = cursor.get("x")
            if isinstance(x, int | float):
                self.cursors += 1
                self.latency.record(int((now_us - round(x * 1000)) % MOD_US))

    def most_in_one_second(self) -> int:
        times = self.frame_times
        best = first = 0
        for last, t in enumerate(times):
            while t - times[first] >= 1_000_000_000:
                first += 1
            best = max(best, last - first + 1)
        return best


@attrs.frozen
class Options:
    scale: float = 1.0
    movers: int = 10
    watchers: int = 50
    moves_hz: float = 60.0
    seconds: float = 10.0
    codec: Codec = Codec.JSON

    def count(self, n: int) -> int:
        return max(1, round(n * self.scale))


async def move(peer: Peer, board: str, index: int, rate_hz: float, until: float) -> int:
    """Send a cursor ``rate_hz`` times a second until ``until`` (trio time)."""
    interval = 1.0 / rate_hz
    start = trio.current_time()
    sent = 0
    for i in range(math.ceil((until - start) * rate_hz) + 1):
        at = start + i * interval
        if at >= until:
            break
        await trio.sleep_until(at)
        x = ((time.monotonic_ns() // 1000) % MOD_US) / 1000
        update = PresenceUpdate(board=board, cursor=Cursor(x, float(index * 10 + i % 10)))
        await peer.ws.send_message(peer.machine.presence(update))
        sent += 1
    return sent


async def run(server: ServerProcess, opts: Options) -> dict[str, Any]:
    movers, watchers = opts.count(opts.movers), opts.count(opts.watchers)
    codec = opts.codec
    async with contextlib.AsyncExitStack() as stack:
        owner = await stack.enter_async_context(
            open_peer(server.url, server.token, codec=codec, name="owner")
        )
        board = (await owner.request("boards", "create", data={"name": "presence bench"}))["id"]
        room = f"board:{board}"
        clients: list[BoardClient] = []
        for i in range(movers + watchers):
            name = f"mover-{i}" if i < movers else f"watcher-{i - movers}"
            user = await owner.request("users", "create", data={"name": name})
            peer = await stack.enter_async_context(
                open_peer(server.url, user["token"], codec=codec, name=name, factory=BoardClient)
            )
            assert isinstance(peer, BoardClient)
            await peer.join(room)
            await peer.ws.send_message(peer.machine.presence(PresenceUpdate(board=board)))
            clients.append(peer)
        warm_up = 1.0
        end = trio.current_time() + warm_up + opts.seconds
        sent: list[int] = []

        async def mover(peer: BoardClient, index: int) -> None:
            sent.append(await move(peer, board, index, opts.moves_hz, end))

        async with trio.open_nursery() as nursery:
            for index, peer in enumerate(clients[:movers]):
                nursery.start_soon(mover, peer, index)
            await trio.sleep(warm_up)
            start_ns = time.monotonic_ns()
            for peer in clients:
                peer.window = (start_ns, 0)
            meter = CpuMeter(server.pid)
            load0 = cpu_seconds(os.getpid())
            await trio.sleep_until(end)
            end_ns = time.monotonic_ns()
            for peer in clients:
                peer.window = (start_ns, end_ns)
            cpu = meter.percent()
            load = 100.0 * (cpu_seconds(os.getpid()) - load0) / ((end_ns - start_ns) / 1e9)
        memory = memory_kib(server.pid)
        closed = [p.name for p in clients if p.closed is not None]
    seconds = (end_ns - start_ns) / 1e9

    def group(peers: list[BoardClient]) -> dict[str, Any]:
        latency = Histogram()
        for p in peers:
            latency.merge(p.latency)
        frames = [len(p.frame_times) / seconds for p in peers]
        return {
            "clients": len(peers),
            "frames_per_s": statistics.mean(frames),
            "frames_per_s_max": max(frames),
            "most_in_1s": max(p.most_in_one_second() for p in peers),
            "bytes_per_s": statistics.mean(p.bytes / seconds for p in peers),
            "cursors_per_frame": sum(p.cursors for p in peers)
            / max(1, sum(len(p.frame_times) for p in peers)),
            "p50_ms": latency.percentile_ms(0.5),
            "p99_ms": latency.percentile_ms(0.99),
            "max_ms": latency.max_ms,
        }

    return {
        "movers": movers,
        "watchers": watchers,
        "seconds": seconds,
        "moves_per_s": sum(sent) / (warm_up + opts.seconds),
        "watching": group(clients[movers:]),
        "moving": group(clients[:movers]),
        "server_cpu": cpu,
        "load_cpu": load,
        "rss_mib": memory["VmRSS"] / 1024,
        "closed": closed,
    }


def _ms(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:,.1f}"


def print_run(r: dict[str, Any]) -> None:
    print(
        f"\n{r['movers']} users moving at {r['moves_per_s'] / r['movers']:.0f}/s each "
        f"({r['moves_per_s']:.0f} moves/s in all), {r['watchers']} watchers, "
        f"{r['seconds']:.1f} s measured; daemon CPU {r['server_cpu']:.0f}%, "
        f"RSS {r['rss_mib']:.0f} MiB; this process {r['load_cpu']:.0f}% CPU"
        + (f"; closed: {r['closed']}" if r["closed"] else "")
        + "\n"
    )
    print(
        "| clients | presence frames/s per client (max) | most frames in 1 s | bytes/s per client "
        "| cursors per frame | cursor latency p50 / p99 / max ms |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, key in (("watchers", "watching"), ("movers", "moving")):
        g = r[key]
        print(
            f"| {g['clients']} {label} | {g['frames_per_s']:.1f} ({g['frames_per_s_max']:.1f}) "
            f"| {g['most_in_1s']} | {g['bytes_per_s']:,.0f} | {g['cursors_per_frame']:.1f} "
            f"| {_ms(g['p50_ms'])} / {_ms(g['p99_ms'])} / {_ms(g['max_ms'])} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="scale the numbers of clients")
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring window")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--codec", choices=["json", "cbor"], default="json")
    args = parser.parse_args(argv)
    if not (0 < args.scale <= 10 and 0.5 <= args.seconds <= 600 and 1 <= args.repeat <= 20):
        parser.error("--scale in (0, 10], --seconds in [0.5, 600], --repeat in 1..20")
    opts = Options(
        scale=args.scale,
        seconds=args.seconds,
        codec=Codec.JSON if args.codec == "json" else Codec.CBOR,
    )
    print(
        f"# bench/presence.py --scale {args.scale:g} --seconds {args.seconds:g} "
        f"--repeat {args.repeat} --codec {args.codec}; CPython {platform.python_version()}, "
        f"{os.cpu_count()} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    runs = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="agor-presence-") as tmp:
            daemon = start_daemon(pathlib.Path(tmp))
            try:
                runs.append(trio.run(run, daemon, opts))
            finally:
                daemon.stop()
        print_run(runs[-1])
    if len(runs) > 1:
        watching = [r["watching"] for r in runs]
        print(
            f"\nmedian of {len(runs)} runs: watchers "
            f"{statistics.median(w['frames_per_s'] for w in watching):.1f} frames/s, "
            f"{statistics.median(w['bytes_per_s'] for w in watching):,.0f} bytes/s each; "
            f"daemon CPU {statistics.median(r['server_cpu'] for r in runs):.0f}%"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
