"""The daemon's core without WebSockets: CPU per streamed chunk.

The hub in this process on a real SQLite file (temporary directory), as the
daemon runs it: ``--sessions`` sessions each stream one message with
``messages.stream`` calls, ``--pipeline`` calls in flight per session (as a
harness pipelining over its connection), and ``--viewers`` outboxes joined
to each ``session:<id>``, drained by a reader task each (the per-connection
writer, minus the socket).  Printed: chunks/s, process CPU (all threads:
the trio thread and the SQLite worker) per chunk in µs, deliveries (chunks
that reached every viewer, merged events counted by what they cover), and
the store writer's commit groups.  ``--profile FILE`` writes a cProfile of
the trio thread.

    .venv/bin/python bench/core.py --repeat 3
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pathlib
import statistics
import tempfile
import time
from typing import Any

import trio

from agor_actors.daemon import Hub, Outbox, Principal, open_hub
from agor_actors.store import SqlStore
from agor_actors.world import real_world
from protocols import Codec, Event, Limits, decode_server_frame

OWNER = Principal("owner", "owner", True)

_COMMIT_CPU = [0.0]
_original_commit = SqlStore.commit


def _timed_commit(self: SqlStore, requests: Any) -> Any:
    started = time.thread_time()
    try:
        return _original_commit(self, requests)
    finally:
        _COMMIT_CPU[0] += time.thread_time() - started


SqlStore.commit = _timed_commit  # type: ignore[method-assign]


async def _viewer(outbox: Outbox, counts: list[int], index: int) -> None:
    limits = Limits()
    while True:
        frame = await outbox.next_frame()
        for msg in decode_server_frame(outbox.codec, frame, limits):
            if isinstance(msg, Event) and msg.event == "task:message":
                counts[index] += msg.end_seq - msg.seq + 1


async def _producer(
    hub: Hub, message_id: str, chunks: int, pipeline: int, chunk: str, rate: float
) -> None:
    sem = trio.Semaphore(pipeline)
    started = trio.current_time()

    async def one() -> None:
        try:
            await hub.call(
                OWNER,
                connection_id="bench",
                service="messages",
                method="stream",
                id=message_id,
                data={"chunk": chunk},
            )
        finally:
            sem.release()

    async with trio.open_nursery() as nursery:
        for i in range(chunks):
            if rate:
                await trio.sleep_until(started + i / rate)
            await sem.acquire()
            nursery.start_soon(one)


async def run_once(args: argparse.Namespace, data_dir: pathlib.Path) -> dict[str, float]:
    async with open_hub(real_world(), data_dir=data_dir) as hub:
        messages: list[str] = []
        counts: list[int] = []
        async with trio.open_nursery() as viewers:
            for i in range(args.sessions):
                session = await hub.call(
                    OWNER,
                    connection_id="bench",
                    service="sessions",
                    method="create",
                    data={"title": f"s{i}"},
                )
                msg = await hub.call(
                    OWNER,
                    connection_id="bench",
                    service="messages",
                    method="create",
                    data={
                        "session_id": session["id"],
                        "role": "assistant",
                        "content": "",
                        "streaming": True,
                    },
                )
                messages.append(msg["id"])
                for v in range(args.viewers):
                    outbox = Outbox(Codec.JSON)
                    counts.append(0)
                    viewers.start_soon(_viewer, outbox, counts, len(counts) - 1)
                    await hub.join(OWNER, f"v{i}-{v}", outbox, f"session:{session['id']}", None)
            profile = cProfile.Profile() if args.profile else None
            cpu0, wall0 = time.process_time(), time.perf_counter()
            _COMMIT_CPU[0] = 0.0
            groups0 = _writer_groups(hub)
            if profile:
                profile.enable()
            async with trio.open_nursery() as producers:
                for m in messages:
                    producers.start_soon(
                        _producer,
                        hub,
                        m,
                        args.chunks,
                        args.pipeline,
                        "x" * args.chunk_bytes,
                        args.rate,
                    )
            expected = args.chunks * args.viewers * args.sessions
            with trio.fail_after(60):
                while sum(counts) < expected:
                    await trio.sleep(0.001)
            if profile:
                profile.disable()
                profile.dump_stats(args.profile)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            commit_cpu = _COMMIT_CPU[0]
            groups = _writer_groups(hub) - groups0
            viewers.cancel_scope.cancel()
        total = args.chunks * args.sessions
        return {
            "chunks/s": total / wall,
            "cpu us/chunk": cpu / total * 1e6,
            "cpu share": cpu / wall,
            "commit us/chunk": commit_cpu / total * 1e6,
            "chunks/group": total / max(1, groups),
        }


def _writer_groups(hub: Hub) -> int:
    ref = hub.system.registry.lookup("store:writer")
    assert ref is not None
    return int(ref._actor.state.groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--viewers", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=50, help="chunks per session")
    parser.add_argument("--pipeline", type=int, default=4)
    parser.add_argument("--chunk-bytes", type=int, default=64)
    parser.add_argument(
        "--rate", type=float, default=0.0, help="chunks/s per session (0: as fast as it goes)"
    )
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--profile", default=None)
    args = parser.parse_args()
    rows = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            row = trio.run(run_once, args, pathlib.Path(tmp))
        rows.append(row)
        print("  ".join(f"{k} {v:,.2f}" for k, v in row.items()), flush=True)
    if args.repeat > 1:
        print(
            "median  "
            + "  ".join(f"{k} {statistics.median(r[k] for r in rows):,.2f}" for k in rows[0])
        )
    print(f"pid {os.getpid()} done")


if __name__ == "__main__":
    main()
