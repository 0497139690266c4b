"""Embedding for agent harnesses: run the runtime in the harness's own
process and report what an agent does — message chunks as they stream, tool
calls, status, git state — as the same events a remote client gets.

    async with open_runtime(data_dir=Path(".agor")) as rt:
        session = await rt.create_session(title="Fix the tests", agent="claude-code")
        agent = rt.reporter(session["id"])
        await agent.status("running")
        task = await agent.start_task("make the suite green")
        async with agent.message(task) as stream:
            for word in words:
                await stream.write(word)
        await agent.complete_task(task, {"summary": "done"})

Pass ``serve=(host, port)`` to also serve WebSocket and HTTP clients from the
same process: they connect to ``rt.ws_url`` / ``rt.http_url`` with
``rt.token``.
"""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from .daemon import DataDirLocked, Hub, Principal, open_hub
from .daemon._hub import OWNER_ID
from .world import World, real_world

__all__ = ["AgentReporter", "DataDirLocked", "MessageStream", "Runtime", "open_runtime"]


class MessageStream:
    """One assistant message being streamed.  Each ``write`` is durable and
    broadcast before it returns; consecutive chunks that queue up while a
    commit is in flight are merged into one event covering their seqs."""

    def __init__(self, reporter: AgentReporter, message_id: str) -> None:
        self._reporter = reporter
        self.id = message_id

    async def write(self, chunk: str) -> None:
        if chunk:
            await self._reporter._call("messages", "stream", self.id, {"chunk": chunk})

    async def finish(self) -> None:
        await self._reporter._call("messages", "finish", self.id, None)


class AgentReporter:
    """Reports one session's agent activity through the hub."""

    def __init__(self, hub: Hub, principal: Principal, session_id: str, origin: str) -> None:
        self._hub = hub
        self._principal = principal
        self.session_id = session_id
        self._origin = origin

    async def _call(self, service: str, method: str, id: str | None, data: Any) -> Any:
        return await self._hub.call(
            self._principal,
            connection_id=self._origin,
            service=service,
            method=method,
            id=id,
            data=data,
        )

    async def status(self, status: str) -> None:
        await self._call("sessions", "set_status", self.session_id, {"status": status})

    async def git_state(self, state: dict[str, Any]) -> None:
        await self._call("sessions", "set_git_state", self.session_id, state)

    async def start_task(self, prompt: str) -> str:
        task = await self._call(
            "tasks", "create", None, {"session_id": self.session_id, "prompt": prompt}
        )
        await self._call("tasks", "start", task["id"], None)
        return str(task["id"])

    async def complete_task(self, task_id: str, result: Any = None) -> None:
        await self._call("tasks", "complete", task_id, {"result": result})

    async def fail_task(self, task_id: str, error: Any) -> None:
        await self._call("tasks", "fail", task_id, {"error": error})

    async def tool_call(self, task_id: str, name: str, input: Any = None) -> str:
        call = await self._call("tasks", "tool_call", task_id, {"name": name, "input": input})
        return str(call["id"])

    async def tool_result(
        self, task_id: str, tool_call_id: str, output: Any, *, failed: bool = False
    ) -> None:
        await self._call(
            "tasks",
            "tool_result",
            task_id,
            {
                "tool_call_id": tool_call_id,
                "output": output,
                "status": "failed" if failed else "completed",
            },
        )

    @asynccontextmanager
    async def message(
        self, task_id: str | None, role: str = "assistant"
    ) -> AsyncIterator[MessageStream]:
        """A streamed message, finished when the block exits."""
        msg = await self._call(
            "messages",
            "create",
            None,
            {"session_id": self.session_id, "task_id": task_id, "role": role, "streaming": True},
        )
        stream = MessageStream(self, str(msg["id"]))
        try:
            yield stream
        finally:
            with trio.CancelScope(shield=True):
                await stream.finish()


class Runtime:
    """The embedded runtime.  Made by :func:`open_runtime`."""

    def __init__(self, hub: Hub, principal: Principal, origin: str) -> None:
        self.hub = hub
        self.principal = principal
        self.origin = origin
        self.port: int | None = None
        """The port WebSocket and HTTP clients connect to, when serving."""
        self.host: str | None = None
        """The address served on, when serving."""

    @property
    def token(self) -> str:
        """The owner's token: what a client of this runtime signs in with."""
        return self.hub.owner_token

    @property
    def http_url(self) -> str | None:
        """Where HTTP clients connect (``http://host:port``), when serving;
        a wildcard address is reached on the loopback one."""
        if self.port is None or self.host is None:
            return None
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def ws_url(self) -> str | None:
        """Where WebSocket clients connect (``ws://host:port/ws``), when serving."""
        http = self.http_url
        return None if http is None else "ws" + http.removeprefix("http") + "/ws"

    async def create_session(self, **fields: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self.hub.call(
            self.principal,
            connection_id=self.origin,
            service="sessions",
            method="create",
            data=fields,
        )
        return result

    def reporter(self, session_id: str) -> AgentReporter:
        return AgentReporter(self.hub, self.principal, session_id, self.origin)


@asynccontextmanager
async def open_runtime(
    *,
    data_dir: pathlib.Path | None = None,
    db_url: str | None = None,
    world: World | None = None,
    serve: tuple[str, int] | None = None,
    origin: str = "embedded",
) -> AsyncIterator[Runtime]:
    """Run the runtime in this process for the block; with ``serve``, also
    serve WebSocket and HTTP clients on ``(host, port)`` (port 0: any free
    one).  Raises :class:`agor_actors.server.ListenError` (its ``explain()``
    says what to do) when
    that port cannot be had, before the data dir is opened, and
    :class:`DataDirLocked` when another process runs on the data dir."""
    world = world or real_world()
    sock = None
    if serve is not None:
        from .server import listen_socket

        sock = listen_socket(serve[0], serve[1], option="serve=(host, port)")
    try:
        async with open_hub(world, db_url=db_url, data_dir=data_dir) as hub:
            principal = Principal(user_id=OWNER_ID, name="owner", is_owner=True)
            if serve is None:
                yield Runtime(hub, principal, origin)
                return
            from .server import serving

            async with serving(hub, world, host=serve[0], port=serve[1], sock=sock) as port:
                runtime = Runtime(hub, principal, origin)
                runtime.host, runtime.port = serve[0], port
                yield runtime
    finally:
        if sock is not None:
            sock.close()  # (the server closes it too; a second close does nothing)
