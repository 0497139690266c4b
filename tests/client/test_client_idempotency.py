"""Writes whose connection dropped before their result came, against a real
daemon over real WebSockets: sent again under their idempotency
key, they run once and answer as the first did."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from client_support import CountingDialer, Daemon, DroppingDialer, WrappedTransport

from agor_actors import marks
from agor_actors.client import Client, ConnectionLost, connect
from agor_actors.world import MessageTransport


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


class _Swallowing(WrappedTransport):
    """Once told, takes frames and never hands them on: calls sent then
    never reach the server (a connection that died without a word)."""

    def __init__(self, inner: MessageTransport) -> None:
        super().__init__(inner)
        self.swallow = False

    async def send(self, data: bytes | str) -> None:
        if not self.swallow:
            await self.inner.send(data)


class SwallowingDialer(CountingDialer):
    """The real dialer; its first connection swallows what it is sent once told."""

    def __init__(self) -> None:
        super().__init__()
        self.first: _Swallowing | None = None

    def wrap(self, transport: MessageTransport) -> MessageTransport:
        if self.first is None:
            self.first = _Swallowing(transport)
            return self.first
        return transport


async def test_writes_sent_again_go_in_the_order_they_were_sent_and_before_new_ones(
    running: Daemon,
) -> None:
    """Ten pipelined renames are lost with their connection; a rename made
    while it is down waits.  After the reconnect the ten go first, in their
    order, then the new one: the title is the last one asked for (sent again
    in the order their tasks woke up, a rename made earlier landed last)."""
    dialer = SwallowingDialer()
    async with connect(
        running.url, token=running.token, dialer=dialer, backoff_cap_s=0.1
    ) as client:
        sessions = client.service("sessions")
        sid = (await sessions.create({"title": "start"}))["id"]
        assert dialer.first is not None
        dialer.first.swallow = True
        answers: list[Any] = []

        async def rename(title: str) -> None:
            answers.append(await sessions.patch(sid, {"title": title}))

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for n in range(10):
                    nursery.start_soon(rename, f"t{n}")
                    await trio.testing.wait_all_tasks_blocked()  # sent, in this order
                await dialer.first.inner.close()  # the connection dies
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(rename, "after")
        assert len(answers) == 11
        assert (await sessions.get(sid))["title"] == "after"
        titles = [a["title"] for a in sorted(answers, key=lambda a: a["rev"])]
        assert titles == [*(f"t{n}" for n in range(10)), "after"]
