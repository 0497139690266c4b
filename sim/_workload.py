"""Workloads from the design document, as client behaviour.

* ``windows``: users with several windows open on a board: status and field
  edits, tasks, board edits, navigation between session rooms, and stepping
  away from the board's presence and back (every window announces the board
  it looks at after each welcome, as a real client does);
* ``agents``: an agent per session streams message chunks at about ten per
  second (tasks started and completed around each message); in some seeds
  in bursts, with several chunks unanswered at once, so that consecutive
  chunks are merged into one event;
* ``renames``: several clients rename one session at the same virtual
  instant, each stamping the write with its own (skewed) clock;
* ``cursors``: cursor storms: bursts of presence updates at up to 120 per
  second on the board a window looks at (beyond the protocol's presence rate
  they are dropped, which presence allows: the next one replaces them).

Every write carries a unique ``temp_id`` (the write id) and streamed chunks
carry unique tokens, so that the invariants can find each acknowledged write
in the store.
"""

from __future__ import annotations

import contextlib
from typing import Any

import attrs
import trio

from agor_actors.client import CallError, Client, ConnectionLost, MessageWriter, StreamBroken

from ._client import NotConnected, SimClient
from ._config import SimConfig
from ._det import sleep, sleep_until
from ._trace import Trace

__all__ = ["Layout", "open_turn", "run_workloads"]

RETRY_S = 0.2


@attrs.frozen
class Layout:
    """What the setup created: boards, and the sessions on each board."""

    boards: tuple[str, ...]
    sessions: tuple[tuple[str, ...], ...]
    """Per board, its sessions."""

    def board_of(self, index: int) -> int:
        return index % len(self.boards)


def _us(seconds: float) -> float:
    """Seconds rounded to whole microseconds (virtual times stay integral)."""
    return round(seconds * 1_000_000) / 1_000_000


async def _sleep_exp(client: SimClient, mean_s: float) -> None:
    await sleep(_us(client.rng.expovariate(1.0) * mean_s))


async def windows(client: SimClient, config: SimConfig, layout: Layout) -> None:
    board = layout.board_of(client.spec.user)
    sessions = layout.sessions[board]
    mean_s = 60.0 / config.edit_per_min
    tasks: list[tuple[str, str, int]] = []  # (session, task id, step)
    n = 0
    while True:
        await _sleep_exp(client, mean_s)
        if not client.is_open:
            continue
        n += 1
        roll = client.rng.random()
        sid = sessions[client.rng.randrange(len(sessions))]
        try:
            if roll < 0.25:
                status = ("idle", "running", "awaiting_permission", "completed")[
                    client.rng.randrange(4)
                ]
                await client.write(
                    "sessions", "set_status", session_id=sid, id=sid, data={"status": status}
                )
            elif roll < 0.4:
                if client.rng.random() < 0.5:
                    data: dict[str, object] = {"agent": f"agent-{client.name}-{n}"}
                else:
                    data = {"git_state": {"branch": f"b{n}", "dirty": n % 2 == 0}}
                await client.write("sessions", "patch", session_id=sid, id=sid, data=data)
            elif roll < 0.55:
                record = await client.write(
                    "tasks",
                    "create",
                    session_id=sid,
                    data={"session_id": sid, "prompt": f"{client.name} task {n}"},
                )
                if record.outcome == "ok" and isinstance(record.result, dict):
                    tasks.append((sid, record.result["id"], 0))
            elif roll < 0.7 and tasks:
                sid, tid, step = tasks.pop(0)
                method = ("start", "complete")[step]
                data = {"result": {"n": n}} if method == "complete" else {}
                record = await client.write("tasks", method, session_id=sid, id=tid, data=data)
                if method == "start" and record.outcome == "ok":
                    tasks.append((sid, tid, 1))
            elif roll < 0.74:
                # step away from the board's presence, or come back to it
                client.announce(None if client.presence_board else layout.boards[board])
            elif roll < 0.8:
                bid = layout.boards[board]
                await client.write(
                    "boards",
                    "patch",
                    session_id=None,
                    id=bid,
                    data={"description": f"{client.name} {n}"},
                )
            elif roll < 0.84:
                await _lock(client, sid)
            elif roll < 0.87:
                # open the board's activity stream, or close it
                room = f"activity:{layout.boards[board]}"
                if room in client.wanted:
                    client.unwant(room)
                else:
                    client.want(room)
            else:
                # navigate: leave one session room, open another
                rooms = [f"session:{s}" for s in sessions]
                joined = [r for r in rooms if r in client.wanted]
                if len(joined) > 1 and client.rng.random() < 0.5:
                    client.unwant(joined[client.rng.randrange(len(joined))])
                else:
                    client.want(rooms[client.rng.randrange(len(rooms))])
        except NotConnected:
            await sleep(RETRY_S)


