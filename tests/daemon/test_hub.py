"""The hub end to end in process: writes through session actors and the
store writer, fan-out through rooms into outboxes, resume from memory and
from the log; a real SQLite file."""

from __future__ import annotations

import pathlib
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
import trio

from agor_actors.daemon import Hub, Outbox, Principal, ServiceError, open_hub
from agor_actors.services import METHODS, SERVICES
from agor_actors.world import real_world
from protocols import Codec, Event, Joined, Lagged, Limits, Since, decode_server_frame

OWNER = Principal("owner", "owner", True)


@pytest.fixture
async def hub(tmp_path: pathlib.Path) -> AsyncIterator[Hub]:
    async with open_hub(real_world(), data_dir=tmp_path / "agor") as h:
        yield h


async def drain(outbox: Outbox, *, until: Any, limit_s: float = 10.0) -> list[Any]:
    """Read frames from an outbox until ``until(messages)`` holds."""
    got: list[Any] = []
    with trio.fail_after(limit_s):
        while not until(got):
            frame = await outbox.next_frame()
            got.extend(decode_server_frame(outbox.codec, frame, Limits()))
    return got


def events(msgs: list[Any]) -> list[Event]:
    return [m for m in msgs if isinstance(m, Event)]


async def board_and_session(hub: Hub) -> tuple[dict[str, Any], dict[str, Any]]:
    """A board "B" and a session "S" on it, made by the owner."""
    board = await hub.call(
        OWNER, connection_id="c1", service="boards", method="create", data={"name": "B"}
    )
    session = await hub.call(
        OWNER,
        connection_id="c1",
        service="sessions",
        method="create",
        data={"title": "S", "board_id": board["id"]},
    )
    return board, session


async def as_owner(
    hub: Hub, service: str, method: str, id: str | None = None, **kwargs: Any
) -> Any:
    """One call of the owner's, on connection ``c1``."""
    return await hub.call(
        OWNER, connection_id="c1", service=service, method=method, id=id, **kwargs
    )


async def test_write_is_durable_and_fans_out(hub: Hub) -> None:
    _, session = await board_and_session(hub)
    sid = session["id"]
    out = Outbox(Codec.JSON)
    await hub.join(OWNER, "c2", out, f"session:{sid}", None)
    joined = await drain(out, until=lambda m: len(m) >= 1)
    assert isinstance(joined[0], Joined) and joined[0].seq == 1
    task = await hub.call(
        OWNER,
        connection_id="c1",
        service="tasks",
        method="create",
        data={"session_id": sid, "prompt": "hi"},
    )
    msg = await hub.call(
        OWNER,
        connection_id="c1",
        service="messages",
        method="create",
        data={"session_id": sid, "task_id": task["id"], "role": "assistant", "streaming": True},
    )
    for word in ["Hello", " wor", "ld"]:
        await hub.call(
            OWNER,
            connection_id="c1",
            service="messages",
            method="stream",
            id=msg["id"],
            data={"chunk": word},
        )
    got = await drain(
        out, until=lambda m: sum((e.last_seq or e.seq) - e.seq + 1 for e in events(m)) >= 5
    )
    seqs = [(e.seq, e.last_seq) for e in events(got)]
    assert seqs[0][0] == 2  # after session:created at 1
    text = "".join(e.data.get("chunk", "") for e in events(got))
    assert text == "Hello world"
    stored = await hub.call(
        OWNER, connection_id=None, service="messages", method="get", id=msg["id"]
    )
    assert stored["content"] == "Hello world"
    found = await hub.call(
        OWNER, connection_id=None, service="tasks", method="find", query={"session_id": sid}
    )
    assert [t["id"] for t in found["data"]] == [task["id"]]


