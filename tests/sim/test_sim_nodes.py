"""The simulator's multi-node runs (``--profile cluster``): several real
hubs on one in-memory store (each its own shared ``SqlStore`` and store
seam) and one simulated broker.  In process: a node cut from the broker
repairs its rooms from the store, a node cut from the store answers writes
``unavailable`` and recovers.  Through ``python -m sim``: a small sweep is
green, replays exactly, and catches the planted ``two_nodes_one_seq``."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from sim_support import run_sim

from agor_actors.daemon import Hub, Outbox, Principal, ServiceError, open_hub
from agor_actors.domain.presence import PresenceConfig
from agor_actors.store import SqlStore, open_store
from agor_actors.world import InlineBlocking, SeededEntropy, simulated_world
from protocols import Codec, Event, Joined, Limits, Since, decode_server_frame
from sim import draw_config
from sim._broker import SimBroker
from sim._config import NODE_BEATS
from sim._faults import FaultyBlocking, StoreFaults
from sim._trace import Trace

OWNER = Principal("owner", "owner", True)


@attrs.define
class Cluster:
    store: SqlStore
    """The simulator's own store object (reads only)."""
    broker: SimBroker
    hubs: list[Hub]
    cut: list[bool]
    """Per node: cut from the store."""


@asynccontextmanager
async def cluster(nodes: int = 2, cut_wait_us: int = 0) -> AsyncIterator[Cluster]:
    trace = Trace()
    epochs = SeededEntropy("nodes/epochs")
    wall = simulated_world("nodes").wall
    store = open_store("sqlite://", new_epoch=lambda: epochs.new_id(wall.now_ms()))
    faults = StoreFaults(store, trace)
    broker = SimBroker(1, trace, latency_us=(1_000, 500))
    cut = [False] * nodes
    try:
        async with AsyncExitStack() as stack:
            hubs: list[Hub] = []
            for n in range(nodes):
                world = simulated_world(f"nodes/{n}")

                def is_cut(n: int = n) -> bool:
                    return cut[n]

                world = attrs.evolve(
                    world,
                    blocking=FaultyBlocking(
                        InlineBlocking(), faults, cut=is_cut, cut_wait_us=cut_wait_us
                    ),
                )
                own = SqlStore(store.engine, new_epoch=lambda: epochs.new_id(0), shared=True)
                hub = await stack.enter_async_context(
                    open_hub(world, store=own, owner_token="t", broker=broker.link(n, 1))
                )
                hubs.append(hub)
            yield Cluster(store, broker, hubs, cut)
    finally:
        store.close()


async def call(hub: Hub, service: str, method: str, **kw: Any) -> dict[str, Any]:
    result = await hub.call(OWNER, connection_id="c", service=service, method=method, **kw)
    assert isinstance(result, dict)
    return result


async def read(outbox: Outbox, until: Callable[[list[Any]], bool], limit_s: float) -> list[Any]:
    got: list[Any] = []
    with trio.move_on_after(limit_s):
        while not until(got):
            got.extend(decode_server_frame(outbox.codec, await outbox.next_frame(), Limits()))
    return got


def seqs(messages: list[Any]) -> list[int]:
    return [m.seq for m in messages if isinstance(m, Event)]


