"""Writes whose connection dropped before their result came, against a real
daemon over real WebSockets: sent again under their idempotency
key, they run once and answer as the first did."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from client_support import Daemon, DroppingDialer

from agor_actors import marks
from agor_actors.client import Client, ConnectionLost, connect


async def _tasks(client: Client, session_id: str) -> list[dict[str, Any]]:
    return await client.service("tasks").find_all({"session_id": session_id})


async def test_a_write_whose_answer_was_lost_is_sent_again_and_runs_once(
    running: Daemon,
) -> None:
    dialer = DroppingDialer()
    with marks.counting() as counted:
        async with connect(
            running.url, token=running.token, dialer=dialer, backoff_cap_s=0.1
        ) as client:
            session = await client.service("sessions").create({"title": "keys"})
            sid = session["id"]
            dialer.marker = "write the tests"  # the call reaches the server; its answer is lost
            with trio.fail_after(20):
                task = await client.service("tasks").create(
                    {"session_id": sid, "prompt": "write the tests"}
                )
                renamed = await client.service("sessions").patch(sid, {"title": "renamed"})
                dialer.marker = "renamed again"
                again = await client.service("sessions").patch(sid, {"title": "renamed again"})
            assert dialer.dropped == 2
            assert task.get("_replayed") is True  # answered from the first write
            assert [t["id"] for t in await _tasks(client, sid)] == [task["id"]]
            assert again["rev"] == renamed["rev"] + 1 and again["title"] == "renamed again"
    # each answered by the hub (the first still in flight) or by the store
    assert running.hub.keys.replays + counted.get("store.repeated", 0) == 2


async def test_without_keys_a_write_whose_answer_was_lost_is_not_sent_again(
    running: Daemon,
) -> None:
    dialer = DroppingDialer()
    async with connect(
        running.url,
        token=running.token,
        dialer=dialer,
        backoff_cap_s=0.1,
        idempotent_writes=False,
    ) as client:
        session = await client.service("sessions").create({"title": "no keys"})
        dialer.marker = "maybe written"
        with trio.fail_after(20), pytest.raises(ConnectionLost):
            await client.service("tasks").create(
                {"session_id": session["id"], "prompt": "maybe written"}
            )
        # a key of the caller's own: sent again, once
        dialer.marker = "surely once"
        with trio.fail_after(20):
            task = await client.service("tasks").create(
                {"session_id": session["id"], "prompt": "surely once"},
                idempotency_key="my-key-1",
            )
        prompts = sorted(t["prompt"] for t in await _tasks(client, session["id"]))
        assert prompts == ["maybe written", "surely once"] and task["prompt"] == "surely once"
