"""A seed expands into a configuration and a list of faults (swarm testing:
which fault kinds and workloads are on, and at what rates, changes from seed
to seed).  Both are plain data, printed before a run."""

from __future__ import annotations

import random
from typing import Final, Literal

import attrs

__all__ = [
    "CLUSTER_ONLY",
    "EXCLUDABLE",
    "FAULT_KINDS",
    "PROFILES",
    "WORKLOADS",
    "ClientSpec",
    "Fault",
    "Narrowing",
    "SimConfig",
    "Swarm",
    "draw_config",
    "draw_faults",
    "draw_swarm",
    "encode_faults",
    "parse_faults",
]

Role = Literal["window", "agent"]

RESTART_PERIOD_S: Final = 10.0
"""The period of a seed's small registry intensity (``restarts_max``)."""

FAULT_KINDS: Final = (
    "reset",  # one connection is cut; what was in flight is lost
    "partition",  # some clients lose the server both ways, then heal
    "one_way",  # some clients lose one direction only, then heal
    "storm",  # every client loses the server long enough to reconnect: a reconnect storm
    "stall",  # a client stops reading (its link fills; the server's writer blocks)
    "crash_session",  # a session actor's handler raises
    "crash_room",  # a room actor's handler raises
    "crash_writer",  # the store writer's handler raises
    "store_before",  # a commit fails before it happens
    "store_after",  # a commit fails after it happened (the writer is not told)
    "store_request",  # the database refuses a row: one request fails, or its group is redone
    "store_chunk",  # the same for the rows of streamed messages (a chunk refused on its own)
    "daemon_crash",  # the daemon dies (memory gone, store kept) and starts again
    "epoch_reset",  # the daemon dies and a room's log is reset meanwhile (a new epoch)
    "broker_cut",  # (cluster) a node loses the broker, then heals; what was published is lost
    "store_cut",  # (cluster) a node loses the store: its store calls fail, then heal
)

CLUSTER_ONLY: Final = ("broker_cut", "store_cut")
"""Fault kinds only a multi-node run has (drawn in the ``cluster`` profile only)."""
NOT_CLUSTER: Final = ("epoch_reset",)
"""Fault kinds a multi-node run does not draw (a room's log reset while
other nodes serve it is not something the product supports)."""

WORKLOADS: Final = (
    "windows",  # users with several windows: edits, tasks, navigation
    "agents",  # agents stream message chunks at about 10 per second
    "renames",  # clients rename one session at the same instant with their own clocks
    "cursors",  # cursor storms (presence updates at a high rate)
    "access",  # guests shared a session and a board, then revoked mid-stream
)

NODE_BEATS: Final = ((5.0, 15.0), (1.0, 3.0), (0.5, 1.5))
"""A cluster seed's node heartbeat and liveness (seconds): the daemon's
defaults, or shorter."""

PROFILES: Final = ("ci", "full", "cluster", "medium")
"""``ci``: small runs (1-11 clients, a 6-16 s fault phase), the CI sweep's;
``medium``: the size issue 15 sets for the sweep's speed (5-20 clients, a
30 s fault phase); ``full``: larger and longer (up to 30 clients, 30-120 s);
``cluster``: ``ci``'s sizes on several nodes sharing a store and a broker."""

EXCLUDABLE: Final = (*FAULT_KINDS, *WORKLOADS, "duplicate", "bursts")
"""What ``--exclude`` accepts: fault kinds, workloads, ``duplicate``
(network duplicates of event frames) and ``bursts`` (agents with several
chunks in flight at once)."""


@attrs.frozen
class ClientSpec:
    name: str
    user: int
    role: Role
    cbor: bool
    skew_ms: int
    latency_us: int
    jitter_us: int
    keyed: bool = True
    """Whether its writes go under idempotency keys (the client's
    ``idempotent_writes``): a write whose connection dropped is then sent
    again and must run once; without, it ends ``connection_lost``."""


