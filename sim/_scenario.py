"""Scenarios: a run written by hand instead of drawn from a seed.

A :class:`Scenario` names its clients (windows and agents, their rooms,
their network), the steps they take at given virtual times, and the faults
at given virtual times; :func:`run_scenario` runs it on the same simulated
daemon, network and clients as a seed, deterministically, and checks the
same invariants (mirrors, logs, acknowledged writes, streams, presence, the
server's claims).  Rooms are named by index into what the setup creates:
``board:0``, ``session:0`` (sessions numbered across boards),
``activity:0``.

    from sim import Scenario, at, run_scenario, window, agent, fault
    from sim import Rename, Stream

    two_windows = Scenario(
        "two-windows",
        clients=(
            window("w0", rooms=("board:0", "session:0")),
            window("w1", rooms=("session:0",)),
            agent("a0", rooms=("session:0",)),
        ),
        steps=(
            at(1.0, "a0", Stream(session=0, chunks=20)),
            at(1.5, "w0", Rename(session=0, title="first")),
        ),
        faults=(fault(2.0, "reset", client="w1"),),
    )
    result = run_scenario(two_windows)
    assert result.ok, result.violations

The examples from the seed are in :mod:`sim.scenarios`
(``python -m sim --scenario NAME --trace`` runs one).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Literal, Protocol, TextIO

import attrs
import trio

from ._client import NotConnected, SimClient
from ._config import FAULT_KINDS, ClientSpec, Fault, SimConfig
from ._det import sleep, sleep_until
from ._runner import RunResult, execute
from ._trace import Trace
from ._workload import Layout, open_turn

__all__ = [
    "Action",
    "CreateTask",
    "Join",
    "Leave",
    "Look",
    "Patch",
    "Rename",
    "Scenario",
    "ScenarioClient",
    "ScenarioFault",
    "SetStatus",
    "Step",
    "Stream",
    "agent",
    "at",
    "fault",
    "run_scenario",
    "window",
]


def _session(layout: Layout, index: int) -> str:
    flat = [s for board in layout.sessions for s in board]
    if not 0 <= index < len(flat):
        raise ValueError(f"no session {index}: the scenario has {len(flat)}")
    return flat[index]


def _room(layout: Layout, ref: str) -> str:
    """``board:0``, ``session:1``, ``activity:0`` -> the room's name."""
    kind, _, index = ref.partition(":")
    if not index.isdigit() or kind not in ("board", "session", "activity"):
        raise ValueError(f"bad room {ref!r}: want board:N, session:N or activity:N")
    n = int(index)
    if kind == "session":
        return f"session:{_session(layout, n)}"
    if not 0 <= n < len(layout.boards):
        raise ValueError(f"no board {n}: the scenario has {len(layout.boards)}")
    return f"{kind}:{layout.boards[n]}"


# --------------------------------------------------------------------------- steps


class Action(Protocol):
    async def run(self, client: SimClient, layout: Layout) -> None: ...


@attrs.frozen
class Rename:
    """Rename a session (stamped with the client's own clock)."""

    session: int
    title: str

    async def run(self, client: SimClient, layout: Layout) -> None:
        sid = _session(layout, self.session)
        data = {"title": self.title}
        await client.write("sessions", "patch", session_id=sid, id=sid, data=data, stamped=True)


@attrs.frozen
class Patch:
    """Patch a session's fields (``base_rev``: its strict fields only at that
    revision; the others merge whatever the base, as over WebSocket)."""

    session: int
    data: dict[str, Any]
    base_rev: int | None = None

    async def run(self, client: SimClient, layout: Layout) -> None:
        sid = _session(layout, self.session)
        await client.write(
            "sessions", "patch", session_id=sid, id=sid, data=self.data, base_rev=self.base_rev
        )


@attrs.frozen
class SetStatus:
    session: int
    status: str

    async def run(self, client: SimClient, layout: Layout) -> None:
        sid = _session(layout, self.session)
        data = {"status": self.status}
        await client.write("sessions", "set_status", session_id=sid, id=sid, data=data)


@attrs.frozen
class CreateTask:
    session: int
    prompt: str

    async def run(self, client: SimClient, layout: Layout) -> None:
        sid = _session(layout, self.session)
        data = {"session_id": sid, "prompt": self.prompt}
        await client.write("tasks", "create", session_id=sid, data=data)


