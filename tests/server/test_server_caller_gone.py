"""A write whose session's actor is not there at once (starting again, its
record read from a store that is slow right now) waits for it; if the
caller's connection is gone by then, the write is dropped, not written: the
caller was told the connection was lost and may have written more since,
through another connection, maybe to another daemon (the simulator's
cluster seed 2812: a streamed chunk landed after the five chunks sent
after it).  A real daemon on a SQLite file, raw clients over real
WebSockets on 127.0.0.1; the store seam holds calls while told to."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import trio
from server_support import Daemon, raw_client

from agor_actors.daemon import Principal, open_hub
from agor_actors.server import serving
from agor_actors.world import Blocking, real_world
from protocols import Call, Result, Welcome

T = TypeVar("T")
OWNER = Principal("owner", "owner", True)


class Held:
    """The store seam, holding every call while ``holding``."""

    def __init__(self, inner: Blocking) -> None:
        self.inner = inner
        self.released = trio.Event()
        self.released.set()
        self.held = trio.Event()

    def hold(self) -> None:
        self.released = trio.Event()
        self.held = trio.Event()

    async def run(self, fn: Callable[[], T], *, local: bool = False) -> T:
        if not self.released.is_set():
            self.held.set()
            await self.released.wait()
        return await self.inner.run(fn, local=local)


def chunk(ref: int, message_id: str, text: str) -> Call:
    return Call(ref, "messages", "stream", id=message_id, data={"chunk": text})


async def test_a_write_that_waited_for_its_actor_is_dropped_if_its_caller_is_gone(
    tmp_path: pathlib.Path,
) -> None:
    seam = Held(real_world().blocking)
    world = attrs.evolve(real_world(), blocking=seam)
    async with (
        open_hub(world, data_dir=tmp_path / "agor") as hub,
        serving(hub, world) as port,
    ):
        running = Daemon(hub, port, tmp_path / "agor")

        async def owner_call(service: str, method: str, **kw: Any) -> Any:
            return await hub.call(OWNER, connection_id=None, service=service, method=method, **kw)

        session = await owner_call("sessions", "create", data={"title": "S"})
        message = await owner_call(
            "messages",
            "create",
            data={"session_id": session["id"], "role": "assistant", "streaming": True},
        )
        # the session's actor stops
        await hub.system.registry.supervisor.terminate_child(f"session:{session['id']}")

        with trio.CancelScope() as lost:
            async with raw_client(running.ws_url, token=running.token) as first:
                await first.expect(Welcome)
                seam.hold()  # the store turns slow: the actor's next start waits
                await first.send(chunk(1, message["id"], "lost "))
                with trio.fail_after(10):
                    await seam.held.wait()  # the write waits for the actor's start
                lost.cancel()  # the connection drops (closed at once)
        seam.released.set()

        # the caller writes the next chunk on a new connection: it lands
        # alone (without the fix: "lost next")
        async with raw_client(running.ws_url, token=running.token) as second:
            await second.expect(Welcome)
            await second.send(chunk(2, message["id"], "next"))
            result = await second.expect(Result)
        assert result.ref == 2 and result.error is None, result
        got = await owner_call("messages", "get", id=message["id"])
        assert got["content"] == "next"