async def test_resume_from_memory_and_from_log(hub: Hub) -> None:
    session = await hub.call(
        OWNER, connection_id="c1", service="sessions", method="create", data={"title": "S"}
    )
    sid = session["id"]
    room = f"session:{sid}"
    for i in range(30):
        await hub.call(
            OWNER,
            connection_id="c1",
            service="sessions",
            method="patch",
            id=sid,
            data={"title": f"t{i}"},
        )
    # from memory: since seq 10 → events 11..31 exactly
    out = Outbox(Codec.CBOR)
    await hub.join(OWNER, "c2", out, room, Since(epoch=await _epoch(hub, room), seq=10))
    got = await drain(out, until=lambda m: len(events(m)) >= 21)
    assert isinstance(got[0], Joined) and got[0].recovered
    assert [e.seq for e in events(got)] == list(range(11, 32))
    # another epoch: not recovered
    out2 = Outbox(Codec.JSON)
    await hub.join(OWNER, "c3", out2, room, Since(epoch="other", seq=10))
    got2 = await drain(out2, until=lambda m: len(m) >= 1)
    assert isinstance(got2[0], Joined) and not got2[0].recovered and got2[0].seq == 31


async def _epoch(hub: Hub, room: str) -> str:
    head = hub.store.room_head(room)
    assert head is not None
    return head[0]


async def test_gap_older_than_memory_is_replayed_from_log(tmp_path: pathlib.Path) -> None:
    async with open_hub(real_world(), data_dir=tmp_path) as hub:
        session = await hub.call(
            OWNER, connection_id="c1", service="sessions", method="create", data={"title": "S"}
        )
        sid = session["id"]
        room = f"session:{sid}"
        ref = await hub.system.registry.get(f"room:{room}")
        for i in range(1100):  # more than the room keeps in memory (1024)
            await hub.call(
                OWNER,
                connection_id="c1",
                service="sessions",
                method="patch",
                id=sid,
                data={"title": f"t{i}"},
            )
        assert ref.alive
        out = Outbox(Codec.JSON, max_messages=400)
        epoch = await _epoch(hub, room)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.join, OWNER, "c2", out, room, Since(epoch=epoch, seq=5))
            got = await drain(out, until=lambda m: len(events(m)) >= 1096)
        assert isinstance(got[0], Joined) and got[0].recovered
        assert [e.seq for e in events(got)] == list(range(6, 1102))
        assert not [m for m in got if isinstance(m, Lagged)]


async def test_slow_subscriber_lags_without_slowing_others(hub: Hub) -> None:
    session = await hub.call(
        OWNER, connection_id="c1", service="sessions", method="create", data={"title": "S"}
    )
    sid = session["id"]
    room = f"session:{sid}"
    slow = Outbox(Codec.JSON, max_messages=10)
    fast = Outbox(Codec.JSON)
    await hub.join(OWNER, "slow", slow, room, None)
    await hub.join(OWNER, "fast", fast, room, None)
    for i in range(50):
        await hub.call(
            OWNER,
            connection_id="c1",
            service="sessions",
            method="patch",
            id=sid,
            data={"title": f"t{i}"},
        )
    got_fast = await drain(fast, until=lambda m: len(events(m)) >= 50)
    assert [e.seq for e in events(got_fast)] == list(range(2, 52))
    got_slow = await drain(slow, until=lambda m: any(isinstance(x, Lagged) for x in m))
    lagged = next(x for x in got_slow if isinstance(x, Lagged))
    applied = [e.seq for e in events(got_slow)]
    assert lagged.resume_from == (applied[-1] + 1 if applied else 2)
    # it resumes from the log at its own pace with nothing lost
    slow2 = Outbox(Codec.JSON, max_messages=10)
    epoch = await _epoch(hub, room)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            hub.join, OWNER, "slow", slow2, room, Since(epoch, lagged.resume_from - 1)
        )
        rest = await drain(slow2, until=lambda m: len(events(m)) >= 51 - lagged.resume_from + 1)
    assert [e.seq for e in events(rest)] == list(range(lagged.resume_from, 52))