async def test_a_node_cut_from_the_broker_repairs_its_rooms_from_the_store(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with cluster() as c:
        writer, reader = c.hubs
        session = await call(writer, "sessions", "create", data={"title": "S"})
        sid, room = session["id"], f"session:{session['id']}"
        out = Outbox(Codec.JSON)
        await reader.join(OWNER, "viewer", out, room, None)
        joined = await read(out, lambda m: any(isinstance(x, Joined) for x in m), 5)
        assert isinstance(joined[0], Joined) and joined[0].seq == 1
        for n in range(3):
            await call(writer, "sessions", "patch", id=sid, data={"title": f"a{n}"})
        live = await read(out, lambda m: seqs(m)[-1:] == [4], 5)
        assert seqs(live) == [2, 3, 4]  # over the broker, from the other node

        assert reader.feed is not None
        sessions = reader.feed.stats.sessions
        published = c.broker.published
        c.broker.cut(1, 3_000_000)
        for n in range(5):
            await call(writer, "sessions", "patch", id=sid, data={"title": f"b{n}"})
        during = await read(out, lambda m: False, 2.5)
        assert seqs(during) == []  # nothing reached it while cut
        assert c.broker.published > published  # published meanwhile: lost for the cut node

        repaired = await read(out, lambda m: seqs(m)[-1:] == [9], 30)
        assert seqs(repaired) == [5, 6, 7, 8, 9]  # read from the store: in order, no gap
        assert reader.feed.stats.sessions > sessions  # a new subscription connection
        assert c.store.room_head(room) == (joined[0].epoch, 9)


@pytest.mark.parametrize("cut_wait_s", [0, 5])
async def test_a_node_cut_from_the_store_answers_unavailable_and_recovers(
    autojump_clock: trio.testing.MockClock, cut_wait_s: int
) -> None:
    """A node cut from the store refuses writes as ``unavailable``: at once
    (the server's port closed) or after the store's connect timeout
    (packets dropped), while the other node goes on writing meanwhile."""
    async with cluster(cut_wait_us=cut_wait_s * 1_000_000) as c:
        first, second = c.hubs
        session = await call(first, "sessions", "create", data={"title": "S"})
        sid, room = session["id"], f"session:{session['id']}"
        out = Outbox(Codec.JSON)
        await first.join(OWNER, "viewer", out, room, None)
        await read(out, lambda m: any(isinstance(x, Joined) for x in m), 5)
        await trio.sleep(0.01)  # (a later stamp: a patch in the same ms as the create loses)
        await call(second, "sessions", "patch", id=sid, data={"title": "before"})

        c.cut[1] = True
        await trio.sleep(0.01)
        refused_at: list[float] = []

        async def cut_write() -> None:
            with pytest.raises(ServiceError) as refused:
                await call(second, "sessions", "patch", id=sid, data={"title": "cut"})
            assert refused.value.code == "unavailable"
            refused_at.append(trio.current_time())

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cut_write)
            await trio.sleep(0.01)
            await call(first, "sessions", "patch", id=sid, data={"title": "other node"})
            assert trio.current_time() - started < 1  # not held up by the other node's wait
        assert cut_wait_s <= refused_at[0] - started < cut_wait_s + 1

        c.cut[1] = False
        await trio.sleep(1)
        await call(second, "sessions", "patch", id=sid, data={"title": "after"})
        got = await read(out, lambda m: seqs(m)[-1:] == [4], 10)
        assert seqs(got) == [2, 3, 4]
        titles = [e.data["updates"]["title"] for e in c.store.events_since(room, 1, 10)]
        assert titles == ["before", "other node", "after"]  # nothing of the refused write
        row = c.store.get("sessions", sid)
        assert row is not None and row["title"] == "after"


def test_the_cluster_profile_draws_several_nodes_and_leaves_single_seeds_alone() -> None:
    on = {"broker_cut": 0, "store_cut": 0}
    for seed in range(50):
        config = draw_config(seed, "cluster")
        assert config.nodes in (2, 3)
        assert "epoch_reset" not in dict(config.faults)
        for kind in on:
            on[kind] += kind in dict(config.faults)
        single = draw_config(seed, "ci")
        assert single.nodes == 1
        assert not {"broker_cut", "store_cut"} & set(dict(single.faults))
        assert "nodes" not in single.describe()
    assert all(0 < n < 50 for n in on.values()), on  # swarm: on in some seeds, off in others


def test_cluster_seeds_draw_the_nodes_heartbeat_and_liveness() -> None:
    """The daemon's own (5 s, 15 s) or shorter, so that a dead node's users
    leave the facepiles within a run in some seeds; one node keeps the
    daemon's defaults, which nothing in it reads."""
    drawn = {
        (c.node_heartbeat_s, c.node_liveness_s)
        for c in (draw_config(seed, "cluster") for seed in range(40))
    }
    assert drawn == set(NODE_BEATS)
    assert all(liveness > heartbeat for heartbeat, liveness in NODE_BEATS)
    defaults = PresenceConfig()
    single = draw_config(3, "ci")
    assert (single.node_heartbeat_s, single.node_liveness_s) == (
        defaults.node_heartbeat_s,
        defaults.node_liveness_s,
    )
    assert "vanished" not in single.describe()


def test_a_dead_nodes_users_leaving_after_the_liveness_is_not_counted_late() -> None:
    """A node killed (or cut from the broker) keeps its users on the other
    nodes' facepiles until it has gone unheard for the liveness, from its
    last heartbeat: by design, not a late facepile.  Cluster seed 33061 was
    such a run (a node killed at 15.8 s, its user dropped 8.8 s after the
    rooms settled, counted late); the session's later read paths moved its
    schedule off that case, so the allowance is checked as a rule here."""
    from sim._runner import PRESENCE_LAG_S, presence_allowance_s

    cluster = next(
        c
        for c in (draw_config(seed, "cluster") for seed in range(33000, 33100))
        if (c.node_heartbeat_s, c.node_liveness_s) == (5.0, 15.0)
    )
    assert cluster.nodes > 1
    assert presence_allowance_s(cluster) == cluster.grace_s + PRESENCE_LAG_S + 15.0 + 5.0
    single = draw_config(3, "ci")
    assert single.nodes == 1
    assert presence_allowance_s(single) == single.grace_s + PRESENCE_LAG_S