@attrs.frozen
class Stream:
    """An agent's turn: a task started, a message streamed in ``chunks``
    chunks at ``per_s`` a second (each answered before the next), then
    finished, and the task completed.  A chunk that cannot be sent (the
    connection is down) is skipped, as an agent harness would."""

    session: int
    chunks: int
    per_s: float = 10.0

    async def run(self, client: SimClient, layout: Layout) -> None:
        sid = _session(layout, self.session)
        opened = await open_turn(client, sid)
        if opened is None:
            return
        tid, mid = opened
        for k in range(self.chunks):
            await sleep(round(1_000_000 / self.per_s) / 1_000_000)
            with contextlib.suppress(NotConnected):
                chunk = {"chunk": f"{client.name}.{mid[-6:]}.{k};"}
                await client.write("messages", "stream", session_id=sid, id=mid, data=chunk)
        await _until_sent(client, "messages", "finish", sid, mid, {})
        await _until_sent(
            client, "tasks", "complete", sid, tid, {"result": {"chunks": self.chunks}}
        )


async def _until_sent(
    client: SimClient, service: str, method: str, sid: str, ident: str, data: Any
) -> None:
    while True:
        try:
            await client.write(service, method, session_id=sid, id=ident, data=data)
            return
        except NotConnected:
            await sleep(0.2)


@attrs.frozen
class Join:
    room: str

    async def run(self, client: SimClient, layout: Layout) -> None:
        client.want(_room(layout, self.room))


@attrs.frozen
class Leave:
    room: str

    async def run(self, client: SimClient, layout: Layout) -> None:
        client.unwant(_room(layout, self.room))


@attrs.frozen
class Look:
    """Look at a board (presence), or at none."""

    board: int | None

    async def run(self, client: SimClient, layout: Layout) -> None:
        client.announce(None if self.board is None else layout.boards[self.board])


@attrs.frozen
class Step:
    at_us: int
    client: str
    action: Action


def at(seconds: float, client: str, action: Action) -> Step:
    """``action`` by ``client`` at ``seconds`` of virtual time."""
    return Step(round(seconds * 1_000_000), client, action)


# --------------------------------------------------------------------------- clients, faults


@attrs.frozen
class ScenarioClient:
    name: str
    role: Literal["window", "agent"] = "window"
    user: int = 0
    """The user (0..users-1) of a window; agents are the agents' user."""
    rooms: tuple[str, ...] = ()
    looks_at: int | None = None
    """The board (index) the window looks at for presence."""
    latency_ms: float = 2.0
    jitter_ms: float = 0.0
    skew_ms: int = 0
    cbor: bool = False


def window(name: str, *, rooms: Sequence[str] = (), **kw: Any) -> ScenarioClient:
    """A browser window; it looks at the first board among its rooms."""
    if "looks_at" not in kw:
        boards = [int(r.split(":")[1]) for r in rooms if r.startswith("board:")]
        kw["looks_at"] = boards[0] if boards else None
    return ScenarioClient(name, "window", rooms=tuple(rooms), **kw)


def agent(name: str, *, rooms: Sequence[str] = (), **kw: Any) -> ScenarioClient:
    """An agent's connection (the agents' user)."""
    return ScenarioClient(name, "agent", rooms=tuple(rooms), **kw)


@attrs.frozen
class ScenarioFault:
    at_us: int
    kind: str
    client: str | None = None
    duration_us: int = 0
    direction: Literal["both", "up", "down"] = "both"
    target: int = 0
    """For crashes, the actor among those running (modulo); for
    ``store_request``, the table; for ``epoch_reset``, the room."""


def fault(
    seconds: float,
    kind: str,
    *,
    client: str | None = None,
    for_s: float = 0.0,
    direction: Literal["both", "up", "down"] = "both",
    target: int = 0,
) -> ScenarioFault:
    """A fault at ``seconds`` of virtual time: ``reset``, ``partition``,
    ``one_way`` (``direction``), ``stall`` of one ``client`` (every client
    for ``storm``), ``daemon_crash`` (down ``for_s``), ``crash_session``,
    ``crash_room``, ``crash_writer``, ``store_before``, ``store_after``,
    ``store_request`` (for ``for_s``), ``epoch_reset``."""
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
    return ScenarioFault(
        round(seconds * 1_000_000), kind, client, round(for_s * 1_000_000), direction, target
    )


# --------------------------------------------------------------------------- the scenario