async def test_conflicts_on_strict_fields_and_lost_merges(hub: Hub) -> None:
    session = await hub.call(
        OWNER, connection_id="c1", service="sessions", method="create", data={"title": "S"}
    )
    sid = session["id"]
    with pytest.raises(ServiceError) as info:
        await hub.call(
            OWNER,
            connection_id="c1",
            service="sessions",
            method="patch",
            id=sid,
            data={"locked_by": "owner"},
            base_rev=0,
        )
    assert info.value.code == "conflict" and info.value.data["rev"] == 1
    ok = await hub.call(
        OWNER,
        connection_id="c1",
        service="sessions",
        method="patch",
        id=sid,
        data={"locked_by": "owner"},
        base_rev=1,
    )
    assert ok["locked_by"] == "owner" and ok["rev"] == 2
    # an older client stamp loses to the current value, and the writer is told
    res = await hub.call(
        OWNER,
        connection_id="c2",
        service="sessions",
        method="patch",
        id=sid,
        data={"title": "old"},
        query={"hlc": [1, 0]},
    )
    assert res["title"] == "S" and res["_lost"][0]["field"] == "title"
    with pytest.raises(ServiceError) as bad:
        await hub.call(
            OWNER,
            connection_id="c1",
            service="sessions",
            method="patch",
            id=sid,
            data={"status": "bogus"},
        )
    assert bad.value.code == "invalid_field"


async def test_concurrent_chunks_merge_into_ranged_events(hub: Hub) -> None:
    session = await hub.call(
        OWNER, connection_id="c1", service="sessions", method="create", data={"title": "S"}
    )
    sid = session["id"]
    msg = await hub.call(
        OWNER,
        connection_id="c1",
        service="messages",
        method="create",
        data={"session_id": sid, "role": "assistant", "streaming": True},
    )
    out = Outbox(Codec.JSON)
    await hub.join(OWNER, "c2", out, f"session:{sid}", None)
    words = [f"w{i} " for i in range(200)]

    async def stream() -> None:
        # one harness streaming as fast as it can: calls pipelined in order
        for word in words:
            await hub.call(
                OWNER,
                connection_id="c1",
                service="messages",
                method="stream",
                id=msg["id"],
                data={"chunk": word},
            )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream)
        nursery.start_soon(stream)
    got = await drain(
        out, until=lambda m: sum((e.last_seq or e.seq) - e.seq + 1 for e in events(m)) >= 400
    )
    evs = [e for e in events(got) if e.data.get("chunk")]
    # seqs are contiguous across ranged events: no gap, no overlap
    expected = evs[0].seq
    for e in evs:
        assert e.seq == expected
        expected = (e.last_seq or e.seq) + 1
    text = "".join(e.data["chunk"] for e in evs)
    stored = await hub.call(
        OWNER, connection_id=None, service="messages", method="get", id=msg["id"]
    )
    assert stored["content"] == text and len(text) == 2 * len("".join(words))
    stats = hub.system.registry.lookup("store:writer").statistics()  # type: ignore[union-attr]
    assert stats.handled > 0


async def test_chunk_offsets_survive_a_session_actor_restart(hub: Hub) -> None:
    session = await hub.call(
        OWNER, connection_id="c1", service="sessions", method="create", data={"title": "S"}
    )
    sid = session["id"]
    msg = await hub.call(
        OWNER,
        connection_id="c1",
        service="messages",
        method="create",
        data={"session_id": sid, "content": "ab", "streaming": True},
    )
    out = Outbox(Codec.JSON)
    await hub.join(OWNER, "c2", out, f"session:{sid}", None)

    async def stream(text: str) -> None:
        await hub.call(
            OWNER,
            connection_id="c1",
            service="messages",
            method="stream",
            id=msg["id"],
            data={"chunk": text},
        )

    await stream("cd")
    ref = await hub.system.registry.get(f"session:{sid}")
    await ref.stop()  # memory gone: the next chunk's offset comes from the store
    await stream("efg")
    await stream("h")
    got = await drain(out, until=lambda m: len([e for e in events(m) if "chunk" in e.data]) >= 3)
    chunks = [(e.data["offset"], e.data["chunk"]) for e in events(got) if "chunk" in e.data]
    assert chunks == [(2, "cd"), (4, "efg"), (7, "h")]
    with pytest.raises(ServiceError) as missing:
        await hub.call(
            OWNER,
            connection_id="c1",
            service="messages",
            method="stream",
            id="nope",
            data={"chunk": "x"},
        )
    assert missing.value.code == "not_found"


