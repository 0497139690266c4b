"""One run: a seed in, a verdict out.

The run is a pure function of (seed, profile, planted bugs, excluded kinds):
the configuration and the fault list are drawn from the seed before the run
starts, every component draws from its own named random stream, and trio
runs in deterministic mode on virtual time (``_det.py``).

Phases: the daemon starts and the owner sets up users, boards and sessions
(through the hub); the clients connect and join their rooms; the workloads
and the faults run for ``fault_s`` virtual seconds; then the faults stop
(partitions heal, stalled readers read, the daemon is up) and the quiet
phase waits until every client has converged, at most ``quiet_max_s``; then
the final invariants are checked.
"""

from __future__ import annotations

import hashlib
import logging
import shlex
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TextIO

import attrs
import trio

from agor_actors import marks
from agor_actors.daemon import Hub, Principal, ServiceError
from agor_actors.domain.presence import PresenceConfig
from agor_actors.server import ServerSettings
from agor_actors.store import SqlStore
from agor_actors.world import SeededEntropy
from supervisors import Intensity

from . import _planted
from ._access import GUESTS, AccessWatch, access
from ._broker import SimBroker
from ._checks import (
    Reset,
    Resets,
    ServerClaims,
    check_acknowledged,
    check_log,
    check_merged,
    check_mirrors,
    check_once,
    check_presence,
    check_renames,
    check_seqs,
    check_streams,
    presence_problems,
    room_log,
)
from ._client import SimClient
from ._config import (
    RESTART_PERIOD_S,
    ClientSpec,
    Fault,
    Narrowing,
    SimConfig,
    draw_config,
    draw_faults,
)
from ._daemon import SimDaemon
from ._db import open_run_store, release_run_store
from ._det import StepRecorder, new_clock, run_deterministic, sleep, sleep_until
from ._faults import CUT_OFF, REFUSABLE, StoreFaults, poison
from ._locks import StoreLocks
from ._model import View, log_room, server_view
from ._net import Network
from ._record import Recorder, Violation
from ._trace import Trace, now_us
from ._workload import Layout, run_workloads

__all__ = ["RunResult", "Script", "execute", "run_seed"]

OWNER = Principal("owner", "owner", True)
GUEST_LATENCY_US = (20_000, 5_000)
"""The access workload's guests' link: latency and jitter."""
MONITOR_PERIOD_S = 0.25
CONVERGE_POLL_S = 0.1
PRESENCE_LAG_S = 5.0
"""Facepiles settling later than this past the grace are counted as late."""


@attrs.frozen
class RunResult:
    seed: int
    profile: str
    planted: tuple[str, ...]
    exclude: tuple[str, ...]
    only: tuple[str, ...]
    config: str
    faults: tuple[str, ...]
    trace_hash: str
    rng_hash: str
    steps: int
    trace_lines: int
    virtual_s: float
    converged_s: float | None
    log_events: int
    applied: int
    frames: int
    writes: int
    acknowledged: int
    injected: dict[str, int]
    violations: tuple[Violation, ...]
    counters: dict[str, int]
    wall_s: float
    narrowing: tuple[str, ...] = ()
    """The command-line arguments of an explicit fault list, client subset
    or fault phase (a replay or a shrink), empty for the seed as drawn."""
    marks: dict[str, int] = attrs.field(factory=dict)
    """How often each coverage mark (``agor_actors.marks``) ran."""
    scenario: str = ""
    """The name of the scenario run (``--scenario``), empty for a seed."""

    @property
    def ok(self) -> bool:
        return not self.violations

    def replay_command(self) -> str:
        if self.scenario:
            plants = "".join(f" --plant {name}" for name in self.planted)
            return f"python -m sim --scenario {self.scenario}{plants} --trace"
        parts = ["python -m sim --seed", str(self.seed)]
        if self.profile != "ci":
            parts += ["--profile", self.profile]
        for name in self.planted:
            parts += ["--plant", name]
        for name in self.exclude:
            parts += ["--exclude", name]
        for name in self.only:
            parts += ["--only", name]
        parts += [shlex.quote(arg) for arg in self.narrowing]
        return " ".join([*parts, "--trace"])

    def to_json(self) -> dict[str, Any]:
        out = attrs.asdict(self, recurse=False)
        out["violations"] = [attrs.asdict(v) for v in self.violations]
        out["ok"] = self.ok
        out["replay"] = self.replay_command()
        return out