async def _lock(client: SimClient, sid: str) -> None:
    """Lock or unlock a session: a strict field, written with the revision
    the window read (half the time one behind: a conflict receipt)."""
    got = await client.call("sessions", "get", id=sid)
    if not got.ok or not isinstance(got.data, dict):
        return
    rev = int(got.data["rev"])
    if client.rng.random() < 0.5:
        rev -= 1
    locked = client.user_id if client.rng.random() < 0.5 else None
    await client.write(
        "sessions", "patch", session_id=sid, id=sid, data={"locked_by": locked}, base_rev=rev
    )


async def open_turn(client: SimClient, sid: str) -> tuple[str, str] | None:
    """An agent's turn begins: a task created and started, and a streaming
    message for it; their ids (None if the task or the message failed)."""
    task = await client.write(
        "tasks", "create", session_id=sid, data={"session_id": sid, "prompt": "go"}
    )
    if task.outcome != "ok" or not isinstance(task.result, dict):
        return None
    tid = task.result["id"]
    await client.write("tasks", "start", session_id=sid, id=tid, data={})
    message = await client.write(
        "messages",
        "create",
        session_id=sid,
        data={"session_id": sid, "task_id": tid, "role": "assistant", "streaming": True},
    )
    if message.outcome != "ok" or not isinstance(message.result, dict):
        return None
    return tid, message.result["id"]


async def agent(client: SimClient, config: SimConfig, layout: Layout, index: int) -> None:
    flat = [s for board in layout.sessions for s in board]
    sid = flat[index % len(flat)]
    period_s = 1.0 / config.chunk_per_s
    message_no = 0
    while True:
        await _sleep_exp(client, 1.0)
        try:
            opened = await open_turn(client, sid)
            if opened is None:
                continue
            tid, mid = opened
            message_no += 1
            chunks = [f"{client.name}.{message_no}.{k};" for k in range(client.rng.randint(5, 40))]
            k = len(chunks) - 1
            if config.chunk_pipeline > 1:
                await _stream_pipelined(client, sid, mid, chunks, period_s, config.chunk_pipeline)
            elif config.chunk_at:
                await _stream_exactly(client, sid, mid, chunks, period_s)
            else:
                for chunk in chunks:
                    await sleep(_us(period_s * (0.5 + client.rng.random())))
                    await client.write(
                        "messages", "stream", session_id=sid, id=mid, data={"chunk": chunk}
                    )
            await client.write("messages", "finish", session_id=sid, id=mid, data={})
            await client.write(
                "tasks", "complete", session_id=sid, id=tid, data={"result": {"chunks": k}}
            )
        except NotConnected:
            await sleep(RETRY_S)


class _RecordedWriter(MessageWriter):
    """The real client's :class:`MessageWriter`, each send recorded as a
    write (and sent only while connected: else it counts as a lost
    connection, which the writer waits out and sends again)."""

    def __init__(self, sim: SimClient, client: Client, session_id: str, message_id: str) -> None:
        super().__init__(client, session_id, message_id)
        self._sim = sim

    async def _send(self, data: dict[str, Any]) -> None:
        try:
            record = await self._sim.write(
                "messages", "stream", session_id=self.session_id, id=self.message_id, data=data
            )
        except NotConnected:
            raise ConnectionLost("not connected") from None
        if record.outcome != "ok":
            code = record.error or "unknown"
            if code in ("connection_lost", "timeout"):
                raise ConnectionLost(code)
            raise CallError(code, "refused", record.error_data)


