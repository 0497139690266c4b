"""RSS per idle connection: the daemon (``agor-actors serve`` in a process of
its own, SQLite on a temporary data dir) before and after ``--conns``
protocol connections (welcomed, each joined to one session room, then
silent but for their heartbeat) are opened from this process.

    .venv/bin/python bench/idle.py [--conns 1000] [--repeat 3] [--checkout DIR]

``--checkout DIR`` runs the daemon from another checkout of the project
(its packages first on ``PYTHONPATH``), to compare two versions in one
sitting.  Prints per run the RSS before and after and the difference per
connection, and the median.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile

import trio
from _loadgen import memory_kib, open_peer, start_daemon

from protocols import Codec


async def _measure(conns: int, settle_s: float) -> tuple[int, int, int]:
    with tempfile.TemporaryDirectory(prefix="agor-idle-") as tmp:
        server = start_daemon(pathlib.Path(tmp))
        try:
            async with open_peer(server.url, server.token, name="setup") as setup:
                session = await setup.request("sessions", "create", data={"title": "idle"})
                room = f"session:{session['id']}"
                await trio.sleep(settle_s)
                before = memory_kib(server.pid)["VmRSS"]
                opened = trio.Semaphore(conns)
                ready = trio.Event()
                count = 0

                async def one(n: int) -> None:
                    nonlocal count
                    async with open_peer(server.url, server.token, name=f"idle{n}") as peer:
                        await peer.join(room)
                        count += 1
                        if count == conns:
                            ready.set()
                        await trio.sleep_forever()

                async with trio.open_nursery() as nursery:
                    for n in range(conns):
                        await opened.acquire()
                        nursery.start_soon(one, n)
                    with trio.fail_after(120):
                        await ready.wait()
                    await trio.sleep(settle_s)
                    after = memory_kib(server.pid)["VmRSS"]
                    nursery.cancel_scope.cancel()
            return before, after, conns
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conns", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--settle-s", type=float, default=2.0)
    parser.add_argument("--checkout", type=pathlib.Path, help="run the daemon from this checkout")
    args = parser.parse_args()
    if args.checkout is not None:
        os.environ["PYTHONPATH"] = str(args.checkout.resolve())
    per: list[float] = []
    for run in range(args.repeat):
        before, after, n = trio.run(_measure, args.conns, args.settle_s)
        per.append((after - before) / n)
        print(
            f"run {run + 1}: RSS {before} -> {after} KiB with {n} idle connections: "
            f"{per[-1]:.1f} KiB per connection",
            flush=True,
        )
    print(
        f"median RSS per idle connection: {statistics.median(per):.1f} KiB "
        f"({'checkout ' + str(args.checkout) if args.checkout else 'this checkout'}, "
        f"{Codec.JSON.value}, Python {sys.version.split()[0]})"
    )


if __name__ == "__main__":
    main()
