"""The LISTEN/NOTIFY link on the machine's PostgreSQL: alone (subscribe,
publish in order, unsubscribe, the payload limit, a terminated connection),
then under two daemons' cores: an event too long for NOTIFY reaches the
other daemon through its room's log, and a listening connection killed by
the server (``pg_terminate_backend``) is made again with nothing missing;
then two ``agor-actors serve --broker postgresql+psycopg://...`` processes."""

from __future__ import annotations

import pathlib
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import sqlalchemy as sa
import trio
from cluster_support import (
    PG_URL,
    TOKEN,
    assert_gap_free,
    fresh_schema,
    make_session,
    make_task,
    needs_pg,
    node_data_dir,
    serving_node,
    terminate_backends,
    view,
    viewing,
)

from agor_actors.broker import PgNotifyError, PgNotifyLink, open_pg_link
from agor_actors.broker._pglink import MESSAGE_BYTES_MAX, pg_conninfo
from agor_actors.client import connect
from agor_actors.daemon import Hub, open_hub
from agor_actors.world import real_world

pytestmark = needs_pg


def with_name(url: str, application_name: str) -> str:
    """``url`` whose connections show as ``application_name`` (the link's
    own as ``<name>:listen`` and ``<name>:notify``)."""
    named = sa.make_url(url).update_query_dict({"application_name": application_name})
    return named.render_as_string(hide_password=False)


class Inbox:
    """What a session's handlers were given, in order."""

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []
        self._changed = trio.Event()

    def __call__(self, channel: str, message: bytes) -> None:
        self.got.append((channel, message))
        self._changed.set()

    async def until(self, count: int, *, limit_s: float = 10.0) -> list[tuple[str, bytes]]:
        with trio.fail_after(limit_s):
            while len(self.got) < count:
                await self._changed.wait()
                self._changed = trio.Event()
        return self.got


# ---------------------------------------------------------------- the link alone


async def test_messages_arrive_in_order_and_stop_after_unsubscribing() -> None:
    tag = uuid.uuid4().hex[:8]
    short = f"agor:room:session:{tag}"
    long = f"agor:room:board:{tag}:" + "x" * 80  # over the 63-byte identifier limit
    inbox = Inbox()
    async with open_pg_link(PG_URL) as link, link.session() as session:
        await session.subscribe({short: inbox, long: inbox})
        sent = [(short, b"\x00one"), (long, b"two\xff"), (short, b"three"), (long, b"four")]
        await link.publish(sent)
        await link.publish([(short, b"five")])
        assert await inbox.until(5) == [*sent, (short, b"five")]
        await session.unsubscribe([short])
        # one transaction, delivered in order: once "seven" is in, "six" never comes
        await link.publish([(short, b"six"), (long, b"seven")])
        assert (await inbox.until(6))[5:] == [(long, b"seven")]


async def test_a_session_hears_only_its_channels_and_binary_survives() -> None:
    tag = uuid.uuid4().hex[:8]
    mine, other = f"agor:room:a{tag}", f"agor:room:b{tag}"
    inbox = Inbox()
    every_byte = bytes(range(256)) * 3
    async with open_pg_link(PG_URL) as link, link.session() as session:
        await session.subscribe({mine: inbox})
        await link.publish([(other, b"not mine"), (mine, every_byte)])
        assert await inbox.until(1) == [(mine, every_byte)]


