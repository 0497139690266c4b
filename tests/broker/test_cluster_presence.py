"""Presence across the daemons of a cluster, on real ``agor-actors serve
--broker ...`` processes (over Redis and over LISTEN/NOTIFY): users on two
daemons see each other in one board's facepile and see each other's
cursors, and a follower sees the followed user's viewport; after ``kill
-9`` of one daemon its user leaves the other's facepile once the liveness
timeout and the offline grace are over, not at once and not never."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
import trio
from cluster_support import (
    TOKEN,
    Node,
    fresh_schema,
    needs_pg,
    node_data_dir,
    serving_node,
)

from agor_actors.client import BoardPresence, Client, connect
from protocols import Viewport

pytestmark = [needs_pg, pytest.mark.timeout(120)]

HEARTBEAT_S = 0.2
LIVENESS_S = 1.0
GRACE_S = 1.0
TIMINGS = [
    "--node-heartbeat",
    str(HEARTBEAT_S),
    "--node-liveness",
    str(LIVENESS_S),
    "--presence-grace",
    str(GRACE_S),
]


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_schema("agor_presence") as url:
        yield url


@asynccontextmanager
async def two_nodes(
    pg_url: str, broker_url: str, tmp_path: pathlib.Path, timings: list[str] = TIMINGS
) -> AsyncIterator[tuple[Node, Node]]:
    """Two ``serve`` processes on one database and broker, with the short
    presence timings (or ``timings``)."""
    async with (
        serving_node(
            node_data_dir(tmp_path, "one"), pg_url, extra=timings, broker_url=broker_url
        ) as one,
        serving_node(
            node_data_dir(tmp_path, "two"), pg_url, extra=timings, broker_url=broker_url
        ) as two,
    ):
        yield one, two


async def _board_with_users(node: Node, names: list[str]) -> tuple[str, list[dict[str, str]]]:
    """A board of the owner's and users who are its editors (id, token)."""
    async with connect(node.ws_url, token=TOKEN) as owner:
        board = await owner.service("boards").create({"name": "cluster board"})
        users = []
        for name in names:
            made = await owner.service("users").create({"name": name})
            await owner.service("boards").call(
                "add_member", id=board["id"], data={"user_id": made["id"], "role": "editor"}
            )
            users.append({"id": str(made["id"]), "token": str(made["token"])})
        return str(board["id"]), users


async def _until(presence: BoardPresence, done: object, limit_s: float = 20.0) -> None:
    assert callable(done)
    with trio.fail_after(limit_s):
        await presence.wait_until(lambda p: bool(done(p)))


async def test_users_on_two_daemons_share_one_facepile_and_cursors_until_one_dies(
    pg_url: str, broker_url: str, tmp_path: pathlib.Path
) -> None:
    async with two_nodes(pg_url, broker_url, tmp_path) as (one, two):
        board, (ada, bob) = await _board_with_users(one, ["Ada", "Bob"])
        async with connect(one.ws_url, token=ada["token"]) as on_one:
            seen_on_one = await on_one.board_presence(board)
            bob_client: Client
            async with connect(two.ws_url, token=bob["token"]) as bob_client:
                seen_on_two = await bob_client.board_presence(board)
                # one facepile: each daemon shows its own user and the other's
                both = {ada["id"], bob["id"]}
                await _until(seen_on_one, lambda p: set(p.users) == both)
                await _until(seen_on_two, lambda p: set(p.users) == both)
                assert seen_on_one.users[bob["id"]].name == "Bob"
                assert seen_on_two.users[ada["id"]].status == "active"
                # one cursor stream: each sees the other's latest position
                for x in range(5):
                    await on_one.set_presence(board, cursor=(float(x), 10.0))
                    await bob_client.set_presence(board, cursor=(100.0, float(x)))
                await _until(seen_on_two, lambda p: p.cursors.get(ada["id"]) == (4.0, 10.0))
                await _until(seen_on_one, lambda p: p.cursors.get(bob["id"]) == (100.0, 4.0))
                assert bob["id"] not in seen_on_two.cursors  # never one's own
                # daemon two dies with Bob on it: no goodbye reaches daemon one
                two.kill()
                killed_at = trio.current_time()
                await two.process.wait()
                await _until(seen_on_one, lambda p: bob["id"] not in p.users)
                gone_after_s = trio.current_time() - killed_at
                # not at once: daemon one last heard of two at most a heartbeat
                # (and a little delivery) before the kill, and waits for the
                # liveness timeout and then the grace from then
                assert gone_after_s >= LIVENESS_S + GRACE_S - HEARTBEAT_S - 0.2, gone_after_s
                assert bob["id"] not in seen_on_one.cursors  # the cursor went with him
                assert set(seen_on_one.users) == {ada["id"]}


