"""Every client-to-server example of protocols/PROTOCOL.md, sent as printed
(its placeholder ids replaced by real ones) to a real daemon: each gets the
answer the page describes, and none is refused."""

from __future__ import annotations

import pathlib
import re
from typing import Any

import orjson
import trio
from ops_support import REPO, daemon

from agor_actors.client import open_websocket
from agor_actors.daemon import Principal

DOC = (REPO / "protocols" / "PROTOCOL.md").read_text()
OWNER = Principal("owner", "owner", True)


CLIENT_TYPES = frozenset({"hello", "call", "join", "leave", "presence", "ping"})


def client_examples() -> list[str]:
    """The frames of the page's ``json`` blocks that a client sends: those
    of "Messages: client to server", and the batches made of client messages."""
    client_part = DOC.split("## Messages: client to server")[1].split("## Messages: server")[0]
    batches = DOC.split("### batches")[1].split("## Rooms")[0]
    out = []
    for part, only_client in ((client_part, False), (batches, True)):
        for block in re.findall(r"```json\n(.*?)```", part, re.S):
            for line in block.splitlines():
                frame = orjson.loads(line)
                first = frame[0] if isinstance(frame, list) else frame
                if not only_client or first["type"] in CLIENT_TYPES:
                    out.append(line.strip())
    return out


def _expected(message: dict[str, Any]) -> str | None:
    return {
        "hello": "welcome",
        "call": "result",
        "auth": "result",
        "join": "joined",
        "leave": "left",
    }.get(message["type"], "pong" if message["type"] == "ping" else None)


async def test_every_client_example_of_protocol_md_works_as_printed(
    tmp_path: pathlib.Path,
) -> None:
    examples = client_examples()
    kinds = {orjson.loads(line)["type"] for line in examples if line.startswith("{")}
    assert kinds == {"hello", "call", "auth", "join", "leave", "presence", "ping"}
    async with daemon(tmp_path / "agor") as d:
        board = await d.hub.call(
            OWNER, connection_id=None, service="boards", method="create", data={"name": "B"}
        )
        session = await d.hub.call(
            OWNER,
            connection_id=None,
            service="sessions",
            method="create",
            data={"title": "S", "board_id": board["id"]},
        )
        ids = {"s-1": session["id"], "b-1": board["id"], "tab-3f2a": "tab-3f2a"}

        def real(line: str) -> str:
            for placeholder, value in ids.items():
                line = re.sub(rf"\b{re.escape(placeholder)}\b", value, line)
            return line.replace("eyJhbGciOiJIUzI1NiJ9.e30.c2ln", d.token)

        answers: list[dict[str, Any]] = []
        async with open_websocket(d.ws_url, subprotocols=["agor.v1.json"]) as ws:

            async def until(kind: str) -> dict[str, Any]:
                with trio.fail_after(10):
                    while True:
                        frame = orjson.loads(await ws.get_message())
                        for message in frame if isinstance(frame, list) else [frame]:
                            answers.append(message)
                            if message["type"] == kind:
                                return message

            for line in examples:
                sent = orjson.loads(real(line))
                await ws.send_message(real(line))
                for message in sent if isinstance(sent, list) else [sent]:
                    kind = _expected(message)
                    if kind is not None:
                        answer = await until(kind)
                        if kind == "result":
                            assert answer["ok"], (line, answer)
                            if message.get("method") == "create":
                                ids["t-1"] = answer["data"]["id"]
            await ws.send_message('{"type":"ping","t":1}')  # presence has no answer:
            await until("pong")  # anything refused would be answered before this
        assert not [a for a in answers if a["type"] == "error"], answers
        assert not [a for a in answers if a["type"] == "result" and not a["ok"]], answers
        left = [a for a in answers if a["type"] == "left"]
        assert left and all(a["reason"] == "left" for a in left)
