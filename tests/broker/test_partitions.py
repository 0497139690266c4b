"""Partitions of a cluster node (issue 14, step 5), on daemons' cores
(hubs) in this process:

- Redis stopped and restarted while a room streams: every acknowledged
  write reaches the viewer on the other daemon, in order, with no gap and
  no duplicate (a pause, then the feed's new connection has the room read
  its log).  The test runs a ``redis-server`` of its own on a free port, so
  the machine's shared Redis is never stopped.
- PostgreSQL unreachable (a TCP forwarder of the test between the daemon
  and the server, closed and reopened): writes fail with ``unavailable``,
  a join that replays from the room's memory is still served, one that
  must read the store (a room not in memory, a resume older than the
  ring) is answered ``unavailable`` at once, and the daemon writes and
  joins again by itself once the server is back; a room that must read its
  log meanwhile (a hole in what the broker brought) holds what it has,
  still serves joins from memory, and reads the log once it can.
"""

from __future__ import annotations

import pathlib
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import sqlalchemy as sa
import trio
from cluster_support import (
    CODEC,
    PG_URL,
    REDIS_URL,
    assert_gap_free,
    create_message,
    fresh_schema,
    make_session,
    make_task,
    message_call,
    needs_cluster,
    view,
)

from agor_actors.daemon import Hub, Outbox, Principal, ServiceError, open_hub
from agor_actors.store import open_store
from agor_actors.world import real_world
from protocols import Event, Left, Limits, Since, decode_server_frame

pytestmark = [needs_cluster, pytest.mark.timeout(120)]
TOKEN = "partition-owner-token"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_schema("agor_partition") as url:
        yield url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- a Redis of our own


