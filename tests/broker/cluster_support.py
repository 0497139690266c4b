"""Shared helpers for the cluster tests (no tests here): a fresh schema on
the machine's PostgreSQL per test, the machine's Redis (or LISTEN/NOTIFY on
that PostgreSQL) as the broker, a reader of an
outbox's events, ``agor-actors serve`` processes as cluster nodes, and a
raw protocol viewer of one room."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Final

import attrs
import pytest
import sqlalchemy as sa
import trio
import trio_websocket
from sqlalchemy.pool import NullPool

from agor_actors.client import open_websocket
from agor_actors.daemon import Hub, Outbox, Principal, open_hub
from agor_actors.world import real_world
from protocols import (
    PROTOCOL_VERSION,
    Codec,
    Event,
    Hello,
    Join,
    Joined,
    Limits,
    ServerMessage,
    Since,
    Welcome,
    decode_server_frame,
    encode,
)
from tests import pg_schema

PG_URL = os.environ.get("AGOR_TEST_PG_URL", "")
REDIS_URL = os.environ.get("AGOR_TEST_REDIS_URL", "")

needs_cluster = pytest.mark.skipif(
    not (PG_URL and REDIS_URL),
    reason="AGOR_TEST_PG_URL and AGOR_TEST_REDIS_URL are not both set (.ci/run sets them):"
    " cluster tests on PostgreSQL and Redis skipped",
)

needs_pg = pytest.mark.skipif(
    not PG_URL,
    reason="AGOR_TEST_PG_URL is not set (.ci/run sets it): LISTEN/NOTIFY tests skipped",
)

BROKERS = ("redis", "postgresql")


def broker_url_for(kind: str, pg_url: str) -> str:
    """The broker of kind ``kind`` for daemons on ``pg_url``: the machine's
    Redis, or LISTEN/NOTIFY on that very database (skips the test when the
    server is not configured)."""
    if kind == "redis":
        if not REDIS_URL:
            pytest.skip("AGOR_TEST_REDIS_URL is not set: the Redis broker's case skipped")
        return REDIS_URL
    return pg_url


def terminate_backends(application_name: str) -> int:
    """``pg_terminate_backend`` every connection of ``application_name`` (as
    an operator or a failover would): how many there were."""
    admin = sa.create_engine(PG_URL, poolclass=NullPool)
    try:
        with admin.begin() as conn:
            rows = conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %(name)s",
                {"name": application_name},
            ).fetchall()
    finally:
        admin.dispose()
    return len(rows)


@contextmanager
def fresh_schema(prefix: str = "agor_cluster") -> Iterator[str]:
    """A PostgreSQL URL whose tables live in a schema of their own (made
    here, dropped afterwards), so tests never see each other's rows."""
    with pg_schema.fresh_schema(PG_URL, prefix) as (url, _):
        yield url


class Reader:
    """Everything an outbox was given, decoded, in order."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.messages: list[ServerMessage] = []

    @property
    def events(self) -> list[Event]:
        return [m for m in self.messages if isinstance(m, Event)]

    @property
    def joined(self) -> Joined:
        return next(m for m in self.messages if isinstance(m, Joined))

    async def until_seq(self, seq: int, *, limit_s: float = 10.0) -> list[Event]:
        """Read until an event covering ``seq`` arrived; the events so far."""
        with trio.fail_after(limit_s):
            while not any(e.end_seq >= seq for e in self.events):
                frame = await self.outbox.next_frame()
                self.messages += decode_server_frame(self.outbox.codec, frame, Limits())
        return self.events


def assert_gap_free(events: list[Event], first: int = 1) -> None:
    """``events`` cover ``first``.. with no gap and no seq twice."""
    expected = first
    for event in events:
        assert event.seq == expected, [(e.seq, e.end_seq) for e in events]
        expected = event.end_seq + 1


CODEC = Codec.CBOR
OWNER = Principal("owner", "owner", True)


async def make_session(hub: Hub, title: str = "S") -> str:
    """A session made by the owner through ``hub``; its id."""
    made = await hub.call(
        OWNER, connection_id="w", service="sessions", method="create", data={"title": title}
    )
    return str(made["id"])


async def make_task(hub: Hub, session_id: str, prompt: str) -> int:
    """A task made by the owner through ``hub``; the seq of its event."""
    made = await hub.call(
        OWNER,
        connection_id="w",
        service="tasks",
        method="create",
        data={"session_id": session_id, "prompt": prompt},
    )
    return int(made["_seq"])


async def message_call(hub: Hub, method: str, mid: str | None = None, **kwargs: Any) -> Any:
    return await hub.call(
        OWNER, connection_id="agent", service="messages", method=method, id=mid, **kwargs
    )


async def create_message(hub: Hub, sid: str) -> str:
    made = await message_call(
        hub, "create", data={"session_id": sid, "content": "", "streaming": True}
    )
    return str(made["id"])


async def view(hub: Hub, connection_id: str, room: str, since: Since | None = None) -> Reader:
    """The owner's connection ``connection_id`` joined to ``room`` on ``hub``."""
    outbox = Outbox(CODEC)
    await hub.join(OWNER, connection_id, outbox, room, since)
    return Reader(outbox)