@attrs.frozen
class Fault:
    """One fault at an absolute virtual time.  ``target`` picks among the
    candidates when the fault fires (clients, sessions, rooms), modulo
    their number; ``span`` is how many (clients) it hits."""

    at_us: int
    kind: str
    target: int = 0
    span: int = 1
    duration_us: int = 0
    direction: Literal["both", "up", "down"] = "both"

    def describe(self) -> str:
        extra = ""
        if self.duration_us:
            extra += f" for {self.duration_us / 1e6:.3f}s"
        if self.kind in ("partition", "one_way", "stall", "reset"):
            extra += f" target={self.target} span={self.span}"
        if self.kind == "one_way":
            extra += f" {self.direction}"
        if self.kind.startswith("crash") or self.kind in ("epoch_reset", *CLUSTER_ONLY):
            extra += f" target={self.target}"
        if self.kind in ("store_request", "store_chunk"):
            extra += f" target={self.target}"
        return f"{self.at_us / 1e6:9.3f}s {self.kind}{extra}"


@attrs.frozen
class SimConfig:
    seed: int
    profile: str
    users: int
    clients: tuple[ClientSpec, ...]
    boards: int
    sessions_per_board: int
    workloads: tuple[str, ...]
    faults: tuple[tuple[str, float], ...]
    """Enabled fault kinds and their rate per virtual minute."""
    fault_s: int
    """Length of the fault phase (virtual seconds); the quiet phase follows."""
    quiet_max_s: int
    """How long the quiet phase may take to converge."""
    link_bytes_max: int
    dup_per_mille: int
    """Per mille of server-to-client frames holding only events that arrive twice."""
    outbox_messages_max: int
    outbox_bytes_max: int
    outbox_control_max: int
    heartbeat_ms: int
    dead_after_s: float
    edit_per_min: int
    chunk_per_s: int
    rename_period_ms: int
    cursor_per_s: int
    max_skew_ms: int
    store_latency_us: int
    """Virtual time a store call takes (the worker-thread hops)."""
    swarm_density: float = 0.0
    """The chance each fault kind had to be on in this seed (see :class:`Swarm`)."""
    chunk_pipeline: int = 1
    """Chunks an agent has in flight at once (see :class:`Swarm`)."""
    chunk_at: bool = False
    """Agents with one chunk in flight stream through the client's
    :class:`~agor_actors.client.MessageWriter`: each chunk names its offset
    and is sent again after a lost answer, landing once."""
    ring_size: int | None = None
    """Events a room keeps in memory (None: the daemon's own, 1,024)."""
    idle_s: float | None = None
    """How long a room or session actor idles before it passivates (None:
    the daemon's own, minutes)."""
    grace_s: float = 10.0
    """Presence: how long a user who left a board stays on it."""
    restarts_max: int | None = None
    """The registry supervisor's intensity: restarts allowed per
    ``RESTART_PERIOD_S`` before it gives up and every actor starts over
    (None: the daemon's own, 50 in 5 s)."""
    commit_linger_s: float = 0.0
    """How long a busy store writer waits for more writes (``serve
    --commit-linger-ms``; 0: it commits each group at once)."""
    nodes: int = 1
    """Daemons sharing the store and a simulated broker (the ``cluster``
    profile: 2 or 3; 1: one daemon and no broker, as before)."""
    broker_latency_us: tuple[int, int] = (0, 0)
    """A hop between a node and the broker: latency and jitter (us)."""
    broker_message_max: int | None = None
    """The longest message the broker takes (None: Redis; 5,997 bytes:
    LISTEN/NOTIFY's; a small bound makes the publisher cut often and send
    events too long alone as "lost" markers)."""
    store_cut_wait_us: int = 0
    """How long a store call of a node cut from the store takes to fail: 0,
    at once (the server's port closed: refused); or a wait as for packets
    dropped on the way (the store's ``connect_timeout``, 5 s, or a pooled
    connection's ``tcp_user_timeout``, 15 s), during which the writer and
    the readers that asked wait too."""
    store_txn_us: int = 0
    """Several nodes: how long a commit's transaction holds its rows' locks
    before its COMMIT (a few store round trips; see ``sim/_locks.py``)."""
    store_detect_us: int = 0
    """Several nodes: how long the store takes to notice that a node died
    or was cut off mid-transaction, holding its locks meanwhile (the seed's
    ``store_cut_wait_us``, or ``STORE_DETECT_US`` when that is 0)."""
    node_heartbeat_s: float = 5.0
    """Several nodes: how often a board room repeats its own users to the
    other nodes (``serve --node-heartbeat``)."""
    node_liveness_s: float = 15.0
    """Several nodes: how long a node goes unheard before its users leave
    the others' facepiles, after the grace (``serve --node-liveness``)."""

    def fault_rate(self, kind: str) -> float:
        return dict(self.faults).get(kind, 0.0)

    def describe(self) -> str:
        roles = {"window": 0, "agent": 0}
        for c in self.clients:
            roles[c.role] += 1
        lines = [
            f"seed {self.seed} (profile {self.profile})",
            f"  users {self.users}, windows {roles['window']}, agents {roles['agent']}, "
            f"boards {self.boards} x {self.sessions_per_board} sessions",
            f"  workloads {', '.join(self.workloads) or 'none'}",
            f"  faults {', '.join(f'{k}@{r:.1f}/min' for k, r in self.faults) or 'none'}"
            f" (swarm density {self.swarm_density:.2f}); duplicates {self.dup_per_mille}/1000",
            f"  fault phase {self.fault_s}s, quiet phase up to {self.quiet_max_s}s",
            f"  outbox {self.outbox_messages_max} msgs / {self.outbox_bytes_max} B / "
            f"{self.outbox_control_max} control; links {self.link_bytes_max} B",
            f"  heartbeat {self.heartbeat_ms} ms, dead after {self.dead_after_s:.1f}s; "
            f"edits {self.edit_per_min}/min/window, chunks {self.chunk_per_s}/s "
            f"({self.chunk_pipeline} in flight{', offsets named' if self.chunk_at else ''}), "
            f"renames every {self.rename_period_ms} ms, cursors {self.cursor_per_s}/s, "
            f"skew up to {self.max_skew_ms} ms, store calls {self.store_latency_us} us",
            f"  limits: ring {self.ring_size or 'default'}, idle "
            f"{'default' if self.idle_s is None else f'{self.idle_s:g}s'}, "
            f"presence grace {self.grace_s:g}s, commit linger {self.commit_linger_s * 1000:g} ms, "
            f"registry restarts "
            f"{'default' if self.restarts_max is None else f'{self.restarts_max} per {RESTART_PERIOD_S:g}s'}",
        ]
        if self.nodes > 1:
            latency, jitter = self.broker_latency_us
            lines.append(
                f"  nodes {self.nodes} on one store and one broker "
                f"(latency {latency} us jitter {jitter} us, messages up to "
                f"{self.broker_message_max or 'any'} B); a store cut fails calls after "
                f"{self.store_cut_wait_us / 1e6:g}s"
            )
            lines.append(
                f"  commits hold their rows' locks {self.store_txn_us} us; a dead or cut "
                f"node's for {self.store_detect_us / 1e6:g}s"
            )
            lines.append(
                f"  presence across nodes: heartbeat {self.node_heartbeat_s:g}s, "
                f"a node unheard for {self.node_liveness_s:g}s has vanished"
            )
        for c in self.clients:
            lines.append(
                f"  client {c.name}: user {c.user} {c.role} {'cbor' if c.cbor else 'json'} "
                f"skew {c.skew_ms} ms latency {c.latency_us} us jitter {c.jitter_us} us"
                f"{'' if c.keyed else ' unkeyed'}"
            )
        return "\n".join(lines)