async def _stream_exactly(
    client: SimClient, sid: str, mid: str, chunks: list[str], period_s: float
) -> None:
    """Send ``chunks`` through a :class:`MessageWriter`: each lands once, in
    order, or the writer gives up (the message is then left as it is)."""
    if client.client is None:
        raise NotConnected(client.name)
    writer = _RecordedWriter(client, client.client, sid, mid)
    landed = 0
    try:
        for chunk in chunks:
            await sleep(_us(period_s * (0.5 + client.rng.random())))
            await writer.write(chunk)
            landed += 1
    except (StreamBroken, CallError):
        pass
    finally:
        client.stream_progress(mid, chunks, landed, resent=writer.resent)


async def _stream_pipelined(
    client: SimClient, sid: str, mid: str, chunks: list[str], period_s: float, depth: int
) -> None:
    """Send ``chunks`` in order with up to ``depth`` unanswered at once (an
    agent harness that does not wait for each chunk's answer).  Each write
    goes out (its frame queued) before the next one starts: a chunk task
    sets its ``sent`` event and calls ``write`` with no checkpoint between,
    and the next task waits for that event."""
    slots = trio.Semaphore(depth)

    async def one(chunk: str, before: trio.Event, sent: trio.Event) -> None:
        try:
            await before.wait()
            sent.set()
            with contextlib.suppress(NotConnected):
                await client.write(
                    "messages", "stream", session_id=sid, id=mid, data={"chunk": chunk}
                )
        finally:
            sent.set()
            slots.release()

    before = trio.Event()
    before.set()
    async with trio.open_nursery() as nursery:
        for chunk in chunks:
            await sleep(_us(period_s * (0.5 + client.rng.random())))
            await slots.acquire()
            sent = trio.Event()
            nursery.start_soon(one, chunk, before, sent, name=f"chunk:{client.name}")
            before = sent


async def renames(clients: list[SimClient], config: SimConfig, layout: Layout) -> None:
    """Every ``rename_period_ms`` all of ``clients`` rename one session at once."""
    sid = layout.sessions[0][0]
    period_s = config.rename_period_ms / 1000
    round_no = 0

    async def rename(client: SimClient, n: int) -> None:
        with contextlib.suppress(NotConnected):
            await client.write(
                "sessions",
                "patch",
                session_id=sid,
                id=sid,
                data={"title": f"{client.name}#{n}"},
                stamped=True,
            )

    async with trio.open_nursery() as nursery:
        while True:
            round_no += 1
            await sleep_until(round_no * period_s)
            for client in clients:
                nursery.start_soon(rename, client, round_no)


async def cursors(client: SimClient, config: SimConfig, layout: Layout) -> None:
    """Bursts of cursor moves on the board the client looks at (if any)."""
    period_s = _us(1.0 / config.cursor_per_s)
    while True:
        await _sleep_exp(client, 2.0)
        x, y = client.rng.randrange(2000), client.rng.randrange(2000)
        for _ in range(client.rng.randint(10, 120)):
            x += client.rng.randint(-20, 20)
            y += client.rng.randint(-20, 20)
            board = client.presence_board
            if board is not None:
                client.move_cursor(board, float(x), float(y))
            await sleep(period_s)


async def run_workloads(
    clients: list[SimClient], config: SimConfig, layout: Layout, trace: Trace
) -> None:
    """Run the configuration's workloads until cancelled."""
    windows_ = [c for c in clients if c.spec.role == "window"]
    agents = [c for c in clients if c.spec.role == "agent"]
    async with trio.open_nursery() as nursery:
        if "windows" in config.workloads:
            for client in windows_:
                nursery.start_soon(windows, client, config, layout, name=f"windows:{client.name}")
        if "agents" in config.workloads:
            for i, client in enumerate(agents):
                nursery.start_soon(agent, client, config, layout, i, name=f"agent:{client.name}")
        if "renames" in config.workloads and windows_:
            nursery.start_soon(renames, windows_[:4], config, layout, name="renames")
        if "cursors" in config.workloads:
            for client in windows_:
                nursery.start_soon(cursors, client, config, layout, name=f"cursors:{client.name}")
        trace.emit("workload", f"started {', '.join(config.workloads) or 'none'}")
