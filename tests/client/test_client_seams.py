"""The client's seams: it opens its connections through a
:class:`~agor_actors.world.Dialer` (the simulator passes its network's), an
observer sees every frame and protocol event, and a room's reload survives
a server that cannot answer for a moment."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest
import trio
from client_support import CountingDialer, Daemon, WrappedTransport

from agor_actors.client import (
    CallError,
    Client,
    ClientObserver,
    Resources,
    WebSocketDialer,
    connect,
    load_room,
)
from agor_actors.world import Dialer, DialFailed, MessageTransport
from protocols import ClientEvent, EventApplied, Heartbeat, ReloadRequired, Welcomed


class RefusingDialer:
    def __init__(self, failure: DialFailed) -> None:
        self.failure = failure

    @asynccontextmanager
    async def dial(
        self,
        url: str,
        *,
        subprotocols: Sequence[str],
        headers: Sequence[tuple[str, str]] = (),
        connect_timeout_s: float = 10.0,
    ) -> AsyncIterator[MessageTransport]:
        await trio.lowlevel.checkpoint()
        raise self.failure
        yield  # pragma: no cover


def test_the_dialers_implement_the_seam() -> None:
    assert isinstance(WebSocketDialer(), Dialer)
    assert isinstance(CountingDialer(), Dialer)


async def test_the_client_connects_and_reconnects_through_its_dialer(running: Daemon) -> None:
    dialer = CountingDialer()
    async with connect(
        running.url, token=running.token, codec="cbor", dialer=dialer, backoff_cap_s=0.1
    ) as client:
        session = await client.service("sessions").create({"title": "via the seam"})
        await client.disconnect()
        client.reconnect()
        with trio.fail_after(10):
            await client.wait_connected()
        assert (await client.service("sessions").get(session["id"]))["title"] == "via the seam"
    assert dialer.offered == [["agor.v1.cbor"], ["agor.v1.cbor"]]


@pytest.mark.parametrize(
    ("failure", "code", "message"),
    [
        (DialFailed("refused", "refused the WebSocket (403): no"), "rejected", "ws://x/ws refused"),
        (DialFailed("timeout", "no answer in time"), "unavailable", "cannot connect to ws://x/ws"),
        (DialFailed("unreachable", "connection refused"), "unavailable", "connection refused"),
    ],
)
async def test_a_dial_failure_is_a_readable_connect_error(
    failure: DialFailed, code: str, message: str
) -> None:
    with trio.fail_after(5), pytest.raises(CallError) as caught:
        async with connect("ws://x/ws", token="t", dialer=RefusingDialer(failure)):
            pass  # pragma: no cover
    assert caught.value.code == code
    assert message in caught.value.message


class Recording(ClientObserver):
    def __init__(self) -> None:
        self.frames = 0
        self.events: list[ClientEvent] = []

    def frame_received(self, frame: bytes | str) -> None:
        self.frames += 1

    def protocol_event(self, event: ClientEvent) -> None:
        self.events.append(event)


async def test_the_observer_sees_frames_and_protocol_events_in_order(running: Daemon) -> None:
    observer = Recording()
    async with connect(running.url, token=running.token, observer=observer) as client:
        session = await client.service("sessions").create({"title": "watched"})
        room = f"session:{session['id']}"
        mirror = await client.join(room)
        task = await client.service("tasks").create({"session_id": session["id"], "prompt": "p"})
        with trio.fail_after(10):
            await mirror.wait_until(lambda m: m.seq >= task["_seq"])
    assert isinstance(observer.events[0], Welcomed)
    assert observer.frames >= 4  # welcome, two results, joined, the event
    reload_at = next(
        i for i, e in enumerate(observer.events) if isinstance(e, ReloadRequired) and e.room == room
    )
    applied = [
        e.event.seq
        for e in observer.events[reload_at:]
        if isinstance(e, EventApplied) and e.event.room == room
    ]
    assert applied and applied[-1] == task["_seq"]
    assert applied == sorted(applied)


async def test_a_reload_the_server_cannot_answer_now_is_tried_again(running: Daemon) -> None:
    failures = ["internal", "unavailable"]
    tries: list[str] = []

    async def flaky(client: Client, room: str) -> Resources:
        tries.append(room)
        if failures:
            raise CallError(failures.pop(0), "not now")
        return await load_room(client, room)

    async with connect(
        running.url, token=running.token, loader=flaky, backoff_base_s=0.01, backoff_cap_s=0.05
    ) as client:
        session = await client.service("sessions").create({"title": "flaky"})
        room = f"session:{session['id']}"
        with trio.fail_after(10):
            mirror = await client.join(room)
        assert tries == [room] * 3
        assert mirror.left_reason is None
        row = mirror.get("sessions", session["id"])
        assert row is not None and row["title"] == "flaky"


async def test_a_reload_refused_for_good_gives_the_room_up(running: Daemon) -> None:
    async def forbidden(client: Client, room: str) -> Resources:
        raise CallError("forbidden", "no")

    async with connect(running.url, token=running.token, loader=forbidden) as client:
        session = await client.service("sessions").create({"title": "closed"})
        with trio.fail_after(10), pytest.raises(CallError) as caught:
            await client.join(f"session:{session['id']}")
        assert caught.value.code == "forbidden"


class FailingFirst(CountingDialer):
    """Unreachable for the first ``failures`` dials, then the real dialer."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def dial(
        self,
        url: str,
        *,
        subprotocols: Sequence[str],
        headers: Sequence[tuple[str, str]] = (),
        connect_timeout_s: float = 10.0,
    ) -> AbstractAsyncContextManager[MessageTransport]:
        if self.failures > 0:
            self.failures -= 1
            self.offered.append(list(subprotocols))
            return RefusingDialer(DialFailed("unreachable", "not yet")).dial(
                url, subprotocols=subprotocols
            )
        return super().dial(
            url, subprotocols=subprotocols, headers=headers, connect_timeout_s=connect_timeout_s
        )