async def test_revs_survive_a_session_actor_restart(hub: Hub) -> None:
    """A task's and a message's revs are read back from the store by a new
    incarnation of the session actor, and keep moving from there."""
    session = await hub.call(
        OWNER, connection_id="c1", service="sessions", method="create", data={"title": "S"}
    )
    sid = session["id"]

    async def call(service: str, method: str, id: str | None = None, **data: Any) -> Any:
        return await hub.call(
            OWNER, connection_id="c1", service=service, method=method, id=id, data=data
        )

    task = await call("tasks", "create", session_id=sid, prompt="p")
    msg = await call("messages", "create", session_id=sid, content="a", streaming=True)
    assert (await call("tasks", "start", task["id"]))["rev"] == 2
    ref = await hub.system.registry.get(f"session:{sid}")
    await ref.stop()  # memory gone: the revs come from the store
    patched = await call("tasks", "patch", task["id"], prompt="q")
    assert (patched["rev"], patched["status"], patched["prompt"]) == (3, "running", "q")
    await call("messages", "stream", msg["id"], chunk="b")  # a chunk leaves rev alone
    assert (await call("messages", "finish", msg["id"]))["rev"] == 2
    stored = await hub.world.blocking.run(lambda: hub.store.get("messages", msg["id"]))
    assert stored is not None and (stored["rev"], stored["content"]) == (2, "ab")


