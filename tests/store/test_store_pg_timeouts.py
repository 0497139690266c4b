"""A PostgreSQL store that cannot be reached answers ``unavailable`` in
bounded time: a server that accepts the TCP connection and then says
nothing (a hung or blackholed PostgreSQL) used to hold ``serve`` (and a
write's pooled reconnect) for as long as the kernel retried, minutes.

No PostgreSQL is needed: the silent server is a listening socket on
127.0.0.1 that never answers (the kernel completes the handshake from the
backlog, libpq then waits for the server's first message)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from agor_actors.store import StoreUnavailable, open_store
from agor_actors.store._backend import PG_CONNECT_TIMEOUT_S, pg_connect_args


@pytest.fixture
def silent_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


def test_a_silent_server_is_unavailable_within_the_connect_timeout(silent_port: int) -> None:
    url = f"postgresql+psycopg://agor@127.0.0.1:{silent_port}/agor"
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        open_store(url, new_epoch=lambda: "e", connect_timeout_s=2)
    # libpq's floor is 2 s (per address tried); without a timeout this
    # waited for the server's first message until the test's own timeout
    assert time.monotonic() - started < 10


def test_the_defaults_bound_connects_and_dead_peers_and_the_url_overrides_them() -> None:
    defaults = pg_connect_args(sa.make_url("postgresql+psycopg://agor@db/agor"), 5)
    assert PG_CONNECT_TIMEOUT_S == 5 and defaults["connect_timeout"] == 5
    assert defaults["tcp_user_timeout"] == 15_000
    assert defaults["keepalives"] == 1
    overridden = pg_connect_args(
        sa.make_url("postgresql+psycopg://agor@db/agor?connect_timeout=3&keepalives=0"), 5
    )
    assert "connect_timeout" not in overridden and "keepalives" not in overridden
    assert overridden["tcp_user_timeout"] == 15_000