@attrs.frozen
class Swarm:
    """Which fault kinds and workloads a seed turns on, and how hard.

    Swarm testing: rather than every kind at a middling rate in every seed,
    each seed draws a *density* (the chance that any one kind is on), then
    each kind on its own: on or off, and a rate spread over two orders of
    magnitude (log-uniform).  Some seeds run one or two kinds hard, others
    many at once; a combination that needs two rare kinds together comes up
    in a few seeds instead of hundreds.  Every kind draws from its own named
    stream (``swarm:<profile>:<seed>:<kind>``), so adding a kind, or
    excluding one, leaves the draws of the others as they were."""

    density: float
    faults: tuple[tuple[str, float], ...]
    workloads: tuple[str, ...]
    rates: tuple[tuple[str, float], ...] = ()
    """The rate drawn for every kind, on or off (``--only`` turns kinds on)."""
    chunk_pipeline: int = 1
    """Agents stream in bursts with this many chunks in flight at once (1:
    one at a time, each answered before the next): consecutive chunks then
    meet in one commit group and are merged into one event."""


DENSITIES: Final = (0.2, 0.4, 0.6, 0.85)
"""The chance that any one fault kind is on in a seed (one drawn per seed)."""

RATE_PER_MIN: Final = {
    "ci": (1.0, 60.0),
    "full": (0.5, 20.0),
    "cluster": (1.0, 60.0),
    "medium": (1.0, 60.0),
}
"""The range of a fault kind's rate per virtual minute (log-uniform)."""

