"""Writes sent again under an idempotency key run once: from the hub's
table while the daemon lives, from the store's key (taken in the write's
own transaction) after a restart; a real SQLite file."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import sqlalchemy as sa
import trio

from agor_actors.daemon import Hub, Outbox, Principal, ServiceError, open_hub
from agor_actors.world import real_world
from protocols import Call, Codec

OWNER = Principal("owner", "owner", True)


async def new_session(hub: Hub) -> str:
    session = await hub.call(
        OWNER, connection_id="c1", service="sessions", method="create", data={"title": "S"}
    )
    return str(session["id"])


async def create_task(hub: Hub, sid: str, key: str | None, prompt: str = "hi") -> Any:
    return await hub.call(
        OWNER,
        connection_id="c1",
        service="tasks",
        method="create",
        data={"session_id": sid, "prompt": prompt},
        idempotency_key=key,
    )


async def rename(hub: Hub, sid: str, title: str, key: str | None = None) -> Any:
    return await hub.call(
        OWNER,
        connection_id="c1",
        service="sessions",
        method="patch",
        id=sid,
        data={"title": title},
        idempotency_key=key,
    )


def rows(data_dir: pathlib.Path, sql: str) -> list[Any]:
    engine = sa.create_engine(f"sqlite:///{data_dir / 'agor.db'}")
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(sql)))
    finally:
        engine.dispose()


async def test_a_write_sent_again_is_answered_with_the_first_ones_result(
    tmp_path: pathlib.Path,
) -> None:
    data_dir = tmp_path / "agor"
    async with open_hub(real_world(), data_dir=data_dir) as hub:
        sid = await new_session(hub)
        first = await create_task(hub, sid, "k-1")
        again = await create_task(hub, sid, "k-1")
        assert "_replayed" not in first
        assert again["_replayed"] is True and again["id"] == first["id"]
        other = await create_task(hub, sid, "k-2")  # another key: another write
        assert other["id"] != first["id"]
        plain = await create_task(hub, sid, None)  # no key: every call runs
        assert plain["id"] not in (first["id"], other["id"])
        assert hub.keys.replays == 0  # answered: the store's key told it
        assert len(hub.keys) == 0  # nothing kept in memory once answered
    tasks = rows(data_dir, "SELECT id FROM tasks ORDER BY id")
    assert len(tasks) == 3
    assert rows(data_dir, "SELECT user_id, key, call FROM idempotency_keys ORDER BY key") == [
        ("owner", "k-1", "tasks.create"),
        ("owner", "k-2", "tasks.create"),
    ]


async def test_after_a_restart_the_store_answers_it_and_writes_nothing(
    tmp_path: pathlib.Path,
) -> None:
    data_dir = tmp_path / "agor"
    async with open_hub(real_world(), data_dir=data_dir) as hub:
        sid = await new_session(hub)
        first = await create_task(hub, sid, "k-1")
        renamed = await rename(hub, sid, "T", "k-patch")
    async with open_hub(real_world(), data_dir=data_dir) as hub:  # a new daemon: nothing in hand
        out = Outbox(Codec.JSON)
        await hub.join(OWNER, "c2", out, f"session:{sid}", None)
        head = rows(data_dir, f"SELECT head_seq FROM rooms WHERE room = 'session:{sid}'")
        again = await create_task(hub, sid, "k-1")
        assert again["_replayed"] is True and again["id"] == first["id"]
        assert again["_seq"] == first["_seq"]  # the seq of the first write's event
        patched = await rename(hub, sid, "T", "k-patch")
        assert patched["_replayed"] is True and patched["rev"] == renamed["rev"]
        # the session's actor goes on with the store's row (its own planned
        # the refused patch on it)
        later = await rename(hub, sid, "U")
        assert later["rev"] == renamed["rev"] + 1 and later["title"] == "U"
        assert rows(data_dir, f"SELECT head_seq FROM rooms WHERE room = 'session:{sid}'") == [
            (head[0][0] + 1,)  # the later patch only
        ]
    assert len(rows(data_dir, "SELECT id FROM tasks")) == 1


async def test_twins_in_flight_wait_for_the_first(tmp_path: pathlib.Path) -> None:
    async with open_hub(real_world(), data_dir=tmp_path / "agor") as hub:
        sid = await new_session(hub)
        answers: list[Any] = []

        async def one() -> None:
            answers.append(await create_task(hub, sid, "k-1"))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(one)
        assert len({a["id"] for a in answers}) == 1
        assert sorted(bool(a.get("_replayed")) for a in answers) == [False] + [True] * 4
        found = await hub.call(
            OWNER, connection_id="c1", service="tasks", method="find", query={"session_id": sid}
        )
        assert len(found["data"]) == 1


async def test_a_key_for_another_call_is_refused(tmp_path: pathlib.Path) -> None:
    data_dir = tmp_path / "agor"
    async with open_hub(real_world(), data_dir=data_dir) as hub:
        sid = await new_session(hub)
        await create_task(hub, sid, "k-1", "first")
        with pytest.raises(ServiceError) as refused:
            await create_task(hub, sid, "k-1", "second")  # other data
        assert refused.value.code == "invalid_field" and "k-1" in refused.value.message
        with pytest.raises(ServiceError) as users:  # its answer holds a token
            await hub.call(
                OWNER,
                connection_id="c1",
                service="users",
                method="create",
                data={"name": "bo"},
                idempotency_key="k-u",
            )
        assert users.value.code == "invalid_field"
        with pytest.raises(ServiceError) as long:
            await create_task(hub, sid, "k" * 129)
        assert long.value.code == "invalid_field"
    async with open_hub(real_world(), data_dir=data_dir) as hub:  # the store's check
        with pytest.raises(ServiceError) as stored:
            await create_task(hub, sid, "k-1", "second")
        assert stored.value.code == "invalid_field"
    assert len(rows(data_dir, "SELECT id FROM tasks")) == 1


async def test_a_failed_write_leaves_its_key_free(tmp_path: pathlib.Path) -> None:
    async with open_hub(real_world(), data_dir=tmp_path / "agor") as hub:
        sid = await new_session(hub)
        with pytest.raises(ServiceError) as missing:  # no such session: nothing written
            await create_task(hub, "no-such-session", "k-1")
        assert missing.value.code == "not_found"
        written = await create_task(hub, sid, "k-1")  # the same key, now written
        assert "_replayed" not in written


async def test_submit_answers_a_twin_with_the_first_ones_result(tmp_path: pathlib.Path) -> None:
    """The WebSocket path: the first write is answered through ``reply``;
    the one sent again is returned as a call to run, which answers it."""
    async with open_hub(real_world(), data_dir=tmp_path / "agor") as hub:
        sid = await new_session(hub)
        call = Call(
            1,
            "tasks",
            "create",
            data={"session_id": sid, "prompt": "hi"},
            idempotency_key="k-ws",
        )
        replies: list[Any] = []
        answered = trio.Event()

        def reply(result: Any) -> None:
            replies.append(result.unwrap())
            answered.set()

        assert await hub.submit(OWNER, "c1", call, reply) is None
        twin = await hub.submit(OWNER, "c1", call, reply)
        assert twin is not None
        with trio.fail_after(10):
            second = await twin()
            await answered.wait()
        assert second["_replayed"] is True and second["id"] == replies[0]["id"]


async def board_call(hub: Hub, method: str, key: str, **fields: Any) -> Any:
    return await hub.call(
        OWNER, connection_id="c1", service="boards", method=method, idempotency_key=key, **fields
    )


async def test_a_boards_write_sent_again_runs_once(tmp_path: pathlib.Path) -> None:
    data_dir = tmp_path / "agor"
    async with open_hub(real_world(), data_dir=data_dir) as hub:
        board = await board_call(hub, "create", "k-board", data={"name": "B"})
        again = await board_call(hub, "create", "k-board", data={"name": "B"})
        assert again["id"] == board["id"] and again["_replayed"] is True
        user = await hub.call(
            OWNER, connection_id="c1", service="users", method="create", data={"name": "bo"}
        )
        member = {"user_id": user["id"], "role": "editor"}
        added = await board_call(hub, "add_member", "k-add", id=board["id"], data=member)
    async with open_hub(real_world(), data_dir=data_dir) as hub:  # the store answers
        again = await board_call(hub, "create", "k-board", data={"name": "B"})
        assert again["id"] == board["id"] and again["_replayed"] is True
        readded = await board_call(hub, "add_member", "k-add", id=board["id"], data=member)
        assert readded["_replayed"] is True and readded["rev"] == added["rev"]
    assert len(rows(data_dir, "SELECT id FROM boards")) == 1
    assert rows(data_dir, f"SELECT rev FROM boards WHERE id = '{board['id']}'") == [(added["rev"],)]
