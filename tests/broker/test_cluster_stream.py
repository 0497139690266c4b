"""One streamed message written through two daemons (in-process hubs on
one PostgreSQL schema and the machine's Redis): an agent that reconnects
to the other daemon mid-stream, or two writers.  Whatever daemon takes a
chunk, the chunks' offsets are contiguous in commit order, the stored
content is their concatenation, and a message's rev is the store's, as
are a task's and a session's (whose fields merge against the clocks the
store holds, whatever daemon wrote them)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from cluster_support import (
    OWNER,
    REDIS_URL,
    Reader,
    create_message,
    hub_node,
    make_session,
    message_call,
    needs_cluster,
    view,
)

from agor_actors.daemon import Hub
from agor_actors.domain import ServiceError
from protocols import Event

pytestmark = needs_cluster


async def stored(hub: Hub, mid: str) -> dict[str, Any]:
    got = await message_call(hub, "get", mid)
    assert isinstance(got, dict)
    return got


def chunks_of(events: list[Event], mid: str) -> list[tuple[int, str]]:
    """``(offset, chunk)`` of ``mid``'s chunk events, in seq order."""
    return [
        (e.data["offset"], e.data["chunk"])
        for e in events
        if e.event == "task:message" and e.data.get("message_id") == mid and "chunk" in e.data
    ]


def rebuilt(chunks: list[tuple[int, str]]) -> str:
    """The content a viewer builds from ``chunks``, each where its offset
    says; fails on a gap or an overlap."""
    content = ""
    for offset, chunk in chunks:
        assert offset == len(content), (offset, len(content), chunks)
        content += chunk
    return content


async def seen_by(reader: Reader, seq: int) -> list[Event]:
    return await reader.until_seq(seq)


