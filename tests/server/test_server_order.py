"""One connection's writes keep the order in which it sent them, also when
it pipelines them (as many as the protocol lets it have pending, several in
one frame): an agent streaming a message sees every chunk appended in order."""

from __future__ import annotations

import pathlib

import trio
from server_support import daemon, raw_client

from protocols import Call, Codec, Result, Welcome

ROUNDS = 5  # 300 calls: within the rate limit's burst (400)
PIPELINED = 60  # the protocol allows 64 calls pending
CHUNKS = ROUNDS * PIPELINED


async def test_pipelined_chunks_are_appended_in_the_order_sent(tmp_path: pathlib.Path) -> None:
    async with daemon(tmp_path / "agor") as d, raw_client(d.ws_url, Codec.JSON, token=d.token) as c:
        await c.expect(Welcome)
        await c.send(Call(1, "sessions", "create", data={"title": "order"}))
        session = (await c.expect(Result)).data
        await c.send(
            Call(2, "messages", "create", data={"session_id": session["id"], "content": ""})
        )
        message = (await c.expect(Result)).data
        refs = list(range(10, 10 + CHUNKS))
        answered: dict[int, Result] = {}
        with trio.fail_after(30):
            for start in range(0, CHUNKS, PIPELINED):
                # one frame of calls, every one sent before any result is read
                batch = [
                    Call(ref, "messages", "stream", id=message["id"], data={"chunk": f"<{ref}>"})
                    for ref in refs[start : start + PIPELINED]
                ]
                await c.send(batch)
                while len(answered) < start + PIPELINED:
                    for msg in await c.receive():
                        if isinstance(msg, Result):
                            answered[msg.ref] = msg
        assert all(r.ok for r in answered.values()), [r for r in answered.values() if not r.ok][:3]
        await c.send(Call(3, "messages", "get", id=message["id"]))
        stored = (await c.expect(Result)).data
    assert stored["content"] == "".join(f"<{ref}>" for ref in refs)