async def test_head_checks_read_the_log_only_when_the_store_knows_more(
    tmp_path: pathlib.Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A room with subscribers checks its log's head now and then, to find
    events whose announcement was lost.  While the store's own record of
    what it committed matches the room, no check reads the log; an event
    committed without reaching the room is found by the next check; one
    whose announcement is queued behind the check is not read."""
    from agor_actors.domain.room import _HeadCheck
    from agor_actors.store import Committed, EventDraft, WriteRequest
    from agor_actors.world import simulated_world

    async with open_hub(simulated_world(7), data_dir=tmp_path / "agor") as hub:
        session = await hub.call(
            OWNER, connection_id="c1", service="sessions", method="create", data={"title": "S"}
        )
        room = f"session:{session['id']}"
        out = Outbox(Codec.JSON)
        await hub.join(OWNER, "c2", out, room, None)
        await drain(out, until=lambda m: len(m) >= 1)  # joined
        await hub.call(
            OWNER,
            connection_id="c1",
            service="tasks",
            method="create",
            data={"session_id": session["id"], "prompt": "p"},
        )
        first = events(await drain(out, until=lambda m: len(events(m)) >= 1))
        reads: list[int] = []
        store = hub.store
        original = store.events_since

        def counting(room_: str, after: int, limit: int = 1000) -> Any:
            reads.append(after)
            return original(room_, after, limit)

        store.events_since = counting  # type: ignore[method-assign]
        await trio.sleep(60)  # a dozen head checks, nothing new
        assert reads == []
        # committed, but never announced to the room (as after a lost answer)
        draft = EventDraft(room=room, event="task:updated", data={"n": 1}, ts=1)
        (result,) = store.commit([WriteRequest(events=(draft,))])
        assert not isinstance(result, Exception)
        with trio.fail_after(10):  # virtual: within two head checks
            late = events(await drain(out, until=lambda m: len(events(m)) >= 1))
        assert [e.seq for e in late] == [first[-1].end_seq + 1]
        assert reads == [first[-1].end_seq]
        # committed and announced, but the check comes first: the room
        # looks again behind its mailbox (where the commit is) and reads
        # nothing
        draft = EventDraft(room=room, event="task:updated", data={"n": 2}, ts=2)
        (result,) = store.commit([WriteRequest(events=(draft,))])
        assert not isinstance(result, Exception)
        room_ref = hub.system.registry.lookup(f"room:{room}")
        assert room_ref is not None
        assert room_ref.try_send(_HeadCheck())
        assert room_ref.try_send(Committed(room, tuple(original(room, late[-1].seq))))
        with trio.fail_after(10):
            again = events(await drain(out, until=lambda m: len(events(m)) >= 1))
        assert [e.seq for e in again] == [late[-1].seq + 1]
        await trio.sleep(12)  # two more periodic checks: nothing to read
        assert reads == [first[-1].end_seq]


@pytest.mark.parametrize("on_loop", [True, False])
async def test_sqlite_commits_run_on_the_loop_or_in_a_thread_as_asked(
    tmp_path: pathlib.Path, on_loop: bool
) -> None:
    """A SQLite store's commits are ``local`` work: the real world runs them
    on the loop's own thread (``serve``'s default) or, with
    ``local_on_loop=False`` (``--sqlite-commit thread``), in a worker
    thread.  Either way the write is durable and answered."""
    loop_thread = threading.get_ident()
    async with open_hub(real_world(local_on_loop=on_loop), data_dir=tmp_path / "agor") as h:
        committed_on: list[int] = []

        def on_commit(connection: object) -> None:
            committed_on.append(threading.get_ident())

        sa.event.listen(h.store.engine, "commit", on_commit)
        board = await h.call(
            OWNER, connection_id="c1", service="boards", method="create", data={"name": "B"}
        )
        sa.event.remove(h.store.engine, "commit", on_commit)
        found = await h.call(
            OWNER, connection_id="c1", service="boards", method="get", id=board["id"]
        )
    assert found["name"] == "B"
    assert committed_on, "the board's write committed no transaction"
    assert all((ident == loop_thread) is on_loop for ident in committed_on), committed_on


async def test_the_subscriptions_by_room_actor_follow_joins_leaves_and_disconnects(
    hub: Hub,
) -> None:
    """The hub's index of subscriptions by room actor (what a room's exit
    reads, instead of every connection's) always says what the
    connections' subscriptions say, an ``activity:`` stream counting for
    its board's room."""

    def derived() -> dict[str, set[tuple[str, str]]]:
        out: dict[str, set[tuple[str, str]]] = {}
        for connection_id, subs in hub._subs.items():
            for room in subs:
                actor = f"room:board:{room[9:]}" if room.startswith("activity:") else f"room:{room}"
                out.setdefault(actor, set()).add((connection_id, room))
        return out

    def indexed() -> dict[str, set[tuple[str, str]]]:
        return {actor: set(served) for actor, served in hub._by_actor.items()}

    board, session = await board_and_session(hub)
    rooms = [f"board:{board['id']}", f"activity:{board['id']}", f"session:{session['id']}"]
    outs = {c: Outbox(Codec.JSON) for c in ("a", "b")}
    for connection_id, out in outs.items():
        for room in rooms:
            await hub.join(OWNER, connection_id, out, room, None)
    assert indexed() == derived() and len(indexed()) == 2
    assert len(indexed()[f"room:board:{board['id']}"]) == 4
    await hub.leave("a", rooms[0])
    assert indexed() == derived()
    await hub.disconnect("b")
    assert (
        indexed()
        == derived()
        == {
            f"room:board:{board['id']}": {("a", rooms[1])},
            f"room:session:{session['id']}": {("a", rooms[2])},
        }
    )
    await hub.disconnect("a")
    assert indexed() == {} and derived() == {}


