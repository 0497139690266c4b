"""A message streamed with :class:`MessageWriter` against a real daemon
over real WebSockets: each chunk names its offset (``at``), so a chunk
sent again after its connection dropped lands once, and the server refuses
a chunk at the wrong offset with the message's length."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from client_support import Daemon, DroppingDialer
from trio.testing import MockClock

from agor_actors.client import (
    CallError,
    Client,
    ConnectionLost,
    MessageWriter,
    StreamBroken,
    connect,
)


async def _message(client: Client) -> tuple[str, str]:
    session = await client.service("sessions").create({"title": "stream"})
    message = await client.service("messages").create(
        {"session_id": session["id"], "role": "assistant", "streaming": True}
    )
    return str(session["id"]), str(message["id"])


async def test_a_chunk_whose_answer_was_lost_lands_once(running: Daemon) -> None:
    dialer = DroppingDialer()
    async with connect(
        running.url, token=running.token, codec="json", dialer=dialer, backoff_cap_s=0.1
    ) as client:
        sid, mid = await _message(client)
        writer = client.message_writer(sid, mid)
        with trio.fail_after(20):
            await writer.write("one ")
            dialer.marker = "two "  # its answer is lost with the connection
            await writer.write("two ")
            await writer.write("three")
        assert dialer.dropped == 1 and writer.resent >= 1
        assert writer.length == len("one two three")
        stored = await client.service("messages").get(mid)
        assert stored["content"] == "one two three"


async def test_the_server_refuses_a_chunk_at_the_wrong_offset(running: Daemon) -> None:
    async with connect(running.url, token=running.token, codec="cbor") as client:
        sid, mid = await _message(client)
        messages = client.service("messages")
        await messages.call("stream", mid, {"chunk": "ab", "at": 0})
        for at in (0, 5):  # sent twice; past a gap
            with pytest.raises(CallError) as refused:
                await messages.call("stream", mid, {"chunk": "cd", "at": at})
            assert refused.value.code == "conflict" and refused.value.data == {"length": 2}
        for bad in (-1, "2", 1.5, True):
            with pytest.raises(CallError) as invalid:
                await messages.call("stream", mid, {"chunk": "cd", "at": bad})
            assert invalid.value.code == "invalid_field"
        await messages.call("stream", mid, {"chunk": "cd", "at": 2})
        await messages.call("stream", mid, {"chunk": "!"})  # without at: where it ends
        # a writer that starts at the length it was told
        writer = client.message_writer(sid, mid, length=5)
        await writer.write("ef")
        # a writer whose chunk would start inside what is there: the
        # message is not its alone
        behind = client.message_writer(sid, mid, length=6)
        with pytest.raises(StreamBroken) as broken:
            await behind.write("xyz")
        assert broken.value.length == 6
        assert (await messages.get(mid))["content"] == "abcd!ef"


class _Scripted(MessageWriter):
    """A writer whose sends are answered from ``answers`` (None: ok)."""

    def __init__(self, answers: list[CallError | None]) -> None:
        super().__init__(None, "s", "m")  # type: ignore[arg-type]
        self.answers = answers
        self.sent: list[dict[str, Any]] = []

    async def _send(self, data: dict[str, Any]) -> None:
        self.sent.append(data)
        answer = self.answers.pop(0)
        if answer is not None:
            raise answer


def _conflict(length: int) -> CallError:
    return CallError("conflict", "elsewhere", {"length": length})


@pytest.mark.parametrize(
    ("answers", "sends", "length"),
    [
        ([None], 1, 3),
        ([ConnectionLost(), _conflict(3)], 2, 3),  # the first send landed
        ([ConnectionLost(), CallError("unavailable", "busy"), None], 3, 3),
        ([_conflict(0), None], 2, 3),  # refused beside another chunk: sent again
    ],
    ids=["ok", "lost_then_there", "lost_busy_then_ok", "merged_refusal"],
)
async def test_the_writer_sends_a_chunk_until_it_is_known_to_be_there(
    answers: list[CallError | None], sends: int, length: int, autojump_clock: MockClock
) -> None:
    writer = _Scripted(list(answers))
    await writer.write("abc")
    assert [d["at"] for d in writer.sent] == [0] * sends
    assert writer.length == length and writer.resent == sends - 1


@pytest.mark.parametrize(
    "answers",
    [
        [_conflict(1)],  # inside what it believes it wrote: another writer
        [CallError("forbidden", "no")],
        [ConnectionLost()] * 20,
    ],
    ids=["another_writer", "refused", "never_answered"],
)
async def test_the_writer_gives_up_on_what_sending_again_cannot_mend(
    answers: list[CallError | None], autojump_clock: MockClock
) -> None:
    writer = _Scripted(list(answers))
    with pytest.raises((StreamBroken, CallError)):
        await writer.write("abc")
    assert writer.length == 0