async def test_the_longest_message_goes_and_a_longer_one_is_refused() -> None:
    channel = f"agor:room:{uuid.uuid4().hex}"
    inbox = Inbox()
    biggest = bytes(range(256)) * (MESSAGE_BYTES_MAX // 256) + b"z" * (MESSAGE_BYTES_MAX % 256)
    assert len(biggest) == MESSAGE_BYTES_MAX
    async with open_pg_link(PG_URL) as link, link.session() as session:
        assert link.max_message_bytes == MESSAGE_BYTES_MAX
        await session.subscribe({channel: inbox})
        with pytest.raises(ValueError, match="broker message of 5998 bytes"):
            await link.publish([(channel, biggest + b"!")])
        await link.publish([(channel, biggest)])
        assert await inbox.until(1) == [(channel, biggest)]


async def test_a_terminated_listening_connection_ends_the_session() -> None:
    name = f"agor_test_{uuid.uuid4().hex[:10]}"
    async with open_pg_link(with_name(PG_URL, name)) as link, link.session() as session:
        await session.subscribe({"agor:room:t": Inbox()})
        assert terminate_backends(f"{name}:listen") == 1
        with trio.fail_after(10), pytest.raises(PgNotifyError, match="lost"):
            await session.closed()
        with pytest.raises(PgNotifyError):
            await session.subscribe({"agor:room:u": Inbox()})


class FreezingProxy:
    """A TCP forwarder on 127.0.0.1 to the machine's PostgreSQL that, once
    :meth:`freeze` is called, forwards nothing more and closes nothing: a
    server gone silent (a partition with no FIN, no RST)."""

    def __init__(self) -> None:
        self.port = 0
        self.frozen = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = int(listeners[0].socket.getsockname()[1])
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    def freeze(self) -> None:
        self.frozen = True

    async def _handle(self, client: trio.SocketStream) -> None:
        target = sa.make_url(PG_URL)
        async with (
            client,
            await trio.open_tcp_stream(target.host or "", target.port or 5432) as server,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(self._pump, client, server)
            nursery.start_soon(self._pump, server, client)

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        async for chunk in source:
            if self.frozen:
                await trio.sleep_forever()
            await sink.send_all(chunk)


async def test_a_server_gone_silent_ends_the_session_at_the_next_ping() -> None:
    proxy = FreezingProxy()
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        url = sa.make_url(PG_URL).set(host="127.0.0.1", port=proxy.port)
        link = PgNotifyLink(
            pg_conninfo(url.render_as_string(hide_password=False)),
            idle_ping_s=0.2,
            command_timeout_s=0.5,
        )
        async with link.session() as session:
            await session.subscribe({"agor:room:quiet": Inbox()})
            proxy.freeze()
            with (
                trio.fail_after(10),
                pytest.raises(PgNotifyError, match=r"no answer within 0\.5 s"),
            ):
                await session.closed()
        nursery.cancel_scope.cancel()


async def test_publishing_after_its_connection_was_terminated_connects_again() -> None:
    name = f"agor_test_{uuid.uuid4().hex[:10]}"
    channel = f"agor:room:{uuid.uuid4().hex}"
    inbox = Inbox()
    async with open_pg_link(with_name(PG_URL, name)) as link, link.session() as session:
        await session.subscribe({channel: inbox})
        await link.publish([(channel, b"before")])
        assert terminate_backends(f"{name}:notify") == 1
        # the first publish after may find the connection dead (and raise);
        # the next one has a new connection
        failed = 0
        for _attempt in range(2):
            try:
                await link.publish([(channel, b"after")])
                break
            except PgNotifyError:
                failed += 1
        assert failed <= 1
        assert await inbox.until(2) == [(channel, b"before"), (channel, b"after")]


async def test_an_unreachable_server_fails_the_session_with_a_clear_error() -> None:
    link = PgNotifyLink(pg_conninfo("postgresql://postgres@127.0.0.1:1/test"))
    with pytest.raises(PgNotifyError, match="connection failed"):
        async with link.session():
            pass  # pragma: no cover - it must not open
    with pytest.raises(PgNotifyError, match="connection failed"):
        await link.publish([("agor:room:x", b"x")])


# ---------------------------------------------------------------- under two daemons


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_schema() as url:
        yield url


@asynccontextmanager
async def node(pg_url: str, broker_url: str | None = None, **kwargs: Any) -> AsyncIterator[Hub]:
    async with open_hub(
        real_world(),
        db_url=pg_url,
        owner_token=TOKEN,
        broker_url=broker_url or pg_url,
        **kwargs,
    ) as hub:
        yield hub


async def test_an_event_too_long_for_notify_reaches_the_other_daemon_from_the_log(
    pg_url: str,
) -> None:
    async with node(pg_url) as a, node(pg_url) as b:
        assert b.feed is not None
        sid = await make_session(a)
        viewer = await view(b, "vb", f"session:{sid}")
        first = await make_task(a, sid, "small")
        await viewer.until_seq(first)
        resyncs = b.feed.stats.resyncs
        # a prompt longer than a NOTIFY payload: a lost marker goes instead
        big = await make_task(a, sid, "long " + "y" * 8000)
        events = await viewer.until_seq(big)
        assert b.feed.stats.lost == 1 and b.feed.stats.resyncs > resyncs
        last = await make_task(a, sid, "small again")
        events = await viewer.until_seq(last)
        assert_gap_free(events, viewer.joined.seq + 1)
        prompts = [e.data["task"]["prompt"] for e in events if e.event == "task:created"]
        assert prompts == ["small", "long " + "y" * 8000, "small again"]


async def test_a_killed_listening_connection_is_made_again_with_nothing_missing(
    pg_url: str,
) -> None:
    name = f"agor_test_{uuid.uuid4().hex[:10]}"
    async with node(pg_url) as a, node(pg_url, with_name(pg_url, name)) as b:
        assert b.feed is not None
        sid = await make_session(a)
        viewer = await view(b, "vb", f"session:{sid}")
        await viewer.until_seq(await make_task(a, sid, "before"))
        sessions = b.feed.stats.sessions
        assert terminate_backends(f"{name}:listen") == 1
        # written while b has no listening connection (it waits 0.1 s and more
        # before making one again): their notifications never reach b, whose
        # rooms read them from the log once the new connection is up
        during = [await make_task(a, sid, f"during {n}") for n in range(3)]
        await viewer.until_seq(during[-1])
        last = await make_task(a, sid, "after")
        events = await viewer.until_seq(last)
        assert b.feed.stats.sessions == sessions + 1
        assert_gap_free(events, viewer.joined.seq + 1)
        prompts = [e.data["task"]["prompt"] for e in events if e.event == "task:created"]
        assert prompts == ["before", "during 0", "during 1", "during 2", "after"]


# ---------------------------------------------------------------- serve processes


@pytest.mark.timeout(120)
async def test_two_serve_processes_fan_out_through_their_database(
    pg_url: str, tmp_path: pathlib.Path
) -> None:
    async with (
        serving_node(node_data_dir(tmp_path, "a"), pg_url, broker_url=pg_url) as a,
        serving_node(node_data_dir(tmp_path, "b"), pg_url, broker_url=pg_url) as b,
        connect(a.ws_url, token=TOKEN) as writer,
    ):
        made = await writer.service("sessions").create({"title": "over NOTIFY"})
        sid = str(made["id"])
        async with viewing(b.ws_url, f"session:{sid}") as on_b:
            seqs = []
            for prompt in ["one", "two", "long " + "z" * 7000, "three"]:
                task = {"session_id": sid, "prompt": prompt}
                seqs.append(int((await writer.service("tasks").create(task))["_seq"]))
            events = await on_b.until_seq(seqs[-1])
        assert_gap_free(events, on_b.joined.seq + 1)
        prompts = [e.data["task"]["prompt"] for e in events if e.event == "task:created"]
        assert prompts == ["one", "two", "long " + "z" * 7000, "three"]