@attrs.frozen
class Scenario:
    name: str
    clients: tuple[ScenarioClient, ...]
    steps: tuple[Step, ...] = ()
    faults: tuple[ScenarioFault, ...] = ()
    users: int = 1
    boards: int = 1
    sessions_per_board: int = 1
    duration_s: int = 10
    """The steps and faults phase; the quiet phase (convergence, then the
    checks) follows."""
    seed: int = 0
    """The scheduler's and the network's random streams."""
    heartbeat_ms: int = 1_000
    store_latency_us: int = 500
    ring_size: int | None = None
    idle_s: float | None = None
    grace_s: float = 2.0

    def config(self) -> SimConfig:
        names = [c.name for c in self.clients]
        if len(set(names)) != len(names):
            raise ValueError(f"scenario {self.name}: client names repeat: {names}")
        for step in self.steps:
            if step.client not in names:
                raise ValueError(f"scenario {self.name}: a step for unknown client {step.client}")
        specs = tuple(
            ClientSpec(
                name=c.name,
                user=self.users if c.role == "agent" else c.user,
                role=c.role,
                cbor=c.cbor,
                skew_ms=c.skew_ms,
                latency_us=round(c.latency_ms * 1000),
                jitter_us=round(c.jitter_ms * 1000),
            )
            for c in self.clients
        )
        return SimConfig(
            seed=self.seed,
            profile=f"scenario {self.name}",
            users=self.users,
            clients=specs,
            boards=self.boards,
            sessions_per_board=self.sessions_per_board,
            workloads=(),
            faults=tuple(sorted({(f.kind, 0.0) for f in self.faults})),
            fault_s=self.duration_s,
            quiet_max_s=90,
            link_bytes_max=262_144,
            dup_per_mille=0,
            outbox_messages_max=2_000,
            outbox_bytes_max=4 * 1024 * 1024,
            outbox_control_max=1_024,
            heartbeat_ms=self.heartbeat_ms,
            dead_after_s=2.5 * self.heartbeat_ms / 1000,
            edit_per_min=0,
            chunk_per_s=0,
            rename_period_ms=0,
            cursor_per_s=0,
            max_skew_ms=max((abs(c.skew_ms) for c in self.clients), default=0),
            store_latency_us=self.store_latency_us,
            ring_size=self.ring_size,
            idle_s=self.idle_s,
            grace_s=self.grace_s,
        )

    def plan(self) -> tuple[Fault, ...]:
        """The faults as the runner takes them (a client by its index)."""
        index = {c.name: i for i, c in enumerate(self.clients)}
        out = []
        for f in self.faults:
            if f.client is not None and f.client not in index:
                raise ValueError(f"scenario {self.name}: a fault for unknown client {f.client}")
            target = index[f.client] if f.client is not None else f.target
            span = 1 << 16 if f.kind == "storm" else 1
            out.append(Fault(f.at_us, f.kind, target, span, f.duration_us, f.direction))
        return tuple(sorted(out, key=lambda f: (f.at_us, FAULT_KINDS.index(f.kind))))

    # the runner's Script

    def rooms(self, client: str, layout: Layout) -> tuple[tuple[str, ...], str | None]:
        spec = next(c for c in self.clients if c.name == client)
        board = None if spec.looks_at is None else layout.boards[spec.looks_at]
        return tuple(_room(layout, r) for r in spec.rooms), board

    async def run(self, clients: list[SimClient], layout: Layout, trace: Trace) -> None:
        by_name = {c.name: c for c in clients}

        async def one(step: Step) -> None:
            await sleep_until(step.at_us / 1_000_000)
            trace.emit("step", f"{step.client} {step.action!r}")
            client = by_name[step.client]
            while True:
                try:
                    await step.action.run(client, layout)
                    return
                except NotConnected:
                    await sleep(0.2)  # try again once connected

        async with trio.open_nursery() as nursery:
            for step in sorted(self.steps, key=lambda s: s.at_us):
                nursery.start_soon(one, step, name=f"step:{step.client}")


def run_scenario(
    scenario: Scenario, *, plant: tuple[str, ...] = (), echo: TextIO | None = None
) -> RunResult:
    """Run ``scenario`` (with the planted bugs ``plant``); the same
    invariants as a seed's run, the same :class:`RunResult`."""
    return execute(
        scenario.config(),
        scenario.plan(),
        plant=plant,
        echo=echo,
        script=scenario,
        scenario=scenario.name,
    )
