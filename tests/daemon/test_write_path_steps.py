"""The path of one write, counted: from the connection's submit to the
viewer's frame, the tasks that run are the session actor, the store writer
(which commits a SQLite file on the loop) and the room: two task switches;
with commits in a worker thread (``--sqlite-commit thread``, and always on
PostgreSQL) the writer wakes again when its thread is done, through trio's
entry queue: four (DESIGN-NOTES.md, "One write, end to end").  trio's
instrument API sees every task step, so an extra hop or a needless
schedule point on this path fails here."""

from __future__ import annotations

import pathlib
from typing import Any

import outcome
import pytest
import trio

from agor_actors.daemon import Outbox, Principal, open_hub
from agor_actors.world import real_world
from protocols import Call, Codec

OWNER = Principal("owner", "owner", True)


class _Steps(trio.abc.Instrument):
    """Records the tasks that step while ``on``, until ``outbox`` has a frame."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.on = False
        self.tasks: list[trio.lowlevel.Task] = []

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.on:
            self.tasks.append(task)

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.on and len(self.outbox) > 0:
            self.on = False


def _actor(task: trio.lowlevel.Task) -> str:
    name = task.name
    if "registry/" in name:
        return name.split("registry/", 1)[1].split(":", 1)[0]
    if "run_sync_soon" in name:
        return "trio:entry-queue"  # trio's own task that hands the thread's result back
    return name


@pytest.mark.parametrize(
    ("on_loop", "expected"),
    [
        # serve's default: SQLite commits on the loop, no thread round trip
        (True, ["session", "store", "room"]),
        # --sqlite-commit thread: the worker thread's answer comes back
        # through trio's entry queue and wakes the writer again
        (False, ["session", "store", "trio:entry-queue", "store", "room"]),
    ],
)
async def test_one_write_reaches_a_viewer_in_at_most_four_task_switches(
    tmp_path: pathlib.Path, on_loop: bool, expected: list[str]
) -> None:
    async with open_hub(real_world(local_on_loop=on_loop), data_dir=tmp_path) as hub:

        async def call(service: str, method: str, **kw: Any) -> Any:
            return await hub.call(OWNER, connection_id="c1", service=service, method=method, **kw)

        sid = (await call("sessions", "create", data={"title": "S"}))["id"]
        tid = (await call("tasks", "create", data={"session_id": sid, "prompt": "p"}))["id"]
        mid = (
            await call(
                "messages",
                "create",
                data={"session_id": sid, "task_id": tid, "role": "assistant", "streaming": True},
            )
        )["id"]
        viewer = Outbox(Codec.JSON)
        await hub.join(OWNER, "c2", viewer, f"session:{sid}", None)
        await viewer.next_frame()  # joined
        steps = _Steps(viewer)
        trio.lowlevel.add_instrument(steps)
        me = trio.lowlevel.current_task()
        try:
            for ref in range(5):
                answered = trio.Event()

                def reply(result: outcome.Outcome[Any], answered: trio.Event = answered) -> None:
                    result.unwrap()
                    answered.set()

                steps.tasks = []
                steps.on = True
                chunk = Call(
                    ref=ref, service="messages", method="stream", id=mid, data={"chunk": "x"}
                )
                assert await hub.submit(OWNER, "c1", chunk, reply) is None  # a session write
                with trio.fail_after(10):
                    while steps.on:
                        await trio.sleep(0)
                    await answered.wait()
                    await viewer.next_frame()
                # not on the path: this test's own task, and timers (and the
                # actors they wake) that happen to fire meanwhile
                ours = {f"session:{sid}", "store:writer", f"room:session:{sid}"}
                path = [
                    _actor(t)
                    for t in steps.tasks
                    if t is not me
                    and not t.name.endswith("_Actor._fire_timers")
                    and ("registry/" not in t.name or t.name.split("registry/", 1)[1] in ours)
                ]
                # the session wakes again for the writer's reply: that is not on the
                # way to the viewer, and may run before or after the room
                last_writer = max(i for i, a in enumerate(path) if a == "store")
                path = path[: last_writer + 1] + [
                    a for a in path[last_writer + 1 :] if a != "session"
                ]
                assert path == expected, path
        finally:
            trio.lowlevel.remove_instrument(steps)
