"""The Python client paces itself to the rate the server announced in
``welcome.limits``: code that calls faster than that is slowed down in the
client and never refused with ``rate_limited``.  Against a real daemon (a
SQLite file, WebSockets on 127.0.0.1)."""

from __future__ import annotations

import pathlib

import pytest
import trio
from ops_support import daemon

from agor_actors.client import Client, connect
from agor_actors.client._client import RETRY_AFTER_MAX_S, Pacer, retry_after_s
from agor_actors.daemon import Principal
from agor_actors.server import ServerSettings
from protocols import Limits


async def _message(client: Client) -> str:
    session = await client.service("sessions").create({"title": "paced"})
    message = await client.service("messages").create(
        {"session_id": session["id"], "role": "assistant", "streaming": True}
    )
    return str(message["id"])


@pytest.mark.slow
async def test_a_loop_streaming_at_190_calls_a_second_is_never_rate_limited(
    tmp_path: pathlib.Path,
) -> None:
    calls, per_s = 380, 190.0  # two seconds of it, against the default 200/s
    async with (
        daemon(tmp_path / "agor") as d,
        connect(d.ws_url, token=d.token, seed=1) as client,
    ):
        assert client.welcome is not None
        assert client.welcome.limits["rate_per_s"] == Limits().rate_per_s
        message_id = await _message(client)
        answered: list[object] = []

        async def stream(n: int) -> None:
            answered.append(
                await client.service("messages").call("stream", message_id, {"chunk": f"{n} "})
            )

        async with trio.open_nursery() as nursery:
            for n in range(calls):  # fire and go on: up to 64 in flight
                nursery.start_soon(stream, n)
                await trio.sleep(1 / per_s)
        assert len(answered) == calls
        assert client.statistics().rate_limited == 0


async def test_calls_as_fast_as_possible_are_paced_to_the_announced_rate(
    tmp_path: pathlib.Path,
) -> None:
    limits = Limits(rate_per_s=100.0, rate_burst=40)
    calls = 160
    async with (
        daemon(tmp_path / "agor", ServerSettings(limits=limits)) as d,
        connect(d.ws_url, token=d.token, seed=2) as client,
    ):
        message_id = await _message(client)
        messages = client.service("messages")
        started_s = trio.current_time()

        async def worker(chunks: range) -> None:
            for n in chunks:
                await messages.call("stream", message_id, {"chunk": f"{n} "})

        async with trio.open_nursery() as nursery:
            for w in range(32):
                nursery.start_soon(worker, range(w, calls, 32))
        elapsed_s = trio.current_time() - started_s
        stats = client.statistics()
        assert stats.rate_limited == 0
        # the bucket holds 20 (half the burst): the rest went at 100/s
        assert elapsed_s >= (calls - limits.rate_burst) / limits.rate_per_s
        assert stats.paced_s > 0
        row = await messages.get(message_id)
        assert sorted(map(int, row["content"].split())) == list(range(calls))  # each once


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def now_s(self) -> float:
        return self.t


def test_the_pacer_is_a_token_bucket_of_half_the_servers_burst() -> None:
    clock = _Clock()
    pacer = Pacer(clock, Limits(rate_per_s=10.0, rate_burst=8))
    assert pacer.burst == 4 and pacer.delay_s() == 0
    for _ in range(4):
        assert pacer.delay_s() == 0
        pacer.spend()
    assert pacer.delay_s() == pytest.approx(0.1)
    pacer.spend(2)  # a ping and a resume go at once, into debt
    assert pacer.delay_s() == pytest.approx(0.3)
    clock.t += 0.3 + 1e-9
    assert pacer.delay_s() == 0
    clock.t += 60.0  # never more than the bucket holds
    pacer.spend(4)
    assert pacer.delay_s() == pytest.approx(0.1)
    clock.t += 0.2
    pacer.penalize()  # the server said rate_limited: start from empty
    assert pacer.delay_s() == pytest.approx(0.1)
    pacer.penalize(0.25)  # rate_limited with retry_after_ms=250: not a token before
    assert pacer.delay_s() == pytest.approx(0.25)
    pacer.penalize(0.01)  # a shorter wait does not undo a longer one
    assert pacer.delay_s() == pytest.approx(0.25)
    assert retry_after_s({"retry_after_ms": 40}) == pytest.approx(0.04)
    assert retry_after_s({"retry_after_ms": 10**9}) == RETRY_AFTER_MAX_S  # bounded
    assert retry_after_s(None) == 0 and retry_after_s({"retry_after_ms": True}) == 0
    pacer.adopt(Limits(rate_per_s=50.0, rate_burst=100))  # a new connection: full
    assert pacer.burst == 50 and pacer.delay_s(50) == 0 and pacer.delay_s(51) == 0


class _SeenClock:
    """trio's clock, remembering its last reading (the pacer's "now")."""

    last_s = 0.0

    def now_s(self) -> float:
        self.last_s = trio.current_time()
        return self.last_s


async def test_rate_limited_calls_wait_the_retry_after_and_are_sent_again(
    tmp_path: pathlib.Path,
) -> None:
    """A client whose pacer believes in a far higher rate than the server
    allows (an older announcement, another program's messages): the calls
    the server refuses carry ``retry_after_ms``; the client holds its next
    call back that long (its own view alone would wait 1 ms), sends them
    again (bounded), and each runs exactly once."""
    limits = Limits(rate_per_s=10.0, rate_burst=2, max_refused=1000)
    calls = 3
    clock = _SeenClock()
    owner = Principal("owner", "owner", True)
    async with (
        daemon(tmp_path / "agor", ServerSettings(limits=limits)) as d,
        connect(d.ws_url, token=d.token, seed=3, clock=clock) as client,
    ):
        session = await d.hub.call(
            owner, connection_id=None, service="sessions", method="create", data={"title": "r"}
        )
        message = await d.hub.call(
            owner,
            connection_id=None,
            service="messages",
            method="create",
            data={"session_id": session["id"], "role": "assistant", "streaming": True},
        )
        messages = client.service("messages")
        client.pacer.adopt(Limits(rate_per_s=1000.0, rate_burst=200))
        # (retry after, when the refusal was taken in, when the next token comes)
        refused: list[tuple[float, float, float]] = []
        penalize = client.pacer.penalize

        def watch(retry_after: float = 0.0) -> None:
            penalize(retry_after)
            penalized_s = clock.last_s
            delay = client.pacer.delay_s()
            refused.append((retry_after, penalized_s, clock.last_s + delay))

        client.pacer.penalize = watch  # type: ignore[method-assign]

        async def one(n: int) -> None:
            await messages.call("stream", message["id"], {"chunk": f"{n} "})

        async with trio.open_nursery() as nursery:
            for n in range(calls):
                nursery.start_soon(one, n)
        stats = client.statistics()
        row = await messages.get(message["id"])
    told = [seen for seen in refused if seen[0] > 0]  # calls (pings: no wait)
    assert stats.rate_limited >= 1 and told
    for retry_after, penalized_s, next_token_s in told:
        assert retry_after <= 0.1  # at most one token at 10/s
        # not before the server said, on the pacer's own readings of the
        # clock (a busy machine may pass milliseconds between the two)
        assert next_token_s >= penalized_s + retry_after - 1e-9
    assert max(seen[0] for seen in told) > 0.01  # the pacer alone would wait 1 ms
    assert sorted(map(int, row["content"].split())) == list(range(calls))  # each once
