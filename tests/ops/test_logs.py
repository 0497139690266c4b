"""The daemon's logs: JSON lines or text with the extra fields, an access
line per HTTP request, supervisor restarts at WARNING."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import pathlib
from collections.abc import Iterator

import pytest
import trio
from ops_support import daemon
from trio.testing import MockClock

from agor_actors.server._logs import JsonFormatter, TextFormatter, configure_logging
from supervisors import Child, ChildSpec, Intensity, Strategy, Supervisor, SupervisorGaveUp


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def records(name: str) -> Iterator[Records]:
    """The records of logger ``name`` (INFO and above) while the block runs."""
    handler = Records()
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    saved = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)


@pytest.fixture
def access() -> Iterator[Records]:
    with records("agor_actors.access") as handler:
        yield handler


def test_json_lines_carry_ts_level_logger_msg_and_the_extra_fields() -> None:
    stream = io.StringIO()
    handler = configure_logging("DEBUG", "json", stream)
    try:
        logger = logging.getLogger("agor_actors.test")
        logger.info("opened %s", "conn-1", extra={"connection_id": "conn-1", "user_id": "u-1"})
        logger.debug("quiet")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed", extra={"room": "session:s-1"})
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["msg"] for line in lines] == ["opened conn-1", "quiet", "failed"]
    first = lines[0]
    assert first["level"] == "INFO" and first["logger"] == "agor_actors.test"
    assert first["connection_id"] == "conn-1" and first["user_id"] == "u-1"
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert lines[2]["room"] == "session:s-1" and "ValueError: boom" in lines[2]["exc"]


def test_the_level_filters_and_text_lines_show_extras_after_the_message() -> None:
    stream = io.StringIO()
    handler = configure_logging("WARNING", "text", stream)
    try:
        logger = logging.getLogger("agor_actors.test")
        logger.info("not shown")
        logger.warning("slow consumer", extra={"connection_id": "conn-2", "reason": "lagged a lot"})
    finally:
        logging.getLogger().removeHandler(handler)
    [line] = stream.getvalue().splitlines()
    assert line.endswith(
        "WARNING agor_actors.test: slow consumer connection_id=conn-2 reason='lagged a lot'"
    )
    with pytest.raises(ValueError, match="log format"):
        configure_logging("INFO", "xml", stream)  # type: ignore[arg-type]
    assert isinstance(JsonFormatter(), logging.Formatter)
    assert isinstance(TextFormatter(), logging.Formatter)


def test_a_text_line_stays_one_line_whatever_a_client_put_in_it() -> None:
    """A request's path (percent-decoded) or any value a client chose is
    logged with its control characters escaped: a newline in it forged a
    line of its own ("GET /x%0a<ts> WARNING agor_actors.security: ...")."""
    stream = io.StringIO()
    handler = configure_logging("INFO", "text", stream)
    forged = "2026-12-08T04:00:00.000Z WARNING agor_actors.security: forged"
    try:
        logger = logging.getLogger("agor_actors.access")
        logger.info("%s %s %s", "GET", f"/x\n{forged}\r\x1b[2J", 401)
        logger.info("joined", extra={"room": "a\nb", "client": "c\x1b]0;t\x07"})
    finally:
        logging.getLogger().removeHandler(handler)
    first, second = stream.getvalue().splitlines()
    assert first.endswith(f"INFO agor_actors.access: GET /x\\n{forged}\\r\\x1b[2J 401")
    assert second.endswith("joined room='a\\nb' client='c\\x1b]0;t\\x07'")


async def test_one_access_line_per_http_request_with_the_user(
    tmp_path: pathlib.Path, access: Records
) -> None:
    import urllib.error
    import urllib.request

    async with daemon(tmp_path / "agor") as d:

        def get(path: str, token: str | None) -> int:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            request = urllib.request.Request(d.http_url + path, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return int(response.status)
            except urllib.error.HTTPError as exc:
                return exc.code

        assert await trio.to_thread.run_sync(get, "/sessions?$limit=5", d.token) == 200
        assert await trio.to_thread.run_sync(get, "/health", None) == 200
        assert await trio.to_thread.run_sync(get, "/sessions", "wrong") == 401
    lines = [(r.__dict__["path"], r.__dict__) for r in access.records]
    assert [path for path, _ in lines] == ["/sessions", "/health", "/sessions"]
    (_, listed), (_, health), (_, refused) = lines
    assert listed["method"] == "GET" and listed["status"] == 200
    assert listed["user_id"] == "owner" and listed["duration_ms"] >= 0
    assert "user_id" not in health and health["status"] == 200
    assert refused["status"] == 401 and "user_id" not in refused
    assert access.records[0].getMessage() == "GET /sessions 200"


async def test_supervisor_restarts_are_warnings_with_the_child_and_the_reason(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    crashes = 0

    async def flaky(child: Child) -> None:
        nonlocal crashes
        child.started()
        await trio.sleep(1)
        crashes += 1
        raise RuntimeError(f"crash {crashes}")

    async def steady(child: Child) -> None:
        child.started()
        await child.stop_requested.wait()

    sup = Supervisor(
        "workers",
        [ChildSpec(id="steady", start=steady), ChildSpec(id="flaky", start=flaky)],
        strategy=Strategy.ONE_FOR_ALL,
        intensity=Intensity(max_restarts=2, period_s=60.0),
    )
    caplog.set_level(logging.INFO, logger="agor_actors.supervisors")
    with pytest.raises(SupervisorGaveUp):
        await sup.run()
    records = [r for r in caplog.records if r.name == "agor_actors.supervisors"]
    restarts = [r for r in records if r.levelno == logging.WARNING]
    assert [(r.__dict__["child_id"], r.__dict__["supervisor"]) for r in restarts] == [
        ("steady", "workers"),
        ("flaky", "workers"),
    ] * 2
    assert restarts[1].__dict__["reason"] == "crash: RuntimeError: crash 1"
    assert restarts[0].__dict__["reason"] == "one_for_all after flaky: crash: RuntimeError: crash 1"
    assert "restarts flaky (crash: RuntimeError: crash 1)" in restarts[1].getMessage()
    [gave_up] = [r for r in records if r.levelno == logging.ERROR]
    assert gave_up.__dict__["child_id"] == "flaky" and "gives up" in gave_up.getMessage()


async def test_a_failed_call_is_logged_with_its_connection_room_and_user(
    tmp_path: pathlib.Path,
) -> None:
    """The store fails a write (its table was dropped behind the daemon's
    back): the client is told ``unavailable`` (nothing of the store's
    detail) and the daemon's line names the connection, the user, the room
    and the call; formatted as JSON it carries them as fields."""
    import sqlite3

    from agor_actors.client import CallError, connect

    with records("agor_actors.server") as handler:
        async with (
            daemon(tmp_path / "agor") as d,
            connect(d.ws_url, token=d.token, codec="json") as client,
        ):
            session = await client.service("sessions").create({"title": "doomed"})
            with sqlite3.connect(tmp_path / "agor" / "agor.db") as db:
                db.execute("DROP TABLE messages")
            with pytest.raises(CallError) as failed:
                await client.service("messages").create(
                    {"session_id": session["id"], "content": "lost"}
                )
            connection_id = client.connection_id
    assert failed.value.code in ("unavailable", "invalid_data")
    assert "messages" not in failed.value.message  # no table name reaches the client
    # the client sent its keyed write again after each ``unavailable``
    # (write_retries): one line per attempt, each alike
    lines = [r for r in handler.records if r.getMessage().startswith("call failed")]
    assert len(lines) == 4
    line = lines[0]
    assert line.levelno == logging.WARNING
    fields = json.loads(JsonFormatter().format(line))
    assert fields["connection_id"] == connection_id
    assert fields["user_id"] == "owner"
    assert fields["room"] == f"session:{session['id']}"
    assert (fields["service"], fields["method"], fields["code"]) == (
        "messages",
        "create",
        failed.value.code,
    )
