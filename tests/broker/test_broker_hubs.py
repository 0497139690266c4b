"""Two daemons' cores (hubs) in this process, on one PostgreSQL schema and
either broker (the machine's Redis, or LISTEN/NOTIFY on that database): a
write on one reaches a viewer on the other, in order; a broadcast that
never arrives is read from the store; a daemon subscribes only to the rooms
its clients joined."""

from __future__ import annotations

import pathlib
import shutil
from typing import Any

import pytest
import trio
from cluster_support import (
    HUB_TOKEN,
    assert_gap_free,
    hub_node,
    make_session,
    make_task,
    needs_pg,
    view,
)

from agor_actors.daemon import NotClusterKeys, NotClusterOwner, open_hub
from agor_actors.store import open_store
from agor_actors.world import real_world
from protocols import Since

pytestmark = needs_pg


async def test_a_write_on_one_daemon_reaches_a_viewer_on_the_other(
    pg_url: str, broker_url: str
) -> None:
    async with hub_node(pg_url, broker_url) as a, hub_node(pg_url, broker_url) as b:
        sid = await make_session(a)
        room = f"session:{sid}"
        on_a = await view(a, "va", room)
        on_b = await view(b, "vb", room)
        seqs = []
        for n in range(5):
            writer = a if n % 2 == 0 else b  # both daemons write the room
            seqs.append(await make_task(writer, sid, f"p{n}"))
        assert sorted(seqs) == seqs and len(set(seqs)) == 5
        got_a = await on_a.until_seq(seqs[-1])
        got_b = await on_b.until_seq(seqs[-1])
        first = on_b.joined.seq + 1
        assert_gap_free(got_b, first)
        assert [(e.seq, e.event, e.data) for e in got_a if e.seq >= first] == [
            (e.seq, e.event, e.data) for e in got_b
        ]
        assert b.feed is not None and b.feed.stats.delivered >= 1


async def test_a_broadcast_that_never_came_is_read_from_the_store(
    pg_url: str, broker_url: str
) -> None:
    async with hub_node(pg_url, broker_url) as a, hub_node(pg_url, broker_url) as b:
        sid = await make_session(a)
        room = f"session:{sid}"
        viewer = await view(b, "vb", room)
        head = await make_task(a, sid, "before")
        await viewer.until_seq(head)
        # a third daemon on the same database that publishes nothing: its
        # commits reach b only as a hole in the seqs of the next broadcast
        store = open_store(pg_url, new_epoch=lambda: "unused", shared=True)
        try:
            async with open_hub(real_world(), store=store, owner_token=HUB_TOKEN) as silent:
                for n in range(3):
                    await make_task(silent, sid, f"unannounced {n}")
        finally:
            store.close()
        last = await make_task(a, sid, "after")
        events = await viewer.until_seq(last)
        assert_gap_free(events, viewer.joined.seq + 1)
        assert [e.data["task"]["prompt"] for e in events if e.event == "task:created"][-5:] == [
            "before",
            "unannounced 0",
            "unannounced 1",
            "unannounced 2",
            "after",
        ]


async def test_a_viewer_that_resumes_on_the_other_daemon_gets_what_it_missed(
    pg_url: str, broker_url: str
) -> None:
    async with hub_node(pg_url, broker_url) as a, hub_node(pg_url, broker_url) as b:
        sid = await make_session(a)
        room = f"session:{sid}"
        on_a = await view(a, "v", room)
        seen = await on_a.until_seq(await make_task(a, sid, "seen"))
        await a.disconnect("v")
        missed = [await make_task(a, sid, f"missed {n}") for n in range(3)]
        resumed = await view(b, "v", room, Since(on_a.joined.epoch, seen[-1].end_seq))
        events = await resumed.until_seq(missed[-1])
        assert resumed.joined.recovered and resumed.joined.epoch == on_a.joined.epoch
        assert [e.seq for e in events] == missed


async def test_a_daemon_subscribes_only_to_the_rooms_its_clients_joined(
    pg_url: str, broker_url: str
) -> None:
    async with hub_node(pg_url, broker_url) as a, hub_node(pg_url, broker_url) as b:
        assert a.feed is not None and b.feed is not None
        first, second = await make_session(a), await make_session(a)
        await view(b, "vb", f"session:{first}")
        assert b.feed.wanted() == [f"session:{first}"]
        assert a.feed.wanted() == []
        before = b.feed.stats.received
        with trio.fail_after(10):
            await make_task(a, second, "not wanted on b")
            await b.feed.connected.wait()
        assert b.feed.stats.received == before
        await b.leave("vb", f"session:{first}")
        assert b.feed.wanted() == []


