"""``GET /metrics``: Prometheus text, the owner's (or a scrape token's) only,
and the counters move while a stream runs."""

from __future__ import annotations

import logging
import pathlib
import urllib.request

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from server_support import daemon, http, stream_chunks

from agor_actors.client import connect
from agor_actors.server import ServerSettings, listen_socket


async def scrape(url: str, token: str) -> dict[str, float]:
    def get() -> str:
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.headers["Content-Type"].startswith("text/plain")
            return str(response.read().decode())

    text = await trio.to_thread.run_sync(get)
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}"] = sample.value
    return values


async def test_counters_move_while_a_stream_runs(tmp_path: pathlib.Path) -> None:
    settings = ServerSettings(metrics_token="scrape-me")
    async with daemon(tmp_path / "agor", settings) as d:
        url = f"{d.http_url}/metrics"
        async with (
            connect(d.ws_url, token=d.token, codec="json") as agent,
            connect(d.ws_url, token=d.token, codec="cbor") as viewer,
        ):
            session = await agent.service("sessions").create({"title": "metrics"})
            message = await agent.service("messages").create(
                {"session_id": session["id"], "content": ""}
            )
            mirror = await viewer.join(f"session:{session['id']}")
            before = await scrape(url, d.token)
            await stream_chunks(agent, mirror, message["id"], 30)
            after = await scrape(url, "scrape-me")  # the scrape token works too

        def moved(name: str) -> float:
            return after.get(name, 0.0) - before.get(name, 0.0)

        assert after["agor_connections{codec=agor.v1.json}"] >= 1
        assert after["agor_connections{codec=agor.v1.cbor}"] >= 1
        assert moved("agor_call_seconds_count{method=stream,service=messages}") == 30
        assert moved("agor_events_committed_total{}") >= 1
        assert moved("agor_deliveries_total{}") >= 1  # merged chunks count once
        assert moved("agor_commit_group_writes_count{}") >= 1
        assert moved("agor_commit_group_writes_sum{}") >= 30
        assert after["agor_actors{kind=session}"] >= 1
        assert after["agor_room_subscribers{}"] >= 1
        # commit to socket: the viewer's frames were measured as they were written
        assert moved("agor_delivery_seconds_count{}") >= 1
        assert moved("agor_delivery_seconds_sum{}") > 0
        assert moved("agor_commit_to_room_seconds_count{}") >= 1
        # nobody else reads them
        refused = await http("GET", url, token="not-a-token")
        assert refused.status == 401
        anonymous = await http("GET", url)
        assert anonymous.status == 401


async def test_a_line_per_connection_opened_and_closed(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agor_actors.server")
    closed_logged = trio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == "connection closed":
                closed_logged.set()  # logged in the trio thread, by the server

    watch = Watch()
    logging.getLogger("agor_actors.server").addHandler(watch)
    try:
        async with daemon(tmp_path / "agor") as d:
            async with connect(d.ws_url, token=d.token, codec="cbor") as client:
                await client.service("sessions").create({"title": "logged"})
            with trio.fail_after(10):
                await closed_logged.wait()
    finally:
        logging.getLogger("agor_actors.server").removeHandler(watch)
    opened = [r for r in caplog.records if r.getMessage() == "connection opened"]
    closed = [r for r in caplog.records if r.getMessage() == "connection closed"]
    assert len(opened) == 1 and len(closed) == 1
    assert opened[0].connection_id == closed[0].connection_id  # type: ignore[attr-defined]
    assert closed[0].codec == "agor.v1.cbor"  # type: ignore[attr-defined]
    assert closed[0].user_id == "owner"  # type: ignore[attr-defined]
    assert closed[0].duration_s >= 0  # type: ignore[attr-defined]
    assert closed[0].close_code in (1000, 1006)  # type: ignore[attr-defined]


async def test_metrics_on_a_port_of_their_own(tmp_path: pathlib.Path) -> None:
    """With a metrics listener, ``/metrics`` is served there (and only
    there, with ``/health``); the public port answers 404 for it."""
    metrics_sock = listen_socket("127.0.0.1", 0)
    metrics_url = f"http://127.0.0.1:{metrics_sock.getsockname()[1]}"
    settings = ServerSettings(metrics_token="scrape-me")
    async with daemon(tmp_path / "agor", settings, metrics_sock=metrics_sock) as d:
        async with connect(d.ws_url, token=d.token, codec="cbor") as client:
            await client.service("sessions").create({"title": "apart"})
            values = await scrape(f"{metrics_url}/metrics", "scrape-me")
            assert values["agor_connections{codec=agor.v1.cbor}"] == 1
            assert values["agor_call_seconds_count{method=create,service=sessions}"] == 1
            owner = await scrape(f"{metrics_url}/metrics", d.token)
            assert "agor_events_committed_total{}" in owner
        public = await http("GET", f"{d.http_url}/metrics", token=d.token)
        assert public.status == 404
        assert public.body["code"] == "not_found"
        assert "metrics port" in public.body["message"]
        health = await http("GET", f"{metrics_url}/health")
        assert health.status == 200 and health.body["status"] == "ok"
        other = await http("GET", f"{metrics_url}/sessions", token=d.token)
        assert other.status == 404  # the services are not on this port
        assert (await http("GET", f"{metrics_url}/metrics")).status == 401
        assert (await http("GET", f"{metrics_url}/metrics", token="nope")).status == 401
    # closed with the server
    with pytest.raises(OSError):
        await http("GET", f"{metrics_url}/health")


async def test_an_idle_connection_to_the_metrics_port_is_closed(tmp_path: pathlib.Path) -> None:
    """hypercorn's own server runs the metrics port, and its keep-alive
    timer dies with the request's task (see ``KeptAliveServer``): without a
    read timeout an idle connection stayed open for good."""
    metrics_sock = listen_socket("127.0.0.1", 0)
    port = metrics_sock.getsockname()[1]
    settings = ServerSettings(metrics_idle_s=0.5)
    async with daemon(tmp_path / "agor", settings, metrics_sock=metrics_sock):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            with trio.fail_after(10):
                received = b""
                while chunk := await stream.receive_some(65536):
                    received += chunk  # the answer, then the close once idle
            assert received.startswith(b"HTTP/1.1 200")
