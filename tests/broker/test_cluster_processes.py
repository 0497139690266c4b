"""A cluster of real ``agor-actors serve --db postgresql+psycopg://...
--broker redis://...`` (or ``--broker postgresql+psycopg://...``, the same
database's LISTEN/NOTIFY) processes on 127.0.0.1, on a schema of their own
of the machine's PostgreSQL and on its Redis: a write on one daemon reaches a
viewer on another; a client resumes on another daemon with ``since``;
writers on every daemon share one gap-free order that every viewer sees;
``kill -9`` of a daemon loses nothing that was acknowledged."""

from __future__ import annotations

import pathlib
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from cluster_support import (
    CLI,
    REDIS_URL,
    TOKEN,
    Node,
    assert_gap_free,
    fresh_schema,
    needs_pg,
    node_data_dir,
    serving_node,
    viewing,
)

from agor_actors.client import Client, ConnectionLost, connect
from protocols import Since

pytestmark = [needs_pg, pytest.mark.timeout(180)]


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_schema("agor_nodes") as url:
        yield url


async def _session(node: Node) -> str:
    async with connect(node.ws_url, token=TOKEN) as client:
        made = await client.service("sessions").create({"title": "cluster"})
        return str(made["id"])


async def _tasks(client: Client, session_id: str, prompts: list[str]) -> list[int]:
    seqs = []
    for prompt in prompts:
        made = await client.service("tasks").create({"session_id": session_id, "prompt": prompt})
        seqs.append(int(made["_seq"]))
    return seqs


def _prompts(events: list[Any]) -> list[str]:
    return [str(e.data["task"]["prompt"]) for e in events if e.event == "task:created"]


async def test_a_write_on_one_daemon_reaches_another_and_a_client_resumes_there(
    pg_url: str, broker_url: str, tmp_path: pathlib.Path
) -> None:
    async with (
        serving_node(node_data_dir(tmp_path, "a"), pg_url, broker_url=broker_url) as a,
        serving_node(node_data_dir(tmp_path, "b"), pg_url, broker_url=broker_url) as b,
    ):
        sid = await _session(a)
        room = f"session:{sid}"
        async with viewing(b.ws_url, room) as on_b, connect(a.ws_url, token=TOKEN) as writer:
            seqs = await _tasks(writer, sid, ["one", "two"])
            events = await on_b.until_seq(seqs[-1])
            assert _prompts(events) == ["one", "two"]
            assert_gap_free(events, on_b.joined.seq + 1)
            # a client on a goes away, writes go on, it resumes on b
            async with viewing(a.ws_url, room) as on_a:
                assert on_a.joined.seq == seqs[-1]  # it stands at the head
                since = Since(on_a.joined.epoch, on_a.joined.seq)
            missed = await _tasks(writer, sid, ["three", "four", "five"])
            async with viewing(b.ws_url, room, since) as resumed:
                got = await resumed.until_seq(missed[-1])
                assert resumed.joined.recovered
                assert [e.seq for e in got] == missed  # exactly what it missed
                assert _prompts(got) == ["three", "four", "five"]


async def test_writers_on_three_daemons_share_one_order_every_viewer_sees(
    pg_url: str, broker_url: str, tmp_path: pathlib.Path
) -> None:
    per_writer = 15
    async with (
        serving_node(node_data_dir(tmp_path, "a"), pg_url, broker_url=broker_url) as a,
        serving_node(node_data_dir(tmp_path, "b"), pg_url, broker_url=broker_url) as b,
        serving_node(node_data_dir(tmp_path, "c"), pg_url, broker_url=broker_url) as c,
    ):
        nodes = [a, b, c]
        sid = await _session(a)
        room = f"session:{sid}"
        async with (
            viewing(a.ws_url, room) as va,
            viewing(b.ws_url, room) as vb,
            viewing(c.ws_url, room) as vc,
        ):
            acked: list[int] = []

            async def write(node: Node, name: str) -> None:
                async with connect(node.ws_url, token=TOKEN) as client:
                    prompts = [f"{name}{n}" for n in range(per_writer)]
                    acked.extend(await _tasks(client, sid, prompts))

            async with trio.open_nursery() as nursery:
                for i, node in enumerate(nodes):
                    for w in range(2):  # two writers per daemon
                        nursery.start_soon(write, node, f"{'abc'[i]}{w}-")
            assert len(acked) == len(set(acked)) == 6 * per_writer
            last = max(acked)
            orders = []
            for viewer in (va, vb, vc):
                events = await viewer.until_seq(last)
                assert_gap_free(events, viewer.joined.seq + 1)
                orders.append([(e.seq, e.data["task_id"]) for e in events if e.seq > 1])
            assert orders[0] == orders[1] == orders[2]
            assert sorted(seq for seq, _ in orders[0]) == sorted(acked)