async def test_retry_first_keeps_trying_the_first_connection(running: Daemon) -> None:
    dialer = FailingFirst(2)
    async with connect(
        running.url,
        token=running.token,
        dialer=dialer,
        retry_first=True,
        backoff_base_s=0.01,
        backoff_cap_s=0.02,
    ) as client:
        # a call waits for the connection the client keeps trying to make
        with trio.fail_after(10):
            session = await client.service("sessions").create({"title": "late"})
        assert session["title"] == "late"
        assert client.statistics().connects == 1
    assert len(dialer.offered) == 3


class _Stalling(WrappedTransport):
    """A transport that, once told, neither takes nor delivers anything:
    a peer that stopped reading and writing with its socket still open."""

    def __init__(self, inner: MessageTransport) -> None:
        super().__init__(inner)
        self.stalled = False

    async def receive(self) -> bytes | str:
        message = await self.inner.receive()
        if self.stalled:
            await trio.sleep_forever()
        return message

    async def send(self, data: bytes | str) -> None:
        if self.stalled:
            await trio.sleep_forever()
        await self.inner.send(data)


class StallingDialer(CountingDialer):
    """The real dialer; its first connection stalls when told."""

    def __init__(self) -> None:
        super().__init__()
        self.first: _Stalling | None = None
        self.redialed = trio.Event()

    def wrap(self, transport: MessageTransport) -> MessageTransport:
        if self.first is None:
            self.first = _Stalling(transport)
            return self.first
        self.redialed.set()
        return transport


async def test_a_peer_that_stops_reading_is_dropped_by_the_heartbeat(running: Daemon) -> None:
    """The ping's send waits on a peer that stopped reading; it is bounded by
    the heartbeat's timeout, so the connection is dropped as dead and the
    client connects again (it used to wait on that send for good)."""
    dialer = StallingDialer()
    heartbeat = Heartbeat(interval_s=0.05, timeout_s=0.3)
    async with connect(
        running.url, token=running.token, dialer=dialer, heartbeat=heartbeat, backoff_cap_s=0.1
    ) as client:
        assert dialer.first is not None
        dialer.first.stalled = True
        with trio.fail_after(10):
            await dialer.redialed.wait()
        assert client.statistics().dead_connections >= 1
        assert (await client.call("sessions", "find"))["data"] == []
