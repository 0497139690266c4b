"""A session actor that crashes with chunks on their way to the store
writer, restarted at once: its new incarnation must plan the next chunk
after them.  It reads the message's length from the store when the next
chunk comes; had it read before those chunks committed, it would have
planned the new chunk at an offset one of them takes (simulator, profile
``medium``, seeds 65 and 120: 'the content at 98 is not the chunk')."""

from __future__ import annotations

import contextlib
import pathlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import trio
import trio.testing

from agor_actors.daemon import Hub, Principal, open_hub
from agor_actors.domain import ServiceError
from agor_actors.store import SqlStore, StoreError, WriteRequest, WriteResult, open_store
from agor_actors.world import real_world

OWNER = Principal("owner", "owner", True)


class _Gated(SqlStore):
    """A real SQLite store whose commits run in a worker thread (not on the
    loop, as a local file's do), each waiting while ``gate`` is clear: the
    writes of a group, and those behind it, stay on their way."""

    gate: threading.Event

    @property
    def local(self) -> bool:
        return False

    def commit(self, requests: Sequence[WriteRequest]) -> list[WriteResult | StoreError]:
        assert self.gate.wait(10), "the test never opened the gate"
        return super().commit(requests)


@contextlib.asynccontextmanager
async def _gated_hub(
    tmp_path: pathlib.Path,
) -> AsyncIterator[tuple[_Gated, Hub, Callable[..., Awaitable[Any]]]]:
    """A hub on a :class:`_Gated` store (its gate open), and a ``call`` as
    the owner."""
    store = open_store(f"sqlite:///{tmp_path / 'agor.db'}", new_epoch=lambda: "e1")
    store.__class__ = _Gated
    assert isinstance(store, _Gated)
    store.gate = threading.Event()
    store.gate.set()
    try:
        async with open_hub(real_world(), data_dir=tmp_path / "agor", store=store) as hub:

            async def call(service: str, method: str, **kw: Any) -> Any:
                return await hub.call(
                    OWNER, connection_id="c", service=service, method=method, **kw
                )

            yield store, hub, call
    finally:
        store.close()


async def test_a_restarted_session_plans_chunks_after_its_predecessors(
    tmp_path: pathlib.Path,
) -> None:
    async with _gated_hub(tmp_path) as (store, hub, call):
        session = await call("sessions", "create", data={"title": "S"})
        sid = session["id"]
        message = await call(
            "messages",
            "create",
            data={"session_id": sid, "role": "assistant", "content": "", "streaming": True},
        )
        mid = message["id"]
        await call("messages", "stream", id=mid, data={"chunk": "c0;"})

        answers: dict[str, Any] = {}

        async def stream(text: str) -> None:
            try:
                answers[text] = await call("messages", "stream", id=mid, data={"chunk": text})
            except Exception as exc:  # the crash answers those in flight
                answers[text] = exc

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                store.gate.clear()
                for text in ("c1;", "c2;"):  # in this order
                    nursery.start_soon(stream, text)
                    await trio.testing.wait_all_tasks_blocked()
                # both planned and sent to the writer, which holds them
                assert not answers
                ref = hub.system.registry.lookup(f"session:{sid}")
                assert ref is not None
                assert ref.try_send(object())  # a message no behaviour knows: a crash
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(stream, "c3;")
                await trio.testing.wait_all_tasks_blocked()
                store.gate.set()
        assert not isinstance(answers["c3;"], Exception), answers

        content = (store.get("messages", mid) or {})["content"]
        assert content == "c0;c1;c2;c3;"  # the store appended each, in order
        chunks = [
            e.data
            for e in store.events_since(f"session:{sid}", 0)
            if e.data.get("message_id") == mid and "chunk" in e.data
        ]
        assert "".join(c["chunk"] for c in chunks) == content
        for c in chunks:  # every event says where its chunk is
            assert content[c["offset"] : c["offset"] + len(c["chunk"])] == c["chunk"], chunks


async def test_a_restarted_session_writes_its_row_after_its_predecessors(
    tmp_path: pathlib.Path,
) -> None:
    """The same for the session's own row: a patch of the crashed
    incarnation still at the writer, then one of the new incarnation.  The
    new one must merge against the row as that patch left it (its fields'
    clocks), not the row read before it committed, whose clocks it would
    write back."""
    async with _gated_hub(tmp_path) as (store, hub, call):
        sid = (await call("sessions", "create", data={"title": "S"}))["id"]
        created = store.get("sessions", sid) or {}
        answers: dict[str, Any] = {}

        async def patch(field: str, value: Any) -> None:
            try:
                answers[field] = await call("sessions", "patch", id=sid, data={field: value})
            except Exception as exc:  # the crash answers the one in flight
                answers[field] = exc

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                store.gate.clear()
                nursery.start_soon(patch, "title", "renamed before the crash")
                await trio.testing.wait_all_tasks_blocked()
                ref = hub.system.registry.lookup(f"session:{sid}")
                assert ref is not None and ref.try_send(object())  # a crash
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(patch, "agent", "after the crash")
                await trio.testing.wait_all_tasks_blocked()
                store.gate.set()
        assert not isinstance(answers["agent"], Exception), answers

        row = store.get("sessions", sid) or {}
        assert row["title"] == "renamed before the crash"
        assert row["agent"] == "after the crash"
        # the rename's clock and rev survived the later write
        assert row["clocks"]["title"] != created["clocks"]["title"], (created, row)
        assert row["rev"] == created["rev"] + 2, (created, row)


async def test_a_chunk_at_a_taken_offset_waits_for_the_chunks_on_their_way(
    tmp_path: pathlib.Path,
) -> None:
    """``at`` on one daemon: while a chunk of the message is on its way to
    the store, a chunk at another offset is told ``unavailable`` (the
    length the actor knows counts a chunk not yet durable: answering
    ``conflict`` with it would tell a writer that resends that chunk it is
    there); once answered, ``conflict`` with the durable length."""
    async with _gated_hub(tmp_path) as (store, _hub, call):
        session = await call("sessions", "create", data={"title": "S"})
        message = await call(
            "messages",
            "create",
            data={"session_id": session["id"], "role": "assistant", "streaming": True},
        )
        mid = message["id"]
        other = await call(
            "messages",
            "create",
            data={"session_id": session["id"], "role": "assistant", "streaming": True},
        )
        await call("messages", "stream", id=other["id"], data={"chunk": "xyz"})
        answers: dict[str, Any] = {}

        async def stream(key: str, chunk: str, at: int, target: str = mid) -> None:
            try:
                answers[key] = await call(
                    "messages", "stream", id=target, data={"chunk": chunk, "at": at}
                )
            except ServiceError as exc:
                answers[key] = exc.code, exc.data

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                store.gate.clear()
                nursery.start_soon(stream, "first", "ab", 0)
                await trio.testing.wait_all_tasks_blocked()
                assert not answers  # planned, held at the writer
                await stream("again", "ab", 0)  # its answer lost, sent again
                assert answers["again"] == ("unavailable", None)
                # another message, with nothing on its way: known at once
                await stream("other", "!", 0, other["id"])
                assert answers["other"] == ("conflict", {"length": 3})
                store.gate.set()
            await stream("later", "ab", 0)
        assert answers["first"]["appended"] == 2
        assert answers["later"] == ("conflict", {"length": 2})
        assert (store.get("messages", mid) or {})["content"] == "ab"
