"""An agent harness embedding the runtime reports what a remote client sees."""

from __future__ import annotations

import pathlib
import socket

import pytest
import trio

from agor_actors.daemon import Outbox
from agor_actors.embed import open_runtime
from protocols import Codec, Event, Limits, decode_server_frame


async def test_harness_reports_stream_tools_status_and_git(tmp_path: pathlib.Path) -> None:
    async with open_runtime(data_dir=tmp_path) as rt:
        session = await rt.create_session(title="Fix the tests", agent="claude-code")
        out = Outbox(Codec.CBOR)
        await rt.hub.join(rt.principal, "viewer", out, f"session:{session['id']}", None)
        agent = rt.reporter(session["id"])
        await agent.status("running")
        task = await agent.start_task("make it green")
        tool = await agent.tool_call(task, "bash", {"cmd": "pytest"})
        await agent.tool_result(task, tool, {"exit": 0})
        async with agent.message(task) as stream:
            for word in ["All ", "tests ", "pass."]:
                await stream.write(word)
        await agent.git_state({"branch": "main", "dirty": False})
        await agent.complete_task(task, {"summary": "done"})
        seen: list[Event] = []
        with trio.fail_after(10):
            while not any(e.event == "task:completed" for e in seen):
                frame = await out.next_frame()
                seen += [
                    m
                    for m in decode_server_frame(Codec.CBOR, frame, Limits())
                    if isinstance(m, Event)
                ]
        names = [e.event for e in seen]
        for expected in (
            "session:status_changed",
            "task:created",
            "task:started",
            "task:tool_call",
            "task:message",
            "git:state_changed",
            "task:completed",
        ):
            assert expected in names
        text = "".join(e.data.get("chunk", "") for e in seen if e.event == "task:message")
        assert text == "All tests pass."
        assert any(e.event == "task:message" and e.data.get("streaming") is False for e in seen)
        seqs = [s for e in seen for s in range(e.seq, (e.last_seq or e.seq) + 1)]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # gap-free, in order


async def test_embedded_runtime_can_serve_websocket_clients(tmp_path: pathlib.Path) -> None:
    from agor_actors.client import connect

    async with open_runtime(data_dir=tmp_path, serve=("127.0.0.1", 0)) as rt:
        assert rt.port is not None
        assert rt.ws_url == f"ws://127.0.0.1:{rt.port}/ws"
        assert rt.http_url == f"http://127.0.0.1:{rt.port}"
        assert rt.token == rt.hub.owner_token == (tmp_path / "token").read_text().strip()
        session = await rt.create_session(title="served")
        async with connect(rt.ws_url, token=rt.token) as client:
            mirror = await client.join(f"session:{session['id']}")
            agent = rt.reporter(session["id"])
            await agent.status("running")
            with trio.fail_after(10):
                await mirror.wait_until(
                    lambda m: (m.get("sessions", session["id"]) or {}).get("status") == "running"
                )


async def test_an_embedded_runtime_that_does_not_serve_has_no_urls(tmp_path: pathlib.Path) -> None:
    async with open_runtime(data_dir=tmp_path) as rt:
        assert rt.port is None and rt.ws_url is None and rt.http_url is None
        assert rt.token == rt.hub.owner_token


@pytest.mark.parametrize(
    ("host", "ws_url"),
    [
        ("0.0.0.0", "ws://127.0.0.1:4242/ws"),
        ("::", "ws://[::1]:4242/ws"),
        ("::1", "ws://[::1]:4242/ws"),
        ("192.0.2.7", "ws://192.0.2.7:4242/ws"),
    ],
)
async def test_the_urls_of_a_served_runtime_reach_its_address(
    tmp_path: pathlib.Path, host: str, ws_url: str
) -> None:
    async with open_runtime(data_dir=tmp_path) as rt:
        rt.host, rt.port = host, 4242
        assert rt.ws_url == ws_url
        assert rt.http_url == "http" + ws_url.removeprefix("ws").removesuffix("/ws")


@pytest.mark.parametrize("port", [70_000, -1])
async def test_an_embedded_runtime_refuses_a_port_that_is_none(
    tmp_path: pathlib.Path, port: int
) -> None:
    # (the socket layer took 70000 as port 4464, without a word)
    from agor_actors.server import ListenError

    with pytest.raises(ListenError) as caught:  # itself, not in the runtime's groups
        async with open_runtime(data_dir=tmp_path, serve=("127.0.0.1", port)):
            pytest.fail("served")
    assert caught.value.explain() == (
        f"{port} is not a port: serve=(host, port) takes 0 (any free port) to 65535"
    )


async def test_a_taken_port_is_refused_before_the_data_dir_is_opened(
    tmp_path: pathlib.Path,
) -> None:
    from agor_actors.server import ListenError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ListenError) as caught:
            async with open_runtime(data_dir=tmp_path / "agor", serve=("127.0.0.1", port)):
                pytest.fail("served on a taken port")
    assert caught.value.explain() == (
        f"port {port} is already in use on 127.0.0.1 (another agor-actors?): "
        "stop it, or choose another port with serve=(host, port)"
    )
    assert not (tmp_path / "agor").exists()  # nothing made, nothing locked
    # the port, once free, is served
    async with open_runtime(data_dir=tmp_path / "agor", serve=("127.0.0.1", port)) as rt:
        assert rt.port == port