async def test_chunks_alternating_between_daemons_stay_contiguous(pg_url: str) -> None:
    async with hub_node(pg_url, REDIS_URL) as a, hub_node(pg_url, REDIS_URL) as b:
        sid = await make_session(a)
        room = f"session:{sid}"
        on_a = await view(a, "va", room)
        on_b = await view(b, "vb", room)
        mid = await create_message(a, sid)
        sent = []
        last_seq = 0
        for n in range(12):
            # the agent moves to the other daemon every two chunks: each
            # daemon's session actor knows only part of the message
            hub = a if (n // 2) % 2 == 0 else b
            chunk = f"<{n}:{'x' * (n % 3)}>"
            answer = await message_call(hub, "stream", mid, data={"chunk": chunk})
            assert answer["appended"] == len(chunk)
            sent.append(chunk)
            last_seq = max(last_seq, int(answer["_seq"]))
        content = "".join(sent)
        assert (await stored(a, mid))["content"] == content
        assert (await stored(b, mid))["content"] == content
        for reader in (on_a, on_b):
            events = await seen_by(reader, last_seq)
            assert rebuilt(chunks_of(events, mid)) == content


async def test_a_chunk_that_names_its_offset_lands_once_whatever_daemon(pg_url: str) -> None:
    """``at``: an agent that resends a chunk through the other daemon (its
    answer was lost with the connection) is told it landed already, and a
    chunk sent past one that has not landed is refused, on either daemon;
    the content is each chunk once, in order."""
    async with hub_node(pg_url, REDIS_URL) as a, hub_node(pg_url, REDIS_URL) as b:
        sid = await make_session(a)
        mid = await create_message(a, sid)
        await message_call(a, "stream", mid, data={"chunk": "one ", "at": 0})
        for hub in (b, a):  # b's actor has never seen the message; a's knows it
            with pytest.raises(ServiceError) as again:
                await message_call(hub, "stream", mid, data={"chunk": "one ", "at": 0})
            assert again.value.code == "conflict" and again.value.data == {"length": 4}
        await message_call(b, "stream", mid, data={"chunk": "two ", "at": 4})
        # a believes the message 4 long: the store knows better
        with pytest.raises(ServiceError) as early:
            await message_call(a, "stream", mid, data={"chunk": "four", "at": 12})
        assert early.value.code == "conflict" and early.value.data == {"length": 8}
        await message_call(a, "stream", mid, data={"chunk": "three ", "at": 8})
        await message_call(b, "stream", mid, data={"chunk": "four", "at": 14})
        assert (await stored(a, mid))["content"] == "one two three four"


async def test_two_writers_on_two_daemons_at_once(pg_url: str) -> None:
    async with hub_node(pg_url, REDIS_URL) as a, hub_node(pg_url, REDIS_URL) as b:
        sid = await make_session(a)
        room = f"session:{sid}"
        on_a = await view(a, "va", room)
        on_b = await view(b, "vb", room)
        mid = await create_message(a, sid)
        seqs: list[int] = []

        async def write(hub: Hub, name: str) -> None:
            for n in range(25):
                answer = await message_call(hub, "stream", mid, data={"chunk": f"{name}{n};"})
                seqs.append(int(answer["_seq"]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write, a, "a")
            nursery.start_soon(write, b, "b")
        content = (await stored(b, mid))["content"]
        parts = [p for p in content.split(";") if p]
        assert sorted(parts) == sorted([f"a{n}" for n in range(25)] + [f"b{n}" for n in range(25)])
        # each writer's chunks in its own order
        assert [p for p in parts if p[0] == "a"] == [f"a{n}" for n in range(25)]
        assert [p for p in parts if p[0] == "b"] == [f"b{n}" for n in range(25)]
        for reader in (on_a, on_b):
            events = await seen_by(reader, max(seqs))
            assert rebuilt(chunks_of(events, mid)) == content


async def test_a_message_rev_is_the_stores_whatever_daemon_changes_it(pg_url: str) -> None:
    async with hub_node(pg_url, REDIS_URL) as a, hub_node(pg_url, REDIS_URL) as b:
        sid = await make_session(a)
        mid = await create_message(a, sid)
        await message_call(a, "stream", mid, data={"chunk": "one "})  # a knows rev 1
        await message_call(b, "stream", mid, data={"chunk": "two "})  # b loads it
        done = await message_call(b, "finish", mid)
        assert done["rev"] == 2
        # a still believes rev 1: a stale base_rev is a conflict, as on one
        # daemon, and the current one is taken
        with pytest.raises(ServiceError) as refused:
            await message_call(a, "finish", mid, base_rev=1)
        assert refused.value.code == "conflict"
        again = await message_call(a, "finish", mid, base_rev=2)
        assert again["rev"] == 3
        # without base_rev the next rev is the store's, whichever daemon
        assert (await message_call(b, "finish", mid))["rev"] == 4
        assert (await message_call(a, "finish", mid))["rev"] == 5
        row = await stored(b, mid)
        assert row["rev"] == 5 and row["content"] == "one two "
        with pytest.raises(ServiceError) as stale:
            await message_call(b, "remove", mid, base_rev=4)
        assert stale.value.code == "conflict"
        await message_call(b, "remove", mid, base_rev=5)


async def task_call(hub: Hub, method: str, tid: str, **kwargs: Any) -> Any:
    return await hub.call(
        OWNER, connection_id="agent", service="tasks", method=method, id=tid, **kwargs
    )


async def test_a_task_rev_is_the_stores_whatever_daemon_changes_it(pg_url: str) -> None:
    async with hub_node(pg_url, REDIS_URL) as a, hub_node(pg_url, REDIS_URL) as b:
        sid = await make_session(a)
        made = await a.call(
            OWNER,
            connection_id="agent",
            service="tasks",
            method="create",
            data={"session_id": sid, "prompt": "p"},
        )
        tid = str(made["id"])
        assert (await task_call(a, "start", tid))["rev"] == 2
        assert (await task_call(b, "complete", tid, data={"result": "r"}))["rev"] == 3
        # a believes rev 2: the store's rev is taken, the record answered is the store's
        patched = await task_call(a, "patch", tid, data={"prompt": "q"})
        assert patched["rev"] == 4 and patched["status"] == "completed"
        assert patched["result"] == "r"
        # b believes rev 3 and is told base_rev 4: it looks again before refusing
        assert (await task_call(b, "patch", tid, data={"prompt": "s"}, base_rev=4))["rev"] == 5
        with pytest.raises(ServiceError) as stale:
            await task_call(a, "patch", tid, data={"prompt": "t"}, base_rev=4)
        assert stale.value.code == "conflict" and stale.value.data["rev"] == 5
        await task_call(a, "remove", tid, base_rev=5)


async def session_call(hub: Hub, method: str, sid: str, **kwargs: Any) -> Any:
    return await hub.call(
        OWNER, connection_id="w", service="sessions", method=method, id=sid, **kwargs
    )


async def test_a_sessions_fields_merge_against_the_stores_clocks_whatever_daemon(
    pg_url: str,
) -> None:
    async with hub_node(pg_url, REDIS_URL) as a, hub_node(pg_url, REDIS_URL) as b:
        sid = await make_session(a)  # a's actor knows rev 1
        # stamps later than the daemons' own (a client's may lead by 5 minutes)
        later_ms = a.world.wall.now_ms() + 60_000
        running = await session_call(b, "set_status", sid, data={"status": "running"})
        assert running["rev"] == 2  # b's actor knows rev 2
        # a believes rev 1: the store's row is merged against, b's status kept
        newer = await session_call(
            a, "patch", sid, data={"title": "newer"}, query={"hlc": [later_ms + 2000, 0]}
        )
        assert (newer["rev"], newer["title"], newer["status"]) == (3, "newer", "running")
        # b believes rev 2 and the creation's clock of the title: a rename
        # stamped before a's, acknowledged through b afterwards, loses to it
        older = await session_call(
            b, "patch", sid, data={"title": "older"}, query={"hlc": [later_ms + 1000, 0]}
        )
        assert (older["rev"], older["title"]) == (4, "newer")
        assert older["_lost"] == [{"field": "title", "value": "older", "current": "newer"}]
        row = await trio.to_thread.run_sync(a.store.get, "sessions", sid)
        assert row is not None and (row["rev"], row["title"]) == (4, "newer")
        assert row["clocks"]["title"].startswith(f"{later_ms + 2000:013d}:000000:")
        # a strict field's base_rev: a believes rev 3 and is told 4, so it
        # looks again before refusing; b's view (rev 4) is then stale
        locked = await session_call(a, "patch", sid, data={"locked_by": "owner"}, base_rev=4)
        assert locked["rev"] == 5
        with pytest.raises(ServiceError) as stale:
            await session_call(b, "patch", sid, data={"locked_by": None}, base_rev=4)
        assert stale.value.code == "conflict"
        # and b goes on from the store's row (not stopped, not stale)
        idle = await session_call(b, "set_status", sid, data={"status": "idle"})
        assert (idle["rev"], idle["locked_by"], idle["title"]) == (6, "owner", "newer")


async def test_a_sessions_if_match_and_remove_hold_at_the_stores_rev_whatever_daemon(
    pg_url: str,
) -> None:
    """HTTP's If-Match (``if_match``) holds a whole session patch, and a
    base_rev a session's remove, at the store's rev: a daemon whose actor
    believes an older rev looks again before refusing, and a stale one is
    refused whatever the daemon believes."""
    async with hub_node(pg_url, REDIS_URL) as a, hub_node(pg_url, REDIS_URL) as b:
        sid = await make_session(a)  # a's actor knows rev 1
        assert (await session_call(b, "patch", sid, data={"title": "b"}))["rev"] == 2
        # a believes rev 1 and is told 2: it looks again, and the write holds
        held = await session_call(a, "patch", sid, data={"title": "a"}, base_rev=2, if_match=True)
        assert (held["rev"], held["title"]) == (3, "a")
        # b believes rev 2, as it is told: the store's rev 3 refuses it
        with pytest.raises(ServiceError) as stale:
            await session_call(b, "patch", sid, data={"title": "c"}, base_rev=2, if_match=True)
        assert stale.value.code == "conflict"
        with pytest.raises(ServiceError) as kept:
            await session_call(b, "remove", sid, base_rev=2)
        assert kept.value.code == "conflict"
        assert (await session_call(a, "get", sid))["title"] == "a"
        await session_call(b, "remove", sid, base_rev=3)
        with pytest.raises(ServiceError) as gone:
            await session_call(a, "get", sid)
        assert gone.value.code == "not_found"


async def test_a_find_cursor_of_one_daemon_goes_on_at_another(pg_url: str) -> None:
    # cursors are sealed under a key the database keeps, the same for all
    async with hub_node(pg_url, REDIS_URL) as a, hub_node(pg_url, REDIS_URL) as b:
        made = [await make_session(a) for _ in range(3)]
        seen: list[str] = []
        cursor = None
        hubs = [b, a]
        while True:
            hub = hubs[len(seen) % 2]
            query: dict[str, Any] = {"$limit": 1, "$sort": {"created_at": 1}}
            if cursor is not None:
                query["$cursor"] = cursor
            page = await hub.call(
                OWNER, connection_id="r", service="sessions", method="find", query=query
            )
            seen += [row["id"] for row in page["data"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert [ident for ident in seen if ident in made] == made