async def test_the_sweeper_drops_expired_refresh_tokens_sign_ins_and_old_keys(
    tmp_path: pathlib.Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Every ``keys_sweep_s`` the hub drops the idempotency keys older than
    ``keys_kept_s`` and the refresh tokens and browser sign-ins that have
    expired, so no such table grows without end."""
    from argon2 import profiles

    from agor_actors.identity import IdentityConfig
    from agor_actors.store import hash_token
    from agor_actors.world import simulated_world

    config = IdentityConfig(password_params=profiles.CHEAPEST, refresh_ttl_s=3600)
    async with open_hub(simulated_world(7), data_dir=tmp_path / "agor", identity=config) as hub:
        await hub.call(
            OWNER,
            connection_id=None,
            service="users",
            method="create",
            data={"name": "ada", "password": "correct horse"},
        )
        signed = await hub.authentication(
            "create", {"strategy": "local", "name": "ada", "password": "correct horse"}
        )
        await hub.call(
            OWNER,
            connection_id=None,
            service="boards",
            method="create",
            data={"name": "B"},
            idempotency_key="k-1",
        )
        digest = hash_token(signed["refreshToken"])
        assert hub.store.refresh_token(digest) is not None
        browser = await hub.open_web_session(OWNER, 3600)
        assert browser.session is not None and await hub.confirm(browser) == OWNER
        session_digest = hash_token(browser.session)
        assert hub.store.check_key(OWNER.user_id, "k-1") is not None
        await trio.sleep(3600 + 2 * hub.keys_sweep_s)  # both are past their time; a sweep ran
        assert hub.store.refresh_token(digest) is None
        assert hub.store.check_key(OWNER.user_id, "k-1") is None
        assert await hub.confirm(browser) is None
        assert hub.store.forget_web_sessions(2**62) == 0  # the sweep dropped it already
        assert hub.store.web_session_user(session_digest, now_ms=0) is None


async def test_a_message_names_a_task_of_its_own_session(hub: Hub) -> None:
    """A new message's ``task_id`` must be a task of its session (read from
    the store when the session actor does not know it): another session's
    task or none at all is ``invalid_field``, refused before the store, so
    the session's other writes meanwhile go through (the store's refusal
    used to make the session reload and fail them with ``unavailable``)."""

    async def call(service: str, method: str, id: str | None = None, **data: Any) -> Any:
        return await hub.call(
            OWNER, connection_id="c1", service=service, method=method, id=id, data=data
        )

    sid = (await call("sessions", "create", title="S"))["id"]
    other = (await call("sessions", "create", title="T"))["id"]
    task = await call("tasks", "create", session_id=sid, prompt="p")
    elsewhere = await call("tasks", "create", session_id=other, prompt="q")
    first = await call("messages", "create", session_id=sid, task_id=task["id"], content="a")
    assert first["task_id"] == task["id"]
    ref = await hub.system.registry.get(f"session:{sid}")
    await ref.stop()  # a new incarnation reads the task from the store
    again = await call("messages", "create", session_id=sid, task_id=task["id"], content="b")
    assert again["task_id"] == task["id"]
    streamed = await call("messages", "create", session_id=sid, content="", streaming=True)

    refusals: list[str] = []

    async def bad(task_id: str) -> None:
        with pytest.raises(ServiceError) as refused:
            await call("messages", "create", session_id=sid, task_id=task_id, content="x")
        assert refused.value.code == "invalid_field", refused.value
        refusals.append(refused.value.message)

    async def good(n: int) -> None:
        await call("messages", "stream", streamed["id"], chunk=f"{n},")

    async with trio.open_nursery() as nursery:
        for n in range(20):
            nursery.start_soon(good, n)
            if n % 4 == 0:
                nursery.start_soon(bad, elsewhere["id"] if n % 8 else f"t-nope-{n}")
    assert len(refusals) == 5
    assert all("there is no task" in m and "in this session" in m for m in refusals)
    stored = await hub.world.blocking.run(lambda: hub.store.get("messages", streamed["id"]))
    assert stored is not None
    assert sorted(int(n) for n in stored["content"].rstrip(",").split(",")) == list(range(20))


async def test_a_method_a_service_does_not_have_is_unknown_method(hub: Hub) -> None:
    """A misspelt method is ``unknown_method`` naming the service's methods,
    with or without an id, before anything reads the id (it was answered
    ``not_found: no session x`` or ``id is required``); every method a
    service lists gets past that check."""
    assert set(METHODS) == set(SERVICES)
    for service, methods in METHODS.items():
        for id in (None, "x"):
            with pytest.raises(ServiceError) as refused:
                await hub.call(
                    OWNER, connection_id="c1", service=service, method="set_stauts", id=id
                )
            assert refused.value.code == "unknown_method", (service, refused.value)
            assert refused.value.message == (
                f"{service}.set_stauts does not exist; {service} has {', '.join(methods)}"
            )
        for method in methods:
            try:
                await hub.call(
                    OWNER, connection_id="c1", service=service, method=method, id="x", data={}
                )
            except ServiceError as exc:
                assert exc.code != "unknown_method", (service, method, exc)


async def test_a_sessions_base_rev_holds_its_remove_and_if_match_its_whole_patch(
    hub: Hub,
) -> None:
    """A session's ``base_rev`` holds its remove (as a task's); on a patch
    it holds only the strict fields and the others merge, unless it came as
    HTTP's If-Match (``if_match``): then a stale one changes nothing."""

    async def call(method: str, id: str | None = None, **kw: Any) -> Any:
        return await hub.call(
            OWNER, connection_id="c1", service="sessions", method=method, id=id, **kw
        )

    sid = (await call("create", data={"title": "S"}))["id"]
    merged = await call("patch", sid, data={"title": "T"}, base_rev=7)
    assert merged["title"] == "T" and merged["rev"] == 2
    with pytest.raises(ServiceError) as stale:
        await call("patch", sid, data={"title": "U"}, base_rev=1, if_match=True)
    assert stale.value.code == "conflict"
    assert stale.value.data == {"current": {"title": "T"}, "rev": 2}
    held = await call("patch", sid, data={"title": "U"}, base_rev=2, if_match=True)
    assert held["title"] == "U" and held["rev"] == 3
    with pytest.raises(ServiceError) as kept:
        await call("remove", sid, base_rev=2)
    assert kept.value.code == "conflict" and kept.value.data["rev"] == 3
    assert (await call("get", sid))["title"] == "U"
    await call("remove", sid, base_rev=3)
    with pytest.raises(ServiceError) as gone:
        await call("get", sid)
    assert gone.value.code == "not_found"


