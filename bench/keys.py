"""What an idempotency key costs a write: ``tasks.create`` through the hub in
this process, on a real SQLite file (temporary directory), with and without
a key, in rounds that alternate the two.

    .venv/bin/python bench/keys.py [--writes 3000] [--repeat 3]

Each round creates 20 sessions, then ``--writes`` tasks, 100 calls in
flight at a time (spread over the sessions, so the writer commits groups as
the daemon does under load).  Printed: the process CPU per write (all
threads: the trio thread and the SQLite work) without and with a key, and
the difference; the medians of the rounds at the end.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time

import trio

from agor_actors.daemon import Principal, open_hub
from agor_actors.world import real_world

OWNER = Principal("owner", "owner", True)
SESSIONS = 20
IN_FLIGHT = 100


async def cpu_per_write_us(keyed: bool, writes: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        async with open_hub(real_world(), data_dir=pathlib.Path(tmp)) as hub:
            sessions = []
            for n in range(SESSIONS):
                session = await hub.call(
                    OWNER,
                    connection_id="bench",
                    service="sessions",
                    method="create",
                    data={"title": f"s{n}"},
                )
                sessions.append(session["id"])

            async def one(n: int) -> None:
                await hub.call(
                    OWNER,
                    connection_id="bench",
                    service="tasks",
                    method="create",
                    data={"session_id": sessions[n % SESSIONS], "prompt": "p"},
                    idempotency_key=f"bench-{n}" if keyed else None,
                )

            started = time.process_time()
            for first in range(0, writes, IN_FLIGHT):
                async with trio.open_nursery() as nursery:
                    for n in range(first, min(first + IN_FLIGHT, writes)):
                        nursery.start_soon(one, n)
            return (time.process_time() - started) / writes * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    plain: list[float] = []
    keyed: list[float] = []
    for _ in range(args.repeat):
        plain.append(trio.run(cpu_per_write_us, False, args.writes))
        keyed.append(trio.run(cpu_per_write_us, True, args.writes))
        print(
            f"without a key {plain[-1]:6.0f} us/write   with one {keyed[-1]:6.0f} us/write"
            f"   +{keyed[-1] - plain[-1]:.0f} us"
        )
    a, b = statistics.median(plain), statistics.median(keyed)
    print(f"median: without {a:.0f} us, with {b:.0f} us: +{b - a:.0f} us (x{b / a:.2f})")


if __name__ == "__main__":
    main()