async def test_a_board_opened_on_another_daemon_shows_its_users_without_waiting_a_heartbeat(
    pg_url: str, broker_url: str, tmp_path: pathlib.Path
) -> None:
    # heartbeats 60 s apart: Bob, the first on the board on daemon two, sees
    # Ada (on daemon one since before) at once, because two's board room
    # asks the other daemons for their users when it starts
    slow = ["--node-heartbeat", "60", "--node-liveness", "180", "--presence-grace", "1"]
    async with two_nodes(pg_url, broker_url, tmp_path, slow) as (one, two):
        board, (ada, bob) = await _board_with_users(one, ["Ada", "Bob"])
        async with connect(one.ws_url, token=ada["token"]) as on_one:
            seen_on_one = await on_one.board_presence(board)
            await _until(seen_on_one, lambda p: ada["id"] in p.users)
            async with connect(two.ws_url, token=bob["token"]) as on_two:
                seen_on_two = await on_two.board_presence(board)
                both = {ada["id"], bob["id"]}
                await _until(seen_on_two, lambda p: set(p.users) == both, limit_s=10.0)
                await _until(seen_on_one, lambda p: set(p.users) == both, limit_s=10.0)


async def test_a_follower_on_one_daemon_sees_the_viewport_of_a_user_on_the_other(
    pg_url: str, broker_url: str, tmp_path: pathlib.Path
) -> None:
    async with two_nodes(pg_url, broker_url, tmp_path) as (one, two):
        board, (ada, bob) = await _board_with_users(one, ["Ada", "Bob"])
        first = Viewport(0.0, 0.0, 1280.0, 720.0, 1.0)
        async with connect(one.ws_url, token=ada["token"]) as on_one:
            await on_one.board_presence(board)
            # Ada looks somewhere before anyone on daemon two is on the board
            await on_one.set_presence(board, viewport=first)
            async with connect(two.ws_url, token=bob["token"]) as on_two:
                seen = await on_two.board_presence(board)
                await _until(seen, lambda p: ada["id"] in p.users)
                # a follower who came later learns where she looks (her
                # daemon's heartbeat says it)
                await on_two.set_presence(board, follow=ada["id"])
                await _until(seen, lambda p: p.followed_viewport == first)
                # she pans: the follower ends on her latest viewport
                for x in range(1, 11):
                    moved = Viewport(float(x * 100), 50.0, 1280.0, 720.0, 1.5)
                    await on_one.set_presence(board, viewport=moved)
                await _until(seen, lambda p: p.followed_viewport == moved)
                # no longer following: no more of her viewport
                await on_two.set_presence(board, follow="")
                await on_one.set_presence(board, viewport=first)
                await on_one.set_presence(board, cursor=(1.0, 2.0))
                await _until(seen, lambda p: p.cursors.get(ada["id"]) == (1.0, 2.0))
                assert seen.followed_viewport is None


async def test_a_user_typing_in_a_tab_on_another_daemon_shows_typing_everywhere(
    pg_url: str, broker_url: str, tmp_path: pathlib.Path
) -> None:
    # Ada has a tab on each daemon and types in the one on daemon two; Bob,
    # on daemon one, sees her typing (her tab on one, as present, is not)
    async with two_nodes(pg_url, broker_url, tmp_path) as (one, two):
        board, (ada, bob) = await _board_with_users(one, ["Ada", "Bob"])
        async with (
            connect(one.ws_url, token=ada["token"]) as ada_one,
            connect(two.ws_url, token=ada["token"]) as ada_two,
            connect(one.ws_url, token=bob["token"]) as bob_one,
        ):
            seen = await bob_one.board_presence(board)
            await ada_one.set_presence(board, view="s1")
            await ada_two.board_presence(board)
            await _until(seen, lambda p: ada["id"] in p.users and p.users[ada["id"]].view == "s1")
            await ada_two.set_presence(board, typing=True)
            await _until(seen, lambda p: p.users[ada["id"]].typing)
            assert seen.users[ada["id"]].view == "s1"
            await ada_two.set_presence(board, typing=False)
            await _until(seen, lambda p: not p.users[ada["id"]].typing)