async def test_a_client_stamp_from_the_far_future_or_malformed_is_refused(hub: Hub) -> None:
    # a stamp far ahead would win every later edit of the field
    session = await hub.call(
        OWNER, connection_id="c1", service="sessions", method="create", data={"title": "S"}
    )
    now_ms = hub.world.wall.now_ms()

    async def stamped(hlc: object) -> Any:
        return await hub.call(
            OWNER,
            connection_id="c2",
            service="sessions",
            method="patch",
            id=session["id"],
            data={"title": f"at {hlc}"},
            query={"hlc": hlc},
        )

    for hlc, message in (
        ([now_ms + 3_600_000, 0], "ahead of the daemon's clock; at most 300000"),
        ([2**63 - 1, 0], "ahead of the daemon's clock; at most 300000"),
        ("soon", "hlc must be [wall_ms, counter], two non-negative integers"),
        ([True, 0], "hlc must be"),
        ([now_ms, -1], "hlc must be"),
    ):
        with pytest.raises(ServiceError) as refused:
            await stamped(hlc)
        assert refused.value.code == "invalid_field"
        assert message in refused.value.message, refused.value.message
    # a skewed clock a little ahead is taken, and later plain edits still win
    ahead = await stamped([now_ms + 60_000, 0])
    assert ahead["title"] == f"at {[now_ms + 60_000, 0]}"
    plain = await hub.call(
        OWNER,
        connection_id="c1",
        service="sessions",
        method="patch",
        id=session["id"],
        data={"title": "plain"},
    )
    assert plain["title"] == "plain" and "_lost" not in plain


