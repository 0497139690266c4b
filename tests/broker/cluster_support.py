"""Shared helpers for the cluster tests (no tests here): a fresh schema on
the machine's PostgreSQL per test, the machine's Redis, and a reader of an
outbox's events."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa
import trio
from sqlalchemy.pool import NullPool

from agor_actors.daemon import Outbox
from protocols import Codec, Event, Joined, Limits, ServerMessage, decode_server_frame

PG_URL = os.environ.get("AGOR_TEST_PG_URL", "")
REDIS_URL = os.environ.get("AGOR_TEST_REDIS_URL", "")

needs_cluster = pytest.mark.skipif(
    not (PG_URL and REDIS_URL),
    reason="AGOR_TEST_PG_URL and AGOR_TEST_REDIS_URL are not both set (.ci/run sets them):"
    " cluster tests on PostgreSQL and Redis skipped",
)


@contextmanager
def fresh_schema(prefix: str = "agor_cluster") -> Iterator[str]:
    """A PostgreSQL URL whose tables live in a schema of their own (made
    here, dropped afterwards), so tests never see each other's rows."""
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_URL, poolclass=NullPool)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    url = sa.make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


class Reader:
    """Everything an outbox was given, decoded, in order."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.messages: list[ServerMessage] = []

    @property
    def events(self) -> list[Event]:
        return [m for m in self.messages if isinstance(m, Event)]

    @property
    def joined(self) -> Joined:
        return next(m for m in self.messages if isinstance(m, Joined))

    async def until_seq(self, seq: int, *, limit_s: float = 10.0) -> list[Event]:
        """Read until an event covering ``seq`` arrived; the events so far."""
        with trio.fail_after(limit_s):
            while not any(e.end_seq >= seq for e in self.events):
                frame = await self.outbox.next_frame()
                self.messages += decode_server_frame(self.outbox.codec, frame, Limits())
        return self.events


def assert_gap_free(events: list[Event], first: int = 1) -> None:
    """``events`` cover ``first``.. with no gap and no seq twice."""
    expected = first
    for event in events:
        assert event.seq == expected, [(e.seq, e.end_seq) for e in events]
        expected = event.end_seq + 1


CODEC = Codec.CBOR