STORE_TRIPS: Final = (3, 5, 8)
"""Round trips of a multi-node commit's transaction after its first
statement locked the rooms (the rows' locks, the events, the heads, the
COMMIT; a streamed chunk's lengths; a savepoint per isolated request): one
drawn per seed."""

STORE_TRIP_MIN_US: Final = 200
"""The shortest store round trip of a multi-node run (a seed whose store
calls take no time still talks to a server across a network)."""

STORE_DETECT_US: Final = 15_000_000
"""How long the store takes to notice a dead or cut connection when the
seed's ``store_cut_wait_us`` is 0 (a refused connect says nothing about an
open transaction's): 15 s, the ``tcp_user_timeout`` our PostgreSQL
connections use (``store._backend._PG_CONNECT_DEFAULTS``; their keepalives, 10 s idle and
3 probes 3 s apart, come to about as much), as the server's own
``tcp_user_timeout``/keepalive settings are configured to match."""

BURST_CHUNK_PER_S: Final = 400
"""The chunk rate of an agent that streams in bursts (pipelined chunks)."""

RARE_KINDS: Final = ("storm", "daemon_crash", "epoch_reset")
"""Kinds whose every occurrence disturbs the whole run: a third of the rate."""


def draw_swarm(seed: int, profile: str = "ci") -> Swarm:
    """The fault kinds and workloads of ``seed`` (before any exclusion)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    top = random.Random(f"swarm:{profile}:{seed}")
    density = DENSITIES[top.randrange(len(DENSITIES))]
    low, high = RATE_PER_MIN[profile]
    faults: list[tuple[str, float]] = []
    rates: list[tuple[str, float]] = []
    cluster = profile == "cluster"
    for kind in FAULT_KINDS:
        if (kind in CLUSTER_ONLY and not cluster) or (kind in NOT_CLUSTER and cluster):
            continue
        rng = random.Random(f"swarm:{profile}:{seed}:{kind}")
        on = rng.random() < density
        rate = low * (high / low) ** rng.random()
        if kind in RARE_KINDS:
            rate /= 3
        rates.append((kind, max(0.1, round(rate, 1))))
        if on:
            faults.append(rates[-1])
    workloads = [
        w for w in WORKLOADS if random.Random(f"swarm:{profile}:{seed}:{w}").random() < 0.6
    ]
    if not workloads:
        # a seed with no workload writes nothing: it tests too little
        workloads.append(WORKLOADS[top.randrange(len(WORKLOADS))])
    burst = random.Random(f"swarm:{profile}:{seed}:burst")
    pipeline = burst.choice((4, 8, 16)) if burst.random() < 0.35 else 1
    return Swarm(density, tuple(faults), tuple(workloads), tuple(rates), pipeline)


def _pick(rng: random.Random, choices: tuple[int, ...]) -> int:
    return choices[rng.randrange(len(choices))]


def draw_config(
    seed: int, profile: str = "ci", *, exclude: tuple[str, ...] = (), only: tuple[str, ...] = ()
) -> SimConfig:
    """The configuration of ``seed``.  ``exclude`` turns fault kinds or
    workloads off; ``only`` runs only the named fault kinds, each on in every
    seed at the rate the seed draws for it (workloads are not affected by
    ``only``)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    unknown = sorted(set(exclude) - set(EXCLUDABLE)) + sorted(set(only) - set(FAULT_KINDS))
    if unknown:
        raise ValueError(f"unknown fault kind or workload: {', '.join(unknown)}")
    rng = random.Random(f"config:{profile}:{seed}")
    big = profile == "full"
    medium = profile == "medium"
    users = rng.randint(2, 5) if medium else rng.randint(1, 6 if big else 3)
    max_skew_ms = _pick(rng, (0, 0, 5, 50, 2_000, 30_000))
    clients: list[ClientSpec] = []
    slow = rng.random() < 0.3
    for user in range(users):
        for _ in range(rng.randint(1, 4 if big else 3)):
            clients.append(_client(rng, f"w{len(clients)}", user, "window", max_skew_ms, slow))
    agents = rng.randint(1, 5) if medium else rng.randint(0, 6 if big else 2)
    if medium:  # 5-20 clients: at least 5, windows before agents as drawn
        agents = max(agents, 5 - len(clients))
    for _ in range(agents):
        clients.append(_client(rng, f"a{len(clients)}", users, "agent", max_skew_ms, slow))
    swarm = draw_swarm(seed, profile)
    workloads = tuple(w for w in swarm.workloads if w not in exclude)
    if only:  # these kinds, on in every seed, at the rates the seed draws
        faults = tuple((k, r) for k, r in swarm.rates if k in only and k not in exclude)
    else:
        faults = tuple((k, r) for k, r in swarm.faults if k not in exclude)
    heartbeat_ms = _pick(rng, (1_000, 2_000, 5_000, 15_000))
    config = SimConfig(
        seed=seed,
        profile=profile,
        users=users,
        clients=tuple(clients),
        boards=rng.randint(1, 3 if big else 2),
        sessions_per_board=rng.randint(1, 4 if big else 2),
        workloads=workloads,
        faults=faults,
        fault_s=rng.randint(30, 120) if big else 30 if medium else rng.randint(6, 16),
        quiet_max_s=90,
        link_bytes_max=_pick(rng, (2_048, 16_384, 262_144)),
        dup_per_mille=_pick(rng, (0, 0, 20, 200)) if "duplicate" not in exclude else 0,
        outbox_messages_max=_pick(rng, (8, 32, 200, 2_000)),
        outbox_bytes_max=_pick(rng, (4_096, 65_536, 4 * 1024 * 1024)),
        outbox_control_max=_pick(rng, (32, 1_024)),
        heartbeat_ms=heartbeat_ms,
        dead_after_s=2.5 * heartbeat_ms / 1000 + _pick(rng, (0, 1, 5)),
        edit_per_min=_pick(rng, (6, 30, 120)),
        chunk_per_s=_pick(rng, (8, 10, 12)),
        rename_period_ms=_pick(rng, (250, 1_000, 3_000)),
        cursor_per_s=_pick(rng, (30, 60, 120)),
        max_skew_ms=max_skew_ms,
        store_latency_us=_pick(rng, (0, 200, 1_000, 5_000)),
        swarm_density=swarm.density,
    )
    # sim-sized limits (their own stream: the draws above stay as they were)
    limits = random.Random(f"limits:{profile}:{seed}")
    config = attrs.evolve(
        config,
        ring_size=_pick(limits, (0, 4, 16, 64)) or None,
        idle_s=(None, 0.5, 2.0, 5.0)[limits.randrange(4)],
        grace_s=(10.0, 2.0, 0.5)[limits.randrange(3)],
    )
    # idempotency keys: most clients' writes go under one (a stream of its own)
    keys = random.Random(f"keys:{profile}:{seed}")
    config = attrs.evolve(
        config,
        clients=tuple(attrs.evolve(c, keyed=keys.random() < 0.75) for c in config.clients),
    )
    # the writer's linger: a stream of its own too (the daemon's 2 ms, a long
    # 20 ms, or none as the library's default)
    linger = random.Random(f"linger:{profile}:{seed}")
    config = attrs.evolve(config, commit_linger_s=(0.0, 0.002, 0.02)[linger.randrange(3)])
    # one seed in four: a registry that gives up after one restart in
    # RESTART_PERIOD_S, so two crashes close together restart every actor
    escalate = random.Random(f"escalate:{profile}:{seed}")
    if escalate.randrange(4) == 0:
        config = attrs.evolve(config, restarts_max=1)
    if profile == "cluster":  # streams of their own: the draws above stay as they were
        nodes = random.Random(f"nodes:{profile}:{seed}")
        config = attrs.evolve(
            config,
            nodes=nodes.choice((2, 3)),
            broker_latency_us=(nodes.choice((100, 1_000, 5_000)), nodes.choice((0, 500, 2_000))),
        )
        # drawn after the others, so they stay as they were
        config = attrs.evolve(
            config, broker_message_max=nodes.choice((None, None, 5_997, 700, 300))
        )
        # a stream of its own: the draws above stay as they were
        cut = random.Random(f"store_cut_wait:{profile}:{seed}")
        config = attrs.evolve(
            config, store_cut_wait_us=cut.choice((0, 0, 500_000, 5_000_000, 15_000_000))
        )
    # a stream of its own: the draws above stay as they were
    named = random.Random(f"chunk_at:{profile}:{seed}")
    config = attrs.evolve(config, chunk_at=named.random() < 0.5)
    if swarm.chunk_pipeline > 1 and "bursts" not in exclude:
        # commits that take time (the worker-thread hops): chunks sent
        # meanwhile queue up at the writer and go in one group
        config = attrs.evolve(
            config,
            chunk_pipeline=swarm.chunk_pipeline,
            chunk_per_s=BURST_CHUNK_PER_S,
            store_latency_us=max(config.store_latency_us, 2_000),
        )
    if profile == "cluster":  # a stream of its own, after the store latency is final
        txn = random.Random(f"store_txn:{profile}:{seed}")
        trip_us = max(config.store_latency_us, STORE_TRIP_MIN_US)
        config = attrs.evolve(
            config,
            store_txn_us=STORE_TRIPS[txn.randrange(len(STORE_TRIPS))] * trip_us,
            store_detect_us=config.store_cut_wait_us or STORE_DETECT_US,
        )
        # a stream of its own: the daemon's heartbeat and liveness, or sim-sized
        # ones, so that a dead node's users leave facepiles within a run
        beat = random.Random(f"node_beat:{profile}:{seed}")
        heartbeat_s, liveness_s = NODE_BEATS[beat.randrange(len(NODE_BEATS))]
        config = attrs.evolve(config, node_heartbeat_s=heartbeat_s, node_liveness_s=liveness_s)
    return config