async def test_a_tool_call_id_that_is_no_string_is_refused_and_the_session_stays(
    hub: Hub,
) -> None:
    # it reached the store, which refused the key: answered "the store is
    # unavailable", and the session's actor stopped, failing its other writes
    session = await as_owner(hub, "sessions", "create", data={"title": "S"})
    task = await as_owner(hub, "tasks", "create", data={"session_id": session["id"], "prompt": "p"})
    for given in (7, 1.5, True, False, 0, "", [], {"a": 1}):
        with pytest.raises(ServiceError) as refused:
            await as_owner(
                hub, "tasks", "tool_call", task["id"], data={"name": "bash", "tool_call_id": given}
            )
        assert refused.value.code == "invalid_field", (given, refused.value)
        assert "tool_call_id must be a non-empty string" in refused.value.message
    named = await as_owner(
        hub, "tasks", "tool_call", task["id"], data={"name": "bash", "tool_call_id": "call-1"}
    )
    made = await as_owner(
        hub, "tasks", "tool_call", task["id"], data={"name": "bash", "tool_call_id": None}
    )
    assert named["id"] == "call-1" and made["id"] not in ("call-1", None)


async def test_a_board_that_holds_sessions_is_not_removed_and_says_why(hub: Hub) -> None:
    # the store's key refused it: answered "the data does not fit the records"
    def call(service: str, method: str, id: str | None = None, data: Any = None) -> Any:
        return as_owner(hub, service, method, id, data=data)

    board = await call("boards", "create", data={"name": "B"})
    other = await call("boards", "create", data={"name": "C"})
    sessions = [
        await call("sessions", "create", data={"title": f"s{n}", "board_id": board["id"]})
        for n in range(2)
    ]
    with pytest.raises(ServiceError) as refused:
        await call("boards", "remove", board["id"])
    assert refused.value.code == "conflict"
    assert refused.value.message == (
        f"board {board['id']} still holds 2 session(s): move them to another board "
        "(sessions.patch board_id) or remove them first"
    )
    assert refused.value.data == {"sessions": 2}
    assert (await call("boards", "get", board["id"]))["name"] == "B"
    await call("sessions", "patch", sessions[0]["id"], {"board_id": other["id"]})
    await call("sessions", "remove", sessions[1]["id"])
    assert await call("boards", "remove", board["id"]) == {"id": board["id"]}
    with pytest.raises(ServiceError) as gone:
        await call("boards", "get", board["id"])
    assert gone.value.code == "not_found"


async def test_a_write_that_names_no_user_or_a_removed_one_says_which_field(hub: Hub) -> None:
    # the store's key refused the first with "the data does not fit the records"
    def call(service: str, method: str, id: str | None = None, **kw: Any) -> Any:
        return as_owner(hub, service, method, id, **kw)

    session = await call("sessions", "create", data={"title": "S"})
    board = await call("boards", "create", data={"name": "B"})
    gone = await call("users", "create", data={"name": "gone"})
    await call("users", "remove", gone["id"])
    for user_id, why in (
        ("nobody", "no user nobody"),
        (gone["id"], f"user {gone['id']} was removed"),
    ):
        for service, method, id, data, base_rev in (
            ("sessions", "create", None, {"title": "x", "locked_by": user_id}, None),
            ("sessions", "patch", session["id"], {"locked_by": user_id}, 1),
            ("sessions", "patch", session["id"], {"owner_id": user_id}, 1),
            ("boards", "patch", board["id"], {"owner_id": user_id}, None),
        ):
            with pytest.raises(ServiceError) as refused:
                await call(service, method, id, data=data, base_rev=base_rev)
            field = next(iter(k for k in data if k != "title"))
            assert (refused.value.code, refused.value.message) == (
                "invalid_field",
                f"data.{field}: {why}",
            ), (service, method, data)
    locked = await call("sessions", "patch", session["id"], data={"locked_by": "owner"}, base_rev=1)
    assert locked["locked_by"] == "owner"