@pytest.mark.slow
def test_a_small_multi_node_sweep_is_green_and_replays(tmp_path: pathlib.Path) -> None:
    status, summary, output = run_sim(
        tmp_path, "--seeds", "6", "--profile", "cluster", "--skip-known", "--jobs", "2"
    )
    assert status == 0, output
    results = summary["results"]
    assert [r["ok"] for r in results] == [True] * 6
    injected: dict[str, int] = {}
    for r in results:
        for kind, n in r["injected"].items():
            injected[kind] = injected.get(kind, 0) + n
    assert injected.get("broker_cut") and injected.get("store_cut"), injected
    # the nodes' commits contended for their rooms' locks (sim/_locks.py)
    assert summary["totals"]["store_locks"].get("waited", 0) > 0, summary["totals"]
    _, again, _ = run_sim(tmp_path, "--seed", "2", "--profile", "cluster", "--skip-known")
    for key in ("trace_hash", "rng_hash", "steps"):  # a fresh process replays it exactly
        assert again[key] == results[2][key], key


def test_the_quiet_phase_waits_for_a_revocation_a_cut_node_checks_once_the_store_is_back(
    tmp_path: pathlib.Path,
) -> None:
    # the viewer guest is on node 1, cut from the store from 5.49 s, before
    # the revocation (6.69 s), until the faults stop at 8 s: its rooms hold
    # their deliveries at the revocation and check it again once the store
    # is back; without the access predicate the run converged at 8.1 s and
    # reported the guest "still live after revocation" before that check
    # could run (it sends left forbidden at 8.23 s).  (Seed 44 showed it
    # first; a later change to the sessions' reads moved its timings.)
    status, result, output = run_sim(
        tmp_path,
        "--seed",
        "121",
        "--profile",
        "cluster",
        "--only",
        "store_cut,daemon_crash",
    )
    assert status == 0 and result["ok"], output
    assert result["counters"].get("access:left_revoked") == 4, result["counters"]
    assert result["converged_s"] > 8.2


@pytest.mark.parametrize(
    "seed",
    [
        # a join checked before a revocation another node committed, sent
        # once its room's registry had restarted 10 s later: `joined`, then
        # `left` (now checked again before it is sent)
        261,
        # a join from past a lagging room's head answered at the older head
        # while the log's next events waited for an access check
        444,
    ],
)
def test_cluster_seeds_that_found_join_bugs_stay_green(tmp_path: pathlib.Path, seed: int) -> None:
    status, result, output = run_sim(tmp_path, "--seed", str(seed), "--profile", "cluster")
    assert status == 0 and result["ok"], output


@pytest.mark.slow
def test_the_multi_node_sweep_catches_two_nodes_assigning_one_seq(tmp_path: pathlib.Path) -> None:
    # the multi-node CI sweep as it runs (--skip-known): it fails seeds 0
    # and 2 (5 of the first 20 seeds, as 'log', 'seq', 'ack', 'mirror')
    status, summary, output = run_sim(
        tmp_path,
        "--seeds",
        "3",
        "--jobs",
        "2",
        "--profile",
        "cluster",
        "--plant",
        "two_nodes_one_seq",
        "--skip-known",
        "--stop-after",
        "1",
        "--timeout",
        "60",
    )
    failures = [r for r in summary["results"] if not r["ok"]]
    assert status == 1 and failures, f"two_nodes_one_seq went unnoticed:\n{output}"
    found = {v["kind"] for r in failures for v in r["violations"]}
    assert found & {"seq", "log", "ack"}, found