class OwnRedis:
    """A ``redis-server`` on ``port`` in ``directory`` (no persistence),
    stopped and started again by the test."""

    def __init__(self, directory: pathlib.Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: trio.Process | None = None

    async def start(self) -> None:
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--dir", str(self.directory), "--save", "", "--appendonly", "no"]
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.process = process
        assert process.stdout is not None
        seen = bytearray()
        with trio.fail_after(15):
            async for chunk in process.stdout:
                seen += chunk
                if b"Ready to accept connections" in seen:
                    return
        raise AssertionError(f"redis-server did not start:\n{seen.decode('utf-8', 'replace')}")

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.kill()
        with trio.CancelScope(shield=True), trio.fail_after(15):
            await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()


@asynccontextmanager
async def own_redis(directory: pathlib.Path) -> AsyncIterator[OwnRedis]:
    redis = OwnRedis(directory, _free_port())
    await redis.start()
    try:
        yield redis
    finally:
        await redis.stop()


async def test_redis_stopped_and_restarted_while_a_room_streams_loses_nothing(
    pg_url: str, tmp_path: pathlib.Path
) -> None:
    async with (
        own_redis(tmp_path) as redis,
        open_hub(real_world(), db_url=pg_url, owner_token=TOKEN, broker_url=redis.url) as a,
        open_hub(real_world(), db_url=pg_url, owner_token=TOKEN, broker_url=redis.url) as b,
    ):
        assert b.feed is not None
        sid = await make_session(a, "P")
        room = f"session:{sid}"
        on_b = await view(b, "vb", room)
        acked = [await make_task(a, sid, f"before {n}") for n in range(5)]
        await on_b.until_seq(acked[-1])
        sessions = b.feed.stats.sessions

        await redis.stop()
        # the store is there: writes are acknowledged; their broadcasts are lost
        acked += [await make_task(a, sid, f"during {n}") for n in range(5)]
        await redis.start()
        acked += [await make_task(a, sid, f"after {n}") for n in range(5)]

        events = await on_b.until_seq(acked[-1], limit_s=30)
        assert_gap_free(events, on_b.joined.seq + 1)  # no gap, no seq twice
        prompts = [e.data["task"]["prompt"] for e in events if e.event == "task:created"]
        assert prompts == [
            *(f"before {n}" for n in range(5)),
            *(f"during {n}" for n in range(5)),
            *(f"after {n}" for n in range(5)),
        ]
        assert {e.seq for e in events} >= set(acked)
        assert b.feed.stats.sessions > sessions  # the feed connected again


@attrs.frozen
class Guest:
    """A guest who sees session ``sid`` through board ``bid``, watching it
    on daemon B (``box``); ``call`` is the local owner's, on daemon A."""

    a: Hub
    owner: Principal
    principal: Principal
    bid: str
    sid: str
    box: Outbox

    @property
    def room(self) -> str:
        return f"session:{self.sid}"

    async def call(self, service: str, method: str, **kw: Any) -> Any:
        return await self.a.call(
            self.owner, connection_id="w", service=service, method=method, **kw
        )


async def guest_on_b(a: Hub, b: Hub) -> Guest:
    owner = await a.authenticate(TOKEN)
    assert owner is not None
    made = await a.call(
        owner, connection_id="w", service="users", method="create", data={"name": "guest"}
    )
    guest = await b.authenticate(made["token"])
    assert guest is not None
    g = Guest(a, owner, guest, "", "", Outbox(CODEC))
    bid = (await g.call("boards", "create", data={"name": "B"}))["id"]
    await g.call("boards", "add_member", id=bid, data={"user_id": guest.user_id, "role": "viewer"})
    sid = (await g.call("sessions", "create", data={"title": "S", "board_id": bid}))["id"]
    g = attrs.evolve(g, bid=bid, sid=sid)
    await b.join(guest, "g", g.box, g.room, None)
    return g


async def test_a_member_removed_while_redis_was_away_sees_nothing_past_it(
    pg_url: str, tmp_path: pathlib.Path
) -> None:
    """A guest who sees a session through its board watches it on daemon B
    (not the board's room). Redis goes away; through daemon A the owner
    removes the guest from the board, then writes to the session. When B's
    feed connects again, its session room reads what it missed from its
    log: before it may deliver any of it, B checks every subscription
    against the store (nothing of B ever shows it the board's event), so
    the guest is told ``left`` ``forbidden`` and sees nothing past it. (It
    used to get the write, until the 30 s sweep; simulator, cluster seeds
    4508 and 4522.)"""
    async with (
        own_redis(tmp_path) as redis,
        open_hub(real_world(), db_url=pg_url, owner_token=TOKEN, broker_url=redis.url) as a,
        open_hub(real_world(), db_url=pg_url, owner_token=TOKEN, broker_url=redis.url) as b,
    ):
        assert b.feed is not None
        g = await guest_on_b(a, b)
        room, box, sid = g.room, g.box, g.sid
        on_b = await view(b, "ob", room)
        seen = await make_task(a, sid, "seen")
        await on_b.until_seq(seen)
        checks = b.feed.stats.gap_checks

        await redis.stop()
        await g.call("boards", "remove_member", id=g.bid, data={"user_id": g.principal.user_id})
        hidden = await make_task(a, sid, "hidden")
        await redis.start()

        got: list[object] = []
        with trio.fail_after(30):
            while not any(isinstance(m, Left) for m in got):
                got += decode_server_frame(CODEC, await box.next_frame(), Limits())
        assert [(m.room, m.reason) for m in got if isinstance(m, Left)] == [(room, "forbidden")]
        assert isinstance(got[-1], Left), "something of the room followed left"
        assert all(m.end_seq < hidden for m in got if isinstance(m, Event)), got
        # B's room did read it, once the feed let it: after the gap check
        # (the guest's ``left`` is sent while the check runs, before it counts)
        await on_b.until_seq(hidden, limit_s=30)
        assert b.feed.stats.gap_checks > checks
        assert len(box) == 0


async def test_a_member_removed_through_another_daemon_is_let_go_while_redis_is_away(
    pg_url: str, tmp_path: pathlib.Path
) -> None:
    """As above, but an agent streams a message into the session through
    the guest's daemon B while Redis is away: B's own writer's events reach
    its subscribers at once, and B hears nothing of the removal A made
    (the chunks touch the session's log only). B checks every subscription
    against the store every ``access_sweep_cut_s`` while its broker
    subscription is down (30 s otherwise), so the guest is told ``left``
    ``forbidden`` while Redis is still away, and gets nothing after it.
    Before, it got every chunk until Redis was back or the 30 s sweep."""
    async with (
        own_redis(tmp_path) as redis,
        open_hub(real_world(), db_url=pg_url, owner_token=TOKEN, broker_url=redis.url) as a,
        open_hub(real_world(), db_url=pg_url, owner_token=TOKEN, broker_url=redis.url) as b,
    ):
        assert b.feed is not None
        b.access_sweep_cut_s = 0.2
        g = await guest_on_b(a, b)
        room, box, sid = g.room, g.box, g.sid
        seen = await make_task(b, sid, "seen")
        got: list[object] = []
        with trio.fail_after(10):
            while not any(isinstance(m, Event) and m.seq == seen for m in got):
                got += decode_server_frame(CODEC, await box.next_frame(), Limits())

        await redis.stop()
        with trio.fail_after(10):
            await b.feed.lost.wait()
        await g.call("boards", "remove_member", id=g.bid, data={"user_id": g.principal.user_id})

        # a streamed message: events of the session's log only (a write that
        # touches the board's log too would have B's board room read the
        # removal, through the gap the write shows it)
        async def stream(chunk: str) -> int:
            done = await message_call(b, "stream", mid, data={"chunk": chunk})
            return int(done["_seq"])

        mid = await create_message(b, sid)
        got = []
        with trio.fail_after(10):  # (the 30 s sweep would not come in time)
            while not any(isinstance(m, Left) for m in got):
                await stream("written on B;")
                with trio.move_on_after(0.1):
                    got += decode_server_frame(CODEC, await box.next_frame(), Limits())
        assert [(m.room, m.reason) for m in got if isinstance(m, Left)] == [(room, "forbidden")]
        after = await stream("after;")
        assert all(m.end_seq < after for m in got if isinstance(m, Event))
        assert isinstance(got[-1], Left) and len(box) == 0
        assert not b.feed.connected.is_set()  # all of it while Redis was away
        await redis.start()


# ---------------------------------------------------------------- PostgreSQL cut off


class Forwarder:
    """A TCP forwarder on 127.0.0.1 to ``target``: :meth:`cut` closes every
    forwarded connection and refuses new ones (closes them at once) until
    :meth:`restore`."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.open = True
        self._scopes: set[trio.CancelScope] = set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = int(listeners[0].socket.getsockname()[1])
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    def cut(self) -> None:
        self.open = False
        for scope in list(self._scopes):
            scope.cancel()

    def restore(self) -> None:
        self.open = True

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            if not self.open:
                return
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                try:
                    server = await trio.open_tcp_stream(*self.target)
                    async with server, trio.open_nursery() as nursery:
                        nursery.start_soon(_pump, client, server, nursery.cancel_scope)
                        nursery.start_soon(_pump, server, client, nursery.cancel_scope)
                except OSError:
                    pass
                finally:
                    self._scopes.discard(scope)


async def _pump(source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope) -> None:
    try:
        async for chunk in source:
            await sink.send_all(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    done.cancel()


def _through(url: str, port: int) -> str:
    return sa.make_url(url).set(host="127.0.0.1", port=port).render_as_string(hide_password=False)


async def test_postgresql_unreachable_writes_fail_unavailable_reads_from_memory_go_on(
    pg_url: str,
) -> None:
    target = sa.make_url(PG_URL)
    forwarder = Forwarder((target.host or "127.0.0.1", target.port or 5432))
    async with trio.open_nursery() as nursery:
        await nursery.start(forwarder.run)
        url = _through(pg_url, forwarder.port)
        async with open_hub(real_world(), db_url=url, owner_token=TOKEN, broker_url=REDIS_URL) as a:
            sid = await make_session(a, "P")
            room = f"session:{sid}"
            first = await view(a, "v1", room)
            acked = [await make_task(a, sid, f"before {n}") for n in range(3)]
            await first.until_seq(acked[-1])

            forwarder.cut()
            with trio.fail_after(30):
                with pytest.raises(ServiceError) as refused:
                    await make_task(a, sid, "while cut")
            assert refused.value.code == "unavailable"
            # the room is in memory: a join that resumes from it is served
            with trio.fail_after(10):
                second = await view(a, "v2", room, Since(first.joined.epoch, acked[0]))
            replayed = await second.until_seq(acked[-1])
            assert [e.seq for e in replayed] == acked[1:]

            forwarder.restore()  # the daemon recovers by itself: no restart, no call
            with trio.fail_after(30):
                after = await make_task(a, sid, "after")
            events = await first.until_seq(after)
            assert_gap_free(events, first.joined.seq + 1)
            prompts = [e.data["task"]["prompt"] for e in events if e.event == "task:created"]
            assert prompts == ["before 0", "before 1", "before 2", "after"]
            assert (await second.until_seq(after))[-1].seq == after
        nursery.cancel_scope.cancel()


async def test_postgresql_unreachable_a_join_that_must_read_the_store_is_left_unavailable(
    pg_url: str,
) -> None:
    target = sa.make_url(PG_URL)
    forwarder = Forwarder((target.host or "127.0.0.1", target.port or 5432))
    async with trio.open_nursery() as nursery:
        await nursery.start(forwarder.run)
        url = _through(pg_url, forwarder.port)
        async with (
            open_hub(
                real_world(), db_url=url, owner_token=TOKEN, broker_url=REDIS_URL, ring_size=2
            ) as a,
            open_hub(real_world(), db_url=pg_url, owner_token=TOKEN, broker_url=REDIS_URL) as b,
        ):
            sid = await make_session(a, "in memory")
            room = f"session:{sid}"
            first = await view(a, "v1", room)
            acked = [await make_task(a, sid, f"before {n}") for n in range(5)]
            await first.until_seq(acked[-1])
            elsewhere = await make_session(b, "made on b")  # never in a's memory
            known = await make_session(b, "seen by a's gate")
            assert await a.gate.session(known) is not None  # its access is cached, not its room

            forwarder.cut()
            # a room this daemon has not in memory: whether it exists is in
            # the store (not "forbidden": the store could not say)
            with trio.fail_after(30):
                with pytest.raises(ServiceError) as cold:
                    await view(a, "v2", f"session:{elsewhere}")
            assert cold.value.code == "unavailable"
            # one whose access is known: the room's head is in the store
            with trio.fail_after(30):
                with pytest.raises(ServiceError) as headless:
                    await view(a, "v2", f"session:{known}")
            assert headless.value.code == "unavailable"
            # a resume older than the room's ring (2 events): from the log
            with trio.fail_after(30):
                with pytest.raises(ServiceError) as old:
                    await view(a, "v3", room, Since(first.joined.epoch, acked[0]))
            assert old.value.code == "unavailable"
            # the room still serves what it holds, and its viewer stays
            with trio.fail_after(10):
                recent = await view(a, "v4", room, Since(first.joined.epoch, acked[-2]))
            assert [e.seq for e in await recent.until_seq(acked[-1])] == acked[-1:]

            forwarder.restore()
            with trio.fail_after(30):
                again = await view(a, "v5", f"session:{elsewhere}")
                resumed = await view(a, "v6", room, Since(first.joined.epoch, acked[0]))
            await again.until_seq(await make_task(b, elsewhere, "live again"))
            assert again.joined.seq >= 1
            assert [e.seq for e in await resumed.until_seq(acked[-1])] == acked[1:]
            after = await make_task(a, sid, "after")
            events = await first.until_seq(after)
            assert_gap_free(events, first.joined.seq + 1)
        nursery.cancel_scope.cancel()


async def test_postgresql_unreachable_a_room_that_must_read_its_log_waits_and_then_reads_it(
    pg_url: str,
) -> None:
    target = sa.make_url(PG_URL)
    forwarder = Forwarder((target.host or "127.0.0.1", target.port or 5432))
    async with trio.open_nursery() as nursery:
        await nursery.start(forwarder.run)
        url = _through(pg_url, forwarder.port)
        async with (
            open_hub(real_world(), db_url=url, owner_token=TOKEN, broker_url=REDIS_URL) as a,
            open_hub(real_world(), db_url=pg_url, owner_token=TOKEN, broker_url=REDIS_URL) as b,
        ):
            sid = await make_session(b, "P")
            room = f"session:{sid}"
            viewer = await view(a, "v1", room)
            before = await make_task(b, sid, "before")
            await viewer.until_seq(before)

            forwarder.cut()
            # a write that is never broadcast (a daemon that publishes
            # nothing), then one that is: a's room sees a hole and must read
            # its log, which it cannot
            silent_store = open_store(pg_url, new_epoch=lambda: "unused", shared=True)
            try:
                async with open_hub(real_world(), store=silent_store, owner_token=TOKEN) as silent:
                    await make_task(silent, sid, "unannounced")
            finally:
                silent_store.close()
            await make_task(b, sid, "during")
            # the room holds what came after the hole (its read of the log
            # fails, to be tried again), and serves a join from its memory
            # meanwhile: it has not crashed.  (Whether its read fell within
            # the cut is likely, the broadcast taking a millisecond, but not
            # observed.)
            with trio.fail_after(10):
                second = await view(a, "v2", room, Since(viewer.joined.epoch, before - 1))
            assert [e.seq for e in await second.until_seq(before)] == [before]
            forwarder.restore()
            after = await make_task(b, sid, "after")
            events = await viewer.until_seq(after, limit_s=30)
            assert_gap_free(events, viewer.joined.seq + 1)
            prompts = [e.data["task"]["prompt"] for e in events if e.event == "task:created"]
            assert prompts == ["before", "unannounced", "during", "after"]
        nursery.cancel_scope.cancel()
