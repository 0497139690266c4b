"""The daemon's metrics, in Prometheus's model (``prometheus-client``).

One :class:`Metrics` per daemon (its own registry: several daemons, or a
test's hubs, in one process do not collide).  What counts per event is
recorded where it is cheap: once per delivery, per commit group, per call,
never per subscriber; what is a state (connections, rooms, mailboxes) is
read when the metrics are scraped (:meth:`Metrics.add_collector`).

Layer 0: it imports nothing of ours.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

__all__ = ["Metrics"]

_LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class _Scraped(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


class Metrics:
    """The counters and histograms of one daemon."""

    _CALL_CHILDREN_MAX = 1024

    def call_seconds(self, service: str, method: str) -> Histogram:
        """The ``calls`` histogram of ``service`` and ``method``, looked up
        once (``labels()`` takes a lock and builds a key at every call; the
        caller keeps the label values bounded)."""
        key = (service, method)
        child = self._call_children.get(key)
        if child is None:
            child = self.calls.labels(service, method)
            if len(self._call_children) < self._CALL_CHILDREN_MAX:
                self._call_children[key] = child
        return child

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.connections = Gauge(
            "agor_connections", "Open protocol connections", ["codec"], registry=r
        )
        self.connections_opened = Counter(
            "agor_connections_opened", "Protocol connections opened", ["codec"], registry=r
        )
        self.calls = Histogram(
            "agor_call_seconds",
            "Call latency from the call frame to its result, by service and method",
            ["service", "method"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self._call_children: dict[tuple[str, str], Histogram] = {}
        self.refused = Counter(
            "agor_messages_refused",
            "Client messages refused by the protocol machine, by error code"
            " (rate_limited, too_many_pending, ...)",
            ["code"],
            registry=r,
        )
        self.commit_groups = Histogram(
            "agor_commit_group_writes",
            "Writes per commit group",
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.commit_seconds = Histogram(
            "agor_commit_seconds",
            "Time of one commit group (worker thread round trip included)",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.events_committed = Counter(
            "agor_events_committed",
            "Events made durable (a merged chunk event counts once)",
            registry=r,
        )
        self.deliveries = Counter(
            "agor_deliveries", "Events offered to subscribers' outboxes", registry=r
        )
        self.room_seconds = Histogram(
            "agor_commit_to_room_seconds",
            "From the commit's end to the room taking its events (once per room and commit)",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.delivery_seconds = Histogram(
            "agor_delivery_seconds",
            "From the commit's end to the socket: once per frame of fresh room events"
            " as it is written (a frame shared by the room's subscribers: at its first"
            " write; a frame a busy connection's writer sends: at each; events held for"
            " a batch window included, catch-ups from the log not)",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.batch_windows = Counter(
            "agor_batch_windows",
            "Deliveries held for the end of a room's 100 ms window (the room was under load)",
            registry=r,
        )
        self.lagged = Counter(
            "agor_lagged", "Subscribers told lagged (their outbox overflowed)", registry=r
        )
        self.dropped = Counter(
            "agor_dropped",
            "Messages dropped by class (presence only; never the stream)",
            ["class"],
            registry=r,
        )
        self.actor_exits = Counter(
            "agor_actor_crashes",
            "Actors that crashed (and were restarted), by kind",
            ["kind"],
            registry=r,
        )

    def add_collector(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Add metrics computed at each scrape by ``collect``."""
        self.registry.register(_Scraped(collect))