HUB_TOKEN = "cluster-owner-token"
"""The owner token of the daemons' cores run in the test's process."""


@asynccontextmanager
async def hub_node(pg_url: str, broker_url: str, **kwargs: Any) -> AsyncIterator[Hub]:
    """A cluster node's core in this process: a hub on ``pg_url``'s store
    and the broker at ``broker_url``."""
    async with open_hub(
        real_world(), db_url=pg_url, owner_token=HUB_TOKEN, broker_url=broker_url, **kwargs
    ) as hub:
        yield hub


# ---------------------------------------------------------------- processes

CLI = (sys.executable, "-m", "agor_actors.cli")
WS_URL_RE = re.compile(r"WebSocket\s+(ws://[^\s]+)")
TOKEN = "the-cluster-owner-token"


@attrs.define
class Node:
    """One ``agor-actors serve`` process of the cluster."""

    process: trio.Process
    ws_url: str
    err: bytearray

    def kill(self) -> None:
        """``kill -9``: no drain, no goodbye."""
        self.process.kill()


KEYS: Final = {"jwt-secret": "cluster-jwt-" + "k" * 40, "web-secret": "cluster-web-" + "w" * 32}
"""The keys every node of a test cluster has (a node with others refuses to
start)."""


def node_data_dir(root: pathlib.Path, name: str) -> pathlib.Path:
    """A data dir holding the cluster's owner token and keys (as an
    operator copies them from the first node)."""
    data_dir = root / name
    data_dir.mkdir(mode=0o700)
    for file, value in {"token": TOKEN, **KEYS}.items():
        path = data_dir / file
        path.write_text(value + "\n")
        path.chmod(0o600)
    return data_dir


@asynccontextmanager
async def serving_node(
    data_dir: pathlib.Path,
    db_url: str,
    *,
    ready_within_s: float = 30.0,
    extra: Sequence[str] = (),
    broker_url: str | None = None,
) -> AsyncIterator[Node]:
    """``agor-actors serve --db ... --broker ... *extra`` on an ephemeral
    port, once it printed its banner; SIGTERM (then SIGKILL) on the way out.
    The broker is the machine's Redis unless ``broker_url``."""
    argv = [*CLI, "serve", "--port", "0", "--data-dir", str(data_dir)]
    argv += ["--db", db_url, "--broker", broker_url or REDIS_URL]
    argv += ["--log-level", "WARNING", *extra]
    process = await trio.lowlevel.open_process(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None and process.stderr is not None
    out, err = bytearray(), bytearray()
    ready = trio.Event()

    async def pump(stream: trio.abc.ReceiveStream, into: bytearray, watch: bool) -> None:
        async for chunk in stream:
            into.extend(chunk)
            if watch and WS_URL_RE.search(into.decode("utf-8", "replace")):
                ready.set()
        ready.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, process.stdout, out, True)
            nursery.start_soon(pump, process.stderr, err, False)
            with trio.fail_after(ready_within_s):
                await ready.wait()
            found = WS_URL_RE.search(out.decode("utf-8", "replace"))
            assert found is not None, f"no banner; stderr:\n{err.decode('utf-8', 'replace')}"
            yield Node(process, found.group(1), err)
            if process.returncode is None:
                process.terminate()
            with trio.fail_after(15):
                await process.wait()
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


class Viewer:
    """A raw protocol connection joined to one room: every event, in order."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.messages: list[ServerMessage] = []

    @property
    def events(self) -> list[Event]:
        return [m for m in self.messages if isinstance(m, Event)]

    @property
    def joined(self) -> Joined:
        return next(m for m in self.messages if isinstance(m, Joined))

    async def read_until(self, done: object, *, limit_s: float = 20.0) -> None:
        assert callable(done)
        with trio.fail_after(limit_s):
            while not done():
                frame = await self.ws.get_message()
                self.messages += decode_server_frame(CODEC, frame, Limits())

    async def until_seq(self, seq: int, *, limit_s: float = 20.0) -> list[Event]:
        await self.read_until(lambda: any(e.end_seq >= seq for e in self.events), limit_s=limit_s)
        return self.events


@asynccontextmanager
async def viewing(url: str, room: str, since: Since | None = None) -> AsyncIterator[Viewer]:
    async with open_websocket(url, subprotocols=[CODEC.subprotocol]) as ws:
        viewer = Viewer(ws)
        await ws.send_message(encode(CODEC, Hello(PROTOCOL_VERSION, TOKEN, None)))
        await viewer.read_until(lambda: any(isinstance(m, Welcome) for m in viewer.messages))
        await ws.send_message(encode(CODEC, Join(room, since)))
        await viewer.read_until(lambda: any(isinstance(m, Joined) for m in viewer.messages))
        yield viewer