async def test_kill_9_of_a_daemon_loses_nothing_acknowledged(
    pg_url: str, broker_url: str, tmp_path: pathlib.Path
) -> None:
    async with (
        serving_node(node_data_dir(tmp_path, "a"), pg_url, broker_url=broker_url) as a,
        serving_node(node_data_dir(tmp_path, "b"), pg_url, broker_url=broker_url) as b,
    ):
        sid = await _session(b)
        room = f"session:{sid}"
        acked: dict[int, str] = {}
        async with viewing(b.ws_url, room) as on_b:
            killed = trio.Event()

            async def write(client: Client, name: str) -> None:
                n = 0
                while True:  # until the daemon dies under it
                    prompt = f"{name}{n}"
                    try:
                        made = await client.service("tasks").create(
                            {"session_id": sid, "prompt": prompt}
                        )
                    except ConnectionLost:
                        return  # not acknowledged: it may or may not be in the log

                    acked[int(made["_seq"])] = prompt
                    n += 1
                    if len(acked) >= 30 and not killed.is_set():
                        a.kill()  # with the other writers' calls in flight
                        killed.set()

            with trio.move_on_after(20):
                async with (
                    connect(a.ws_url, token=TOKEN) as client,
                    trio.open_nursery() as nursery,
                ):
                    for w in range(4):
                        nursery.start_soon(write, client, f"w{w}-")
                    await killed.wait()
                    with trio.move_on_after(3):  # what was in flight answers or not
                        await trio.sleep_forever()
                    nursery.cancel_scope.cancel()
            assert killed.is_set()
            await a.process.wait()
            assert len(acked) >= 30
            # b goes on: its next write follows whatever a committed
            async with connect(b.ws_url, token=TOKEN) as client:
                (after,) = await _tasks(client, sid, ["after the kill"])
            events = await on_b.until_seq(after)
            assert_gap_free(events, on_b.joined.seq + 1)
            logged = {e.seq: e.data["task"]["prompt"] for e in events if e.event == "task:created"}
            for seq, prompt in acked.items():
                assert logged.get(seq) == prompt  # every acknowledged write, where it was told
        async with viewing(b.ws_url, room, Since(on_b.joined.epoch, 0)) as fresh:
            replayed = await fresh.until_seq(after)
            assert_gap_free(replayed, 1)  # the log, read back from the start
            assert [e.seq for e in replayed if e.seq > on_b.joined.seq] == [e.seq for e in events]


async def test_a_node_whose_web_secret_is_not_the_clusters_does_not_start(
    pg_url: str, tmp_path: pathlib.Path
) -> None:
    """A browser's cookie is signed with the node's web-secret: a node with
    another would sign users out whenever a load balancer sends them there.
    ``serve`` says so in one line and exits 2, and with ``--new-keys`` its
    keys become the cluster's."""
    async with serving_node(node_data_dir(tmp_path, "a"), pg_url):
        pass  # the cluster's keys are kept
    b_dir = node_data_dir(tmp_path, "b")
    (b_dir / "web-secret").write_text("not-the-clusters-" + "x" * 32 + "\n")

    def serve(data_dir: pathlib.Path) -> list[str]:
        argv = [*CLI, "serve", "--port", "0", "--data-dir", str(data_dir), "--db", pg_url]
        return [*argv, "--broker", REDIS_URL]

    with trio.fail_after(60):
        refused = await trio.run_process(
            serve(b_dir),
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert refused.returncode == 2
    assert refused.stderr.decode().splitlines() == [
        f"agor-actors serve: {b_dir}/web-secret is not the cluster's: the other nodes of this"
        " database would refuse the browser sign-ins (cookies) this node signs, and it theirs."
        " Copy web-secret from a node of the cluster into this data dir; or, after changing"
        " every node's keys on purpose, start one node with --new-keys"
    ]
    async with serving_node(b_dir, pg_url, extra=["--new-keys"]):
        pass
    with trio.fail_after(60):
        refused = await trio.run_process(
            serve(tmp_path / "a"),
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert refused.returncode == 2 and b"a/web-secret is not the cluster's" in refused.stderr