class _LogToTrace(logging.Handler):
    """The daemon's log records (warnings and errors) go into the trace."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__(logging.WARNING)
        self.recorder = recorder

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage().splitlines()[0][:200]
        error = ""
        if record.exc_info and record.exc_info[1] is not None:
            error = f" ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"[:200]
        self.recorder.count(f"log:{record.levelname.lower()}")
        self.recorder.trace.emit("log", f"{record.name} {record.levelname} {message}{error}")


@contextmanager
def _capture_logs(recorder: Recorder) -> Iterator[None]:
    logger = logging.getLogger("agor_actors")
    handler = _LogToTrace(recorder)
    saved = logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate, level = saved
        logger.setLevel(level)


class Script(Protocol):
    """A hand-written run (a scenario, ``sim/_scenario.py``) instead of the
    drawn workloads: which rooms each client is in, and the steps."""

    def rooms(self, client: str, layout: Layout) -> tuple[tuple[str, ...], str | None]:
        """The rooms ``client`` is in from the start, and the board it
        looks at (presence), if any."""
        ...

    async def run(self, clients: list[SimClient], layout: Layout, trace: Trace) -> None:
        """Run the steps (cancelled when the fault phase ends)."""
        ...


class _Run:
    def __init__(
        self,
        config: SimConfig,
        plan: tuple[Fault, ...],
        trace: Trace,
        script: Script | None = None,
    ) -> None:
        self.script = script
        self.config = config
        self.plan = plan
        self.trace = trace
        self.recorder = Recorder(trace)
        self.seed = config.seed
        self.clients: list[SimClient] = []
        self.injected: dict[str, int] = {}
        self.converged_s: float | None = None
        self.virtual_s = 0.0
        self.log_events = 0
        self.frames = 0
        self._seen_crashes: set[tuple[str, str]] = set()
        self._daemon: SimDaemon | None = None
        """The one daemon, or node 0 of several (the owner's calls go to it)."""
        self._daemons: list[SimDaemon] = []
        self._broker: SimBroker | None = None
        self._reader: SqlStore | None = None
        """Several nodes: the simulator's own store object, for heads."""
        self._net: Network | None = None
        self._store_faults: StoreFaults | None = None
        self._root: trio.CancelScope | None = None
        self._layout: Layout | None = None
        self._heads_at: float | None = None
        """When every client first stood at every room's head (quiet phase)."""
        self.resets: Resets = {}
        self.guests: list[SimClient] = []
        self.access_watch = AccessWatch(self.recorder)

    # ------------------------------------------------------------------ main

    async def main(self) -> None:
        def no_epochs() -> str:
            raise AssertionError("the simulator's own store object never writes")

        store = open_run_store(no_epochs)
        try:
            await self._main(store)
        finally:
            if self._store_faults is not None:
                self._store_faults.detach()
            release_run_store(store)

    async def _main(self, store: SqlStore) -> None:
        config = self.config
        trace = self.trace
        self._store_faults = StoreFaults(store, trace, seed=self.seed)
        self._net = net = Network(
            self.seed,
            trace,
            bytes_max=config.link_bytes_max,
            dup_per_mille=config.dup_per_mille,
            latency_us={
                **{c.name: (c.latency_us, c.jitter_us) for c in config.clients},
                **{g: GUEST_LATENCY_US for g in GUESTS},
            },
        )
        settings = ServerSettings(
            heartbeat_ms=config.heartbeat_ms,
            dead_after_s=config.dead_after_s,
            outbox_messages_max=config.outbox_messages_max,
            outbox_bytes_max=config.outbox_bytes_max,
            outbox_control_max=config.outbox_control_max,
        )
        owner_token = SeededEntropy(f"{self.seed}/owner").token()
        nodes: list[int | None] = [None]
        locks: StoreLocks | None = None
        if config.nodes > 1:
            nodes = list(range(config.nodes))
            net.nodes = config.nodes
            self._reader = store
            self._broker = SimBroker(
                self.seed,
                trace,
                latency_us=config.broker_latency_us,
                max_message_bytes=config.broker_message_max,
            )
            locks = StoreLocks(
                hold_us=config.store_txn_us,
                detect_us=config.store_detect_us,
                recorder=self.recorder,
                trace=trace,
            )
        for node in nodes:
            daemon = SimDaemon(
                seed=self.seed,
                engine=store.engine,
                store_faults=self._store_faults,
                net=net,
                settings=settings,
                store_latency_us=config.store_latency_us,
                store_cut_wait_us=config.store_cut_wait_us,
                owner_token=owner_token,
                trace=trace,
                recorder=self.recorder,
                limits={
                    "ring_size": config.ring_size,
                    "idle_s": config.idle_s,
                    "presence": PresenceConfig(
                        offline_grace_s=config.grace_s,
                        node_heartbeat_s=config.node_heartbeat_s,
                        node_liveness_s=config.node_liveness_s,
                    ),
                    "commit_linger_s": config.commit_linger_s,
                    "restart_intensity": (
                        None
                        if config.restarts_max is None
                        else Intensity(config.restarts_max, RESTART_PERIOD_S)
                    ),
                },
                node=node,
                broker=self._broker,
                locks=locks,
            )
            self._daemons.append(daemon)
        self._daemon = daemon = self._daemons[0]
        self.recorder.on_frame = ServerClaims(self.recorder, self._head_of).frame
        async with trio.open_nursery() as root:
            self._root = root.cancel_scope
            for node, each in zip(nodes, self._daemons, strict=True):
                await root.start(each.run, name="daemon" if node is None else f"node{node}")
            hub = await daemon.wait_up()
            for each in self._daemons[1:]:  # a cluster is up before its clients come
                await each.wait_up()
            layout, users = await self._setup(hub)
            self._layout = layout
            for spec in config.clients:
                token, user_id = users[spec.user]
                client = SimClient(
                    spec,
                    seed=self.seed,
                    token=token,
                    user_id=user_id,
                    net=net,
                    trace=trace,
                    recorder=self.recorder,
                )
                if self.script is None:
                    self._assign_rooms(client, layout)
                else:
                    rooms, client.presence_board = self.script.rooms(spec.name, layout)
                    for room in rooms:
                        client.want(room)
                self.clients.append(client)
                await root.start(client.run, name=f"client:{spec.name}")
            root.start_soon(self._monitor, name="monitor")
            async with trio.open_nursery() as phase:
                if self.script is None:
                    phase.start_soon(
                        run_workloads, self.clients, config, layout, trace, name="work"
                    )
                    if "access" in config.workloads:
                        phase.start_soon(self._access, root, name="access")
                else:
                    phase.start_soon(self.script.run, self.clients, layout, trace, name="script")
                phase.start_soon(self._inject, name="faults")
                await sleep_until(config.fault_s)
                phase.cancel_scope.cancel()
            trace.emit("phase", "quiet: faults stopped")
            net.heal_all()
            net.unstall_all()
            self._store_faults.disarm()
            if self._broker is not None:
                self._broker.heal_all()
            for each in self._daemons:
                each.heal_store()
            views = await self._converge(store)
            self._final_checks(store, views)
            self.virtual_s = trio.current_time()
            self.frames = net.frames
            for each in self._daemons:
                each.ending = True
            root.cancel_scope.cancel()

    async def _setup(self, hub: Hub) -> tuple[Layout, list[tuple[str, str]]]:
        config = self.config
        users: list[tuple[str, str]] = []
        for index in range(config.users + 1):
            name = f"user{index}" if index < config.users else "agents"
            made = await hub.call(
                OWNER, connection_id=None, service="users", method="create", data={"name": name}
            )
            users.append((made["token"], made["id"]))
        boards: list[str] = []
        sessions: list[tuple[str, ...]] = []
        for b in range(config.boards):
            board = await hub.call(
                OWNER,
                connection_id=None,
                service="boards",
                method="create",
                data={"name": f"board {b}"},
            )
            boards.append(board["id"])
            for _token, user_id in users:  # every user writes on every board
                await _add_member(hub, board["id"], user_id)
            on_board: list[str] = []
            for k in range(config.sessions_per_board):
                session = await hub.call(
                    OWNER,
                    connection_id=None,
                    service="sessions",
                    method="create",
                    data={"title": f"session {b}.{k}", "board_id": board["id"]},
                )
                on_board.append(session["id"])
            sessions.append(tuple(on_board))
        layout = Layout(tuple(boards), tuple(sessions))
        self.trace.emit("setup", f"{len(users)} users, {len(boards)} boards")
        return layout, users

    async def _access(self, root: trio.Nursery) -> None:
        """The ``access`` workload (``sim/_access.py``), its guests started
        in ``root`` so that they live on through the quiet phase."""
        assert self._daemon is not None and self._net is not None
        daemon, net = self._daemon, self._net

        async def make_guest(name: str, token: str, user_id: str) -> SimClient:
            spec = ClientSpec(name, 0, "window", False, 0, *GUEST_LATENCY_US)
            guest = SimClient(
                spec,
                seed=self.seed,
                token=token,
                user_id=user_id,
                net=net,
                trace=self.trace,
                recorder=self.recorder,
            )
            guest.on_frame = self.access_watch.frame
            self.guests.append(guest)
            await root.start(guest.run, name=f"guest:{name}")
            return guest

        await access(
            wait_up=daemon.wait_up,
            make_guest=make_guest,
            watch=self.access_watch,
            head_of=self._head_of,
            fault_s=self.config.fault_s,
            rng_seed=self.seed,
            trace=self.trace,
            recorder=self.recorder,
        )

    def _assign_rooms(self, client: SimClient, layout: Layout) -> None:
        if client.spec.role == "agent":
            index = int(client.name[1:])
            flat = [s for board in layout.sessions for s in board]
            client.want(f"session:{flat[index % len(flat)]}")
            return
        board = layout.board_of(client.spec.user)
        client.want(f"board:{layout.boards[board]}")
        client.presence_board = layout.boards[board]
        sessions = layout.sessions[board]
        for _ in range(client.rng.randint(1, 2)):
            client.want(f"session:{sessions[client.rng.randrange(len(sessions))]}")

    def _head_of(self, room: str) -> tuple[str, int] | None:
        """The committed head of ``room`` as the daemon's store remembers it
        (no I/O; None when it does not know or the daemon is down)."""
        hub = self._daemon.hub if self._daemon is not None else None
        if hub is None:
            return None
        if self._reader is not None:  # several nodes: the database's head
            return self._reader.room_head(log_room(room))
        return hub.store.cached_head(log_room(room))

    # ------------------------------------------------------------------ faults

    async def _inject(self) -> None:
        for fault in self.plan:
            await sleep_until(fault.at_us / 1_000_000)
            if self._apply(fault):
                self.injected[fault.kind] = self.injected.get(fault.kind, 0) + 1

    def _reset_epoch(self, fault: Fault) -> bool:
        """Kill the daemon and, while it is down, reset one room's log (what
        an operator restoring the database from before the room existed
        does): the room starts a new epoch at seq 1.  The ended epoch's log
        is kept for the checks."""
        assert self._daemon is not None and self._layout is not None
        rooms = [f"board:{b}" for b in self._layout.boards]
        rooms += [f"session:{s}" for board in self._layout.sessions for s in board]
        room = rooms[fault.target % len(rooms)]
        if not self._daemon.crash(fault.duration_us):
            return False
        assert self._store_faults is not None
        with self._store_faults.suspended():  # the reset is not the daemon's to fail
            store = self._daemon.new_store()  # a store object of its own (no stale cache)
            head = store.room_head(room)
            epoch = f"reset{len(self.resets.get(room, ())) + 1}-{fault.at_us}"
            if head is not None:
                reset = Reset(now_us(), room, head[0], room_log(store, room))
                self.resets.setdefault(room, []).append(reset)
            store.reset_room(room, epoch)
        self.trace.emit("fault", f"{room}: log reset, epoch {epoch}")
        return True

    def _pick_clients(self, fault: Fault) -> list[SimClient]:
        n = len(self.clients)
        if n == 0:
            return []
        span = min(fault.span, n)
        return [self.clients[(fault.target + i) % n] for i in range(span)]

    def _apply(self, fault: Fault) -> bool:
        assert self._net is not None and self._daemon is not None
        assert self._store_faults is not None
        kind = fault.kind
        self.trace.emit("fault", fault.describe())
        if kind == "reset":
            return any(self._net.reset(c.name, "fault") for c in self._pick_clients(fault))
        if kind in ("partition", "one_way", "storm"):
            names = [c.name for c in self._pick_clients(fault)]
            self._net.partition(names, fault.direction, fault.duration_us)
            return bool(names)
        if kind == "stall":
            for client in self._pick_clients(fault):
                client.stall(now_us() + fault.duration_us)
            return True
        if kind in ("store_before", "store_after"):
            self._store_faults.arm("before" if kind == "store_before" else "after")
            return True
        if kind in ("store_request", "store_chunk"):
            table = (
                "messages" if kind == "store_chunk" else REFUSABLE[fault.target % len(REFUSABLE)]
            )
            self._store_faults.arm_refusals(table, fault.at_us + fault.duration_us)
            return True
        nodes = len(self._daemons)
        node = self._daemons[fault.target % nodes]
        if kind == "daemon_crash":
            return node.crash(fault.duration_us)
        if kind == "epoch_reset":
            return self._reset_epoch(fault)
        if kind == "broker_cut":
            if self._broker is None:
                return False
            self._broker.cut(fault.target % nodes, fault.duration_us)
            return True
        if kind == "store_cut":
            if self._broker is None:
                return False
            node.cut_store(fault.duration_us)
            return True
        hub = node.hub
        if hub is None:
            return False
        prefix = {"crash_session": "session:", "crash_room": "room:", "crash_writer": "store:"}[
            kind
        ]
        registry = hub.system.registry
        names = [n for n in registry.names() if n.startswith(prefix)]
        if not names:
            return False
        name = names[fault.target // nodes % len(names)]
        ref = registry.lookup(name)
        if ref is None or not poison(ref):
            return False
        self.trace.emit("fault", f"poisoned {name}")
        return True

    # ------------------------------------------------------------------ monitor

    async def _monitor(self) -> None:
        while True:
            await sleep(MONITOR_PERIOD_S)
            self._check_bounds()

    def _check_bounds(self) -> None:
        for daemon in self._daemons:
            self._check_daemon_bounds(daemon)
        self._check_links()

    def _check_daemon_bounds(self, daemon: SimDaemon) -> None:
        assert self._net is not None
        hub, state = daemon.hub, daemon.state
        if hub is not None:
            tree = hub.snapshot()
            for child in tree["children"]:
                if (
                    child["id"] == "registry"
                    and child["restarts"]
                    and self.config.restarts_max is None
                ):
                    self._violate_once(
                        "intensity", "registry", "the registry supervisor gave up and restarted"
                    )
                for actor in child.get("supervisor", {}).get("children", []):
                    self._check_actor(actor)
        if state is not None:
            settings = daemon.settings
            for connection in state.connections:
                stats = connection.outbox.statistics()
                if (
                    # one batch taken by an outbox holding no events may
                    # exceed the byte bound alone (see Outbox)
                    (stats.queued_bytes > settings.outbox_bytes_max and stats.queued_batches > 1)
                    or stats.queued_messages
                    > settings.outbox_messages_max + settings.outbox_control_max
                ):
                    self.recorder.violate(
                        "bound", str(connection.connection_id), f"outbox over its bound: {stats}"
                    )

    def _check_links(self) -> None:
        assert self._net is not None
        for conn in self._net.conns.values():
            for link in (conn.up, conn.down):
                if not link.within_bound():
                    self.recorder.violate(
                        "bound",
                        link.name,
                        f"link holds {link.queued_bytes} B, bound {link.bytes_max}",
                    )

    def _check_actor(self, actor: dict[str, Any]) -> None:
        name = str(actor.get("id"))
        depth, bound = actor.get("mailbox_depth"), actor.get("mailbox_bound")
        if isinstance(depth, int) and isinstance(bound, int) and depth > bound:
            self.recorder.violate("bound", name, f"mailbox {depth} over its bound {bound}")
        crash = actor.get("last_crash")
        if crash and "SimPoison" not in crash and CUT_OFF not in crash:
            self._violate_once("crash", name, f"crashed without an injected fault: {crash}")

    def _violate_once(self, kind: str, who: str, detail: str) -> None:
        key = (who, detail)
        if key not in self._seen_crashes:
            self._seen_crashes.add(key)
            self.recorder.violate(kind, who, detail)

    # ------------------------------------------------------------------ the end

    async def _converge(self, store: SqlStore) -> dict[str, View]:
        assert self._daemon is not None
        deadline = trio.current_time() + self.config.quiet_max_s
        while trio.current_time() < deadline:
            await sleep(CONVERGE_POLL_S)
            if not all(daemon.up for daemon in self._daemons):
                continue
            views = self._converged(store)
            if views is not None:
                self.converged_s = trio.current_time()
                self._presence_lag(self.converged_s)
                self.trace.emit("phase", "converged")
                return views
        self._not_converged(store)
        return {}

    def _converged(self, store: SqlStore) -> dict[str, View] | None:
        rooms: dict[str, tuple[str, int]] = {}
        for client in self.clients:
            if not client.is_open or client.converged_rooms() or client.pending_calls:
                return None
            for room in client.wanted:
                head = rooms.get(room)
                if head is None:
                    found = store.room_head(log_room(room))
                    head = rooms[room] = found if found is not None else ("", 0)
                track = client.machine.rooms[room]
                if track.seq != head[1] or (head[0] and track.epoch != head[0]):
                    return None
        if self._heads_at is None:
            self._heads_at = trio.current_time()
        if presence_problems(self.clients) or self.access_watch.still_live(self.guests):
            return None
        views: dict[str, View] = {}
        for client in self.clients:
            for room in client.wanted:
                if room not in views:
                    views[room] = server_view(store, room)
                mirror = client.mirrors.get(room)
                if mirror is None or mirror.view != views[room]:
                    return None
        return views

    def _presence_lag(self, converged_s: float) -> None:
        """Count a run whose facepiles settled long after everything else
        (a finding, not a violation: a room actor that restarts forgets its
        board's presence until the next status change, up to a minute)."""
        if self._heads_at is None:
            return
        lag_s = converged_s - self._heads_at
        if lag_s > presence_allowance_s(self.config):
            self.recorder.count("presence_late")
            self.trace.emit("presence", f"facepiles settled {lag_s:.1f}s after the rooms")

    def _not_converged(self, store: SqlStore) -> None:
        """The quiet phase ended without convergence: say why (the mirror and
        presence checks that follow report their own differences)."""
        before = len(self.recorder.violations)
        for daemon in self._daemons:
            if not daemon.up:
                who = "daemon" if daemon.node is None else f"node {daemon.node}"
                self.recorder.violate("liveness", who, f"the {who} is not up at the end")
        for client in self.clients:
            if not client.is_open:
                self.recorder.violate(
                    "liveness", client.name, "not connected at the end of the quiet phase"
                )
                continue
            if client.pending_calls:
                self.recorder.violate("liveness", client.name, "calls still unanswered")
            problems = client.converged_rooms()
            for room, why in problems.items():
                self.recorder.violate("liveness", client.name, f"{room}: {why}")
            for room in client.wanted:
                if room in problems:
                    continue
                track = client.machine.rooms[room]
                head = store.room_head(log_room(room))
                if head is not None and track.seq != head[1]:
                    self.recorder.violate(
                        "liveness",
                        client.name,
                        f"{room}: stuck at seq {track.seq}, the room is at {head[1]}",
                    )
        if (
            len(self.recorder.violations) == before
            and not presence_problems(self.clients)
            and not self.access_watch.still_live(self.guests)  # the access check reports it
        ):
            views: dict[str, View] = {}
            for client in self.clients:
                for room in client.wanted:
                    views.setdefault(room, server_view(store, room))
                    mirror = client.mirrors.get(room)
                    if mirror is None or mirror.view != views[room]:
                        return  # the mirror check reports it
            self.recorder.violate(
                "liveness", "sim", f"no convergence within {self.config.quiet_max_s}s"
            )

    def _final_checks(self, store: SqlStore, views: dict[str, View]) -> None:
        logs: dict[str, Any] = {}
        check_mirrors(store, self.clients, self.recorder, views)
        check_log(store, self.recorder, logs, self.resets)
        check_acknowledged(store, self.recorder, logs, self.resets)
        check_merged(store, self.recorder, logs, self.resets)
        check_once(store, self.recorder)
        check_streams(store, self.recorder)
        check_renames(store, self.recorder)
        check_presence(self.clients, self.recorder)
        if len(self._daemons) > 1:
            check_seqs(store, self.recorder)
        self.access_watch.final(self.guests)
        rooms: set[str] = set()
        for client in self.clients:
            rooms.update(client.wanted)
        for room in sorted(rooms):
            head = store.room_head(room)
            self.log_events += 0 if head is None else head[1]
            view = views.get(room) or server_view(store, room)
            self.trace.fold(room, hashlib.blake2b(repr(view).encode(), digest_size=8).hexdigest())

    def on_spin(self, task: str) -> None:
        """A task looped without sleeping long enough to freeze the virtual
        clock (the clock was nudged)."""
        self.recorder.count(f"spin:{task}")
        self.trace.emit("spin", task)

    def on_livelock(self, task: str) -> None:
        self.recorder.violate(
            "livelock", task, "tasks keep running without virtual time passing (a busy loop)"
        )
        if self._root is not None:
            self._root.cancel()

    def rng_states(self) -> list[object]:
        return [(c.rng.getstate(), c.backoff_state()) for c in self.clients]


def run_seed(
    seed: int,
    *,
    profile: str = "ci",
    plant: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    only: tuple[str, ...] = (),
    echo: TextIO | None = None,
    narrow: Narrowing | None = None,
) -> RunResult:
    """Run one seed; never raises for what the run finds (an exception in
    the harness or the daemon becomes a violation of kind ``harness``)."""
    config = draw_config(seed, profile, exclude=exclude, only=only)
    if narrow is not None and not narrow.empty:
        config = narrow.apply(config)
        plan = narrow.plan(config)
    else:
        narrow = None
        plan = draw_faults(config)
    return execute(
        config,
        plan,
        plant=plant,
        exclude=exclude,
        only=only,
        echo=echo,
        narrowing=tuple(narrow.arguments()) if narrow is not None else (),
    )


def execute(
    config: SimConfig,
    plan: tuple[Fault, ...],
    *,
    plant: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    only: tuple[str, ...] = (),
    echo: TextIO | None = None,
    narrowing: tuple[str, ...] = (),
    script: Script | None = None,
    scenario: str = "",
) -> RunResult:
    """Run ``config`` with the faults ``plan`` (and ``script`` instead of
    the drawn workloads, if given): the one run behind :func:`run_seed`
    and :func:`sim.run_scenario`."""
    started = time.perf_counter()
    seed, profile = config.seed, config.profile
    _planted.plant(*plant)
    trace = Trace(echo)
    if echo is not None:
        print(config.describe(), file=echo)
        if plant:
            print(f"  planted bugs: {', '.join(plant)}", file=echo)
        print(f"  {len(plan)} faults:", file=echo)
        for fault in plan:
            print(f"    {fault.describe()}", file=echo)
    run = _Run(config, plan, trace, script)
    clock = new_clock()
    steps = StepRecorder(clock, on_spin=run.on_spin, on_livelock=run.on_livelock)
    counted: dict[str, int] = {}
    try:
        with _capture_logs(run.recorder), marks.counting() as counted:
            run_deterministic(run.main, seed=seed, instruments=(steps,), clock=clock)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        text = "".join(traceback.format_exception(exc)).strip().splitlines()
        run.recorder.violate("harness", "sim", " | ".join(text[-6:]))
    finally:
        _planted.plant()
    import trio._core._run as trio_run

    trace.fold("steps", f"{steps.steps}:{steps.checksum}")
    rng = hashlib.blake2b(digest_size=16)
    rng.update(repr(trio_run._r.getstate()).encode())
    rng.update(repr(run.rng_states()).encode())
    recorder = run.recorder
    writes = list(recorder.writes.values())
    return RunResult(
        seed=seed,
        profile=profile,
        planted=tuple(plant),
        exclude=tuple(exclude),
        only=tuple(only),
        config=config.describe(),
        faults=tuple(f.describe() for f in plan),
        trace_hash=trace.digest(),
        rng_hash=rng.hexdigest(),
        steps=steps.steps,
        trace_lines=trace.lines,
        virtual_s=run.virtual_s,
        converged_s=run.converged_s,
        log_events=run.log_events,
        applied=sum(len(v) for v in recorder.applied.values()),
        frames=run.frames,
        writes=len(writes),
        acknowledged=sum(1 for w in writes if w.outcome == "ok"),
        injected=dict(sorted(run.injected.items())),
        violations=tuple(recorder.violations),
        counters=dict(sorted(recorder.counters.items())),
        wall_s=time.perf_counter() - started,
        narrowing=narrowing,
        scenario=scenario,
        marks=dict(sorted(counted.items())),
    )


async def _add_member(hub: Hub, board_id: str, user_id: str) -> None:
    """``user_id`` an editor of the board (which a planted early answer may
    not have made durable yet: then again, a little later)."""
    for _attempt in range(100):
        try:
            await hub.call(
                OWNER,
                connection_id=None,
                service="boards",
                method="add_member",
                id=board_id,
                data={"user_id": user_id, "role": "editor"},
            )
            return
        except ServiceError as exc:
            if exc.code != "not_found":
                raise
            await sleep(0.01)
    raise RuntimeError(f"board {board_id} never became durable")


def presence_allowance_s(config: SimConfig) -> float:
    """How long after the rooms settle the facepiles may still be settling
    before a run counts ``presence_late``: the grace and :data:`PRESENCE_LAG_S`;
    on several nodes also the liveness and a heartbeat (a node that died or
    lost the broker keeps its users on the others' facepiles until it has
    gone unheard for the liveness, from its last heartbeat, by design)."""
    allowed_s = config.grace_s + PRESENCE_LAG_S
    if config.nodes > 1:
        allowed_s += config.node_liveness_s + config.node_heartbeat_s
    return allowed_s