async def test_a_node_with_another_owner_token_refuses_to_start(
    pg_url: str, broker_url: str
) -> None:
    async with hub_node(pg_url, broker_url) as a:
        await make_session(a)
        with pytest.RaisesGroup(NotClusterOwner, allow_unwrapped=True, flatten_subgroups=True):
            async with open_hub(
                real_world(), db_url=pg_url, owner_token="another", broker_url=broker_url
            ):
                pass  # pragma: no cover - it must not start
        # a's owner token still works
        assert await a.authenticate(HUB_TOKEN) is not None


async def test_the_owner_token_of_a_cluster_is_renewed_and_copied(
    pg_url: str, broker_url: str, tmp_path: pathlib.Path
) -> None:
    """Renewed on one node, the owner's token is written to that node's
    data dir; another node refuses the old one after its sweep, and will
    not start again with the old file, only with a copy of the new."""
    from agor_actors.cli import read_token

    a_dir, b_dir = tmp_path / "a", tmp_path / "b"

    def node(data_dir: pathlib.Path) -> Any:
        return open_hub(real_world(), db_url=pg_url, data_dir=data_dir, broker_url=broker_url)

    async with node(a_dir) as a:
        old = read_token(a_dir)
        b_dir.mkdir()
        for name in ("token", "jwt-secret"):  # the owner token and the keys
            shutil.copy(a_dir / name, b_dir / name)
        async with node(b_dir) as b:
            assert await b.authenticate(old) is not None
            owner = await a.authenticate(old)
            assert owner is not None
            renewed = await a.call(
                owner, connection_id=None, service="users", method="rotate_token", id="owner"
            )
            new = renewed["token"]
            assert read_token(a_dir) == new and read_token(b_dir) == old
            assert await a.authenticate(old) is None
            await b._find_removed()  # its sweep
            assert await b.authenticate(old) is None
            assert await b.authenticate(new) is not None
        with pytest.RaisesGroup(NotClusterOwner, allow_unwrapped=True, flatten_subgroups=True):
            async with node(b_dir):
                pass  # pragma: no cover - it must not start
        shutil.copy(a_dir / "token", b_dir / "token")
        async with node(b_dir) as b:
            assert await b.authenticate(new) is not None


async def test_a_node_whose_keys_are_not_the_clusters_refuses_to_start(
    pg_url: str, broker_url: str, tmp_path: pathlib.Path
) -> None:
    """A node with a jwt-secret of its own would sign access tokens the
    other nodes refuse (and refuse theirs): a user signed in through it is
    signed out whenever a load balancer sends them elsewhere.  It refuses
    to start, naming the file to copy; ``new_keys`` makes its keys the
    cluster's (after changing every node's on purpose), and then a node
    with the old keys is the one refused."""
    from agor_actors.cli import read_token

    a_dir, b_dir = tmp_path / "a", tmp_path / "b"

    def node(data_dir: pathlib.Path, **kwargs: Any) -> Any:
        return open_hub(
            real_world(), db_url=pg_url, data_dir=data_dir, broker_url=broker_url, **kwargs
        )

    async with node(a_dir) as a:
        b_dir.mkdir()
        shutil.copy(a_dir / "token", b_dir / "token")  # the owner token, not the keys
        with pytest.RaisesGroup(
            pytest.RaisesExc(NotClusterKeys, match=r"b/jwt-secret .* is not the cluster's"),
            allow_unwrapped=True,
            flatten_subgroups=True,
        ):
            async with node(b_dir):
                pass  # pragma: no cover - it must not start
        shutil.copy(a_dir / "jwt-secret", b_dir / "jwt-secret")
        async with node(b_dir) as b:  # the same keys: each takes the other's tokens
            owner = await a.authenticate(read_token(a_dir))
            assert owner is not None
            await a.call(
                owner,
                connection_id=None,
                service="users",
                method="create",
                data={"name": "ann", "password": "correct horse battery"},
            )
            assert a.identity is not None
            signed_in = await a.identity.create(
                {"strategy": "local", "name": "ann", "password": "correct horse battery"}
            )
            assert await b.authenticate(signed_in["accessToken"]) is not None
    (b_dir / "jwt-secret").write_text("a-new-key-for-every-node-" + "n" * 40 + "\n")
    async with node(b_dir, new_keys=True):
        pass
    with pytest.RaisesGroup(NotClusterKeys, allow_unwrapped=True, flatten_subgroups=True):
        async with node(a_dir):  # still the old key
            pass  # pragma: no cover - it must not start
    shutil.copy(b_dir / "jwt-secret", a_dir / "jwt-secret")
    async with node(a_dir), node(b_dir):
        pass