async def test_a_client_resuming_on_a_node_whose_room_is_behind_is_not_told_an_older_head(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A client that saw a room through one node and resumes on another
    whose room has not heard of the latest commits yet (its broadcasts were
    lost: the node is cut from the broker) must not be answered ``joined``
    at that room's older head: the room reads its log first."""
    async with cluster() as c:
        first, second = c.hubs
        session = await call(first, "sessions", "create", data={"title": "S"})
        sid, room = session["id"], f"session:{session['id']}"
        behind = Outbox(Codec.JSON)
        await second.join(OWNER, "on-second", behind, room, None)  # its room runs, at seq 1
        joined = (await read(behind, lambda m: any(isinstance(x, Joined) for x in m), 5))[0]
        assert isinstance(joined, Joined) and joined.seq == 1
        c.broker.cut(1, 60_000_000)  # nothing reaches the second node meanwhile
        viewer = Outbox(Codec.JSON)
        await first.join(OWNER, "viewer", viewer, room, None)
        for n in range(3):
            await trio.sleep(0.01)
            await call(first, "sessions", "patch", id=sid, data={"title": f"t{n}"})
        seen = await read(viewer, lambda m: seqs(m)[-1:] == [4], 5)
        assert seqs(seen) == [2, 3, 4]

        # the viewer's connection moves to the second node (within its
        # room's head check period: nothing repaired it yet)
        moved = Outbox(Codec.JSON)
        await second.join(OWNER, "viewer-again", moved, room, Since(joined.epoch, 4))
        got = await read(moved, lambda m: any(isinstance(x, Joined) for x in m), 5)
        again = next(x for x in got if isinstance(x, Joined))
        assert (again.seq, again.recovered) == (4, True)


async def test_a_join_past_a_lagging_rooms_head_is_refused_while_its_log_cannot_be_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """As above, but the second node is cut from the store too: its room
    cannot read its log, so the join from past its head is answered
    ``unavailable`` (the client joins again later), not ``joined`` at the
    room's older head (simulator, cluster seed 115)."""
    async with cluster() as c:
        first, second = c.hubs
        session = await call(first, "sessions", "create", data={"title": "S"})
        sid, room = session["id"], f"session:{session['id']}"
        behind = Outbox(Codec.JSON)
        await second.join(OWNER, "on-second", behind, room, None)
        joined = (await read(behind, lambda m: any(isinstance(x, Joined) for x in m), 5))[0]
        assert isinstance(joined, Joined) and joined.seq == 1
        c.broker.cut(1, 60_000_000)
        for n in range(3):
            await trio.sleep(0.01)
            await call(first, "sessions", "patch", id=sid, data={"title": f"t{n}"})
        c.cut[1] = True
        moved = Outbox(Codec.JSON)
        with pytest.raises(ServiceError) as refused:
            await second.join(OWNER, "viewer-again", moved, room, Since(joined.epoch, 4))
        assert refused.value.code == "unavailable"
        assert not any(isinstance(x, Joined) for x in await read(moved, lambda m: False, 1))

        c.cut[1] = False  # the store is back: the same join is answered from the log
        again_out = Outbox(Codec.JSON)
        await second.join(OWNER, "viewer-again", again_out, room, Since(joined.epoch, 4))
        got = await read(again_out, lambda m: any(isinstance(x, Joined) for x in m), 5)
        again = next(x for x in got if isinstance(x, Joined))
        assert (again.seq, again.recovered) == (4, True)


async def test_two_nodes_started_together_on_an_empty_database_both_start(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Both find no owner and both insert it (the same row, from the same
    token): the second insert's conflict is the first one's owner."""
    trace = Trace()
    epochs = SeededEntropy("together/epochs")
    store = open_store("sqlite://", new_epoch=lambda: epochs.new_id(0))
    faults = StoreFaults(store, trace)
    broker = SimBroker(2, trace, latency_us=(1_000, 0))
    up: list[int] = []
    both, done = trio.Event(), trio.Event()
    try:
        async with trio.open_nursery() as nursery:

            async def node(n: int) -> None:
                # store calls that take time: both read before either writes
                world = attrs.evolve(
                    simulated_world(f"together/{n}"),
                    blocking=FaultyBlocking(InlineBlocking(), faults, latency_us=2_000),
                )
                own = SqlStore(store.engine, new_epoch=lambda: epochs.new_id(0), shared=True)
                async with open_hub(world, store=own, owner_token="t", broker=broker.link(n, 1)):
                    up.append(n)
                    if len(up) == 2:
                        both.set()
                    await done.wait()

            nursery.start_soon(node, 0)
            nursery.start_soon(node, 1)
            with trio.fail_after(5):
                await both.wait()
            done.set()
        assert sorted(up) == [0, 1]
        owner = store.get("users", "owner")
        assert owner is not None and owner["is_owner"]
    finally:
        store.close()


async def test_a_lost_broadcast_of_a_rooms_only_commit_is_found_by_its_head_check(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A cluster node's room that started with a subscriber and was sent
    nothing since (the broadcast of the one commit was lost: its writer
    could not reach the broker) reads its log's head within its head check
    period all the same."""
    async with cluster() as c:
        writer, reader = c.hubs
        session = await call(writer, "sessions", "create", data={"title": "S"})
        sid, room = session["id"], f"session:{session['id']}"
        out = Outbox(Codec.JSON)
        await reader.join(OWNER, "viewer", out, room, None)
        joined = await read(out, lambda m: any(isinstance(x, Joined) for x in m), 5)
        assert isinstance(joined[0], Joined) and joined[0].seq == 1
        c.broker.cut(0, 60_000_000)  # the writer's publishes fail; the reader's session stays
        await trio.sleep(0.01)
        await call(writer, "sessions", "patch", id=sid, data={"title": "lost broadcast"})
        assert reader.feed is not None and reader.feed.connected.is_set()
        started = trio.current_time()
        got = await read(out, lambda m: seqs(m)[-1:] == [2], 10)
        assert seqs(got) == [2]
        assert trio.current_time() - started <= 5.5  # head_check_s, and a read