def _client(
    rng: random.Random, name: str, user: int, role: Role, max_skew_ms: int, slow: bool
) -> ClientSpec:
    latency_us = rng.randint(100, 40_000 if slow else 5_000)
    return ClientSpec(
        name=name,
        user=user,
        role=role,
        cbor=rng.random() < 0.5,
        skew_ms=rng.randint(-max_skew_ms, max_skew_ms) if max_skew_ms else 0,
        latency_us=latency_us,
        jitter_us=rng.randint(0, latency_us // 2),
    )


def draw_faults(config: SimConfig) -> tuple[Fault, ...]:
    """The faults of a run, at absolute times within the fault phase, in
    time order (a Poisson process per enabled kind, each from its own named
    stream: excluding a kind leaves the faults of the others as they were)."""
    end_us = config.fault_s * 1_000_000
    dead_us = int(config.dead_after_s * 1_000_000)
    faults: list[Fault] = []
    for kind, per_min in config.faults:
        rng = random.Random(f"faults:{config.profile}:{config.seed}:{kind}")
        t = 500_000  # the first second is for connecting
        mean_gap_us = 60_000_000 / per_min
        while True:
            t += max(1, round(rng.expovariate(1.0) * mean_gap_us))
            if t >= end_us:
                break
            target = rng.randrange(1 << 16)
            span = 1
            duration = 0
            direction: Literal["both", "up", "down"] = "both"
            if kind in ("partition", "one_way"):
                span = rng.randint(1, 3)
                duration = rng.randint(50_000, 2 * dead_us)
                if kind == "one_way":
                    direction = "up" if rng.random() < 0.5 else "down"
            elif kind == "storm":
                span = 1 << 16
                duration = dead_us + rng.randint(100_000, 3_000_000)
            elif kind == "stall":
                duration = rng.randint(100_000, 2 * dead_us)
            elif kind in ("daemon_crash", "epoch_reset"):
                duration = rng.randint(10_000, 3_000_000)
            elif kind in ("store_request", "store_chunk"):
                duration = rng.randint(200_000, 4_000_000)
            elif kind in CLUSTER_ONLY:
                duration = rng.randint(100_000, 5_000_000)
            faults.append(Fault(t, kind, target, span, duration, direction))
    faults.sort(key=lambda f: (f.at_us, FAULT_KINDS.index(f.kind), f.target))
    return tuple(faults)


# --------------------------------------------------------------------------- explicit runs

_DIRECTIONS: Final = ("both", "up", "down")


def encode_faults(faults: tuple[Fault, ...]) -> str:
    """A fault list as one compact string, e.g.
    ``reset@1234567:t5,partition@2500000:t3:s2:d400000:up``: the kind and
    the virtual time in microseconds, then only what differs from the
    defaults (``t`` target, ``s`` span, ``d`` duration in us, a direction).
    ``none`` for no faults."""
    parts = []
    for f in faults:
        text = f"{f.kind}@{f.at_us}"
        if f.target:
            text += f":t{f.target}"
        if f.span != 1:
            text += f":s{f.span}"
        if f.duration_us:
            text += f":d{f.duration_us}"
        if f.direction != "both":
            text += f":{f.direction}"
        parts.append(text)
    return ",".join(parts) or "none"


def parse_faults(text: str) -> tuple[Fault, ...]:
    """The fault list of :func:`encode_faults` (whitespace and newlines
    separate faults too; ``#`` starts a comment).  Raises ValueError with
    what is wrong."""
    items: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        items.extend(i for i in line.replace(",", " ").split() if i)
    if items == ["none"]:
        return ()
    faults: list[Fault] = []
    for item in items:
        head, *fields = item.split(":")
        kind, at, at_us = head.partition("@")
        if kind not in FAULT_KINDS or not at or not at_us.isdigit():
            raise ValueError(
                f"bad fault {item!r}: want <kind>@<virtual us>[:t<target>][:s<span>]"
                f"[:d<duration us>][:up|:down], kinds {', '.join(FAULT_KINDS)}"
            )
        values: dict[str, int] = {}
        direction: Literal["both", "up", "down"] = "both"
        for field in fields:
            if field in _DIRECTIONS:
                direction = field  # type: ignore[assignment]
            elif field[:1] in ("t", "s", "d") and field[1:].isdigit():
                values[field[0]] = int(field[1:])
            else:
                raise ValueError(f"bad field {field!r} in fault {item!r}")
        faults.append(
            Fault(
                int(at_us),
                kind,
                values.get("t", 0),
                values.get("s", 1),
                values.get("d", 0),
                direction,
            )
        )
    faults.sort(key=lambda f: (f.at_us, FAULT_KINDS.index(f.kind), f.target))
    return tuple(faults)


@attrs.frozen
class Narrowing:
    """What a replay (or a shrink) changes of a seed's drawn run: an explicit
    fault list instead of the drawn one, only some of the clients, a
    shorter fault phase.  Everything else (and every random stream) stays
    as the seed draws it."""

    faults: tuple[Fault, ...] | None = None
    clients: tuple[str, ...] | None = None
    """Names of the clients to keep (None: all)."""
    fault_s: int | None = None

    @property
    def empty(self) -> bool:
        return self.faults is None and self.clients is None and self.fault_s is None

    def apply(self, config: SimConfig) -> SimConfig:
        if self.clients is not None:
            known = {c.name for c in config.clients}
            unknown = sorted(set(self.clients) - known)
            if unknown:
                raise ValueError(
                    f"no client {', '.join(unknown)} in seed {config.seed}; "
                    f"it has {', '.join(sorted(known))}"
                )
            config = attrs.evolve(
                config, clients=tuple(c for c in config.clients if c.name in self.clients)
            )
        if self.fault_s is not None:
            config = attrs.evolve(config, fault_s=max(1, self.fault_s))
        return config

    def plan(self, config: SimConfig) -> tuple[Fault, ...]:
        """The faults of the run: the explicit list, or the drawn one; cut to
        the fault phase."""
        faults = draw_faults(config) if self.faults is None else self.faults
        end_us = (self.fault_s or config.fault_s) * 1_000_000
        return tuple(f for f in faults if f.at_us < end_us)

    def arguments(self) -> list[str]:
        """The command-line arguments that give this narrowing."""
        out: list[str] = []
        if self.faults is not None:
            out += ["--faults", encode_faults(self.faults)]
        if self.clients is not None:
            out += ["--clients", ",".join(self.clients) or "none"]
        if self.fault_s is not None:
            out += ["--fault-s", str(self.fault_s)]
        return out
