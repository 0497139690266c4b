"""The daemon's core on PostgreSQL (``--db postgresql+psycopg://...``):
writes, fan-out and resume across a restart, against the machine's server.
Runs when ``AGOR_TEST_PG_URL`` is set (``.ci/run`` sets it)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import trio

from agor_actors.daemon import Outbox, Principal, open_hub
from agor_actors.world import real_world
from protocols import Codec, Event, Joined, Limits, Since, decode_server_frame
from tests.pg_schema import fresh_schema

PG_URL = os.environ.get("AGOR_TEST_PG_URL")
pytestmark = pytest.mark.skipif(
    not PG_URL, reason="AGOR_TEST_PG_URL is not set (.ci/run sets it): PostgreSQL skipped"
)
OWNER = Principal("owner", "owner", True)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A schema of its own on the test server, dropped afterwards."""
    assert PG_URL is not None
    with fresh_schema(PG_URL, "agor_hub") as (url, _):
        yield url


async def test_writes_fan_out_and_resume_across_restart_on_postgres(pg_url: str) -> None:
    async with open_hub(real_world(), db_url=pg_url, owner_token="t") as hub:
        session = await hub.call(
            OWNER, connection_id="c", service="sessions", method="create", data={"title": "S"}
        )
        sid = session["id"]
        msg = await hub.call(
            OWNER,
            connection_id="c",
            service="messages",
            method="create",
            data={"session_id": sid, "streaming": True},
        )
        out = Outbox(Codec.CBOR)
        await hub.join(OWNER, "v", out, f"session:{sid}", None)
        for word in ("one ", "two ", "three"):
            await hub.call(
                OWNER,
                connection_id="c",
                service="messages",
                method="stream",
                id=msg["id"],
                data={"chunk": word},
            )
        got: list[object] = []
        with trio.fail_after(10):
            while sum(1 for m in got if isinstance(m, Event)) < 3:
                got += decode_server_frame(Codec.CBOR, await out.next_frame(), Limits())
        joined = next(m for m in got if isinstance(m, Joined))
        last = max(m.end_seq for m in got if isinstance(m, Event))
    async with open_hub(real_world(), db_url=pg_url, owner_token="t") as hub:
        await hub.call(OWNER, connection_id="c", service="messages", method="finish", id=msg["id"])
        again = Outbox(Codec.JSON)
        await hub.join(OWNER, "v", again, f"session:{sid}", Since(joined.epoch, last))
        more: list[object] = []
        with trio.fail_after(10):
            while not any(isinstance(m, Event) for m in more):
                more += decode_server_frame(Codec.JSON, await again.next_frame(), Limits())
        resumed = next(m for m in more if isinstance(m, Joined))
        assert resumed.recovered and resumed.epoch == joined.epoch
        assert [m.seq for m in more if isinstance(m, Event)] == [last + 1]
        stored = await hub.call(
            OWNER, connection_id=None, service="messages", method="get", id=msg["id"]
        )
        assert stored["content"] == "one two three" and stored["streaming"] is False
