"""Prometheus metrics of one runtime.

Each runtime has its own registry, so that tests can run several runtimes in
one process. The admin endpoint serves it at ``/metrics``. Plugins record
through the methods here, or create further metrics in :attr:`registry`.

"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["Metrics", "Tally"]


class Tally(Collector):
    """A counter for the per-event path: a plain integer per label set.

    prometheus-client's counters take a lock on every increment, which
    costs more than the rest of a flow's bookkeeping; these are read only
    when scraped. ``cell(labels)`` returns a one-item list to add to:
    ``cell[0] += 1``. Single-threaded use only (the event loop).

    """

    def __init__(self, name: str, documentation: str, labelnames: list[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self._cells: dict[tuple[str, ...], list[int]] = {}

    def cell(self, *labels: str) -> list[int]:
        return self._cells.setdefault(labels, [0])

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            self.name, self.documentation, labels=self.labelnames
        )
        for labels, cell in self._cells.items():
            family.add_metric(list(labels), cell[0])
        yield family


class Metrics:
    """The metrics every runtime exposes; see docs/operating.md."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events_in = Tally(
            "mycel_events_in", "Events a flow received from its source.", ["flow"]
        )
        self.events_out = Tally(
            "mycel_events_out", "Events a to block delivered.", ["flow", "connector"]
        )
        r.register(self.events_in)
        r.register(self.events_out)
        self.events_failed = Counter(
            "mycel_events_failed",
            "Events a flow gave up on after its last try.",
            ["flow"],
            registry=r,
        )
        self.retries = Counter(
            "mycel_retries",
            "Retried attempts of a to block.",
            ["flow", "connector"],
            registry=r,
        )
        self.filtered = Counter(
            "mycel_filter_dropped",
            "Deliveries a filter stopped (per event, or per subscriber on "
            "fan-out connectors).",
            ["flow", "connector"],
            registry=r,
        )
        self.filter_errors = Counter(
            "mycel_filter_errors",
            "Filter evaluations that failed and counted as false.",
            ["flow", "connector"],
            registry=r,
        )
        self.fan_out_deliveries = Counter(
            "mycel_subscriber_deliveries",
            "Messages queued for subscribers of fan-out connectors.",
            ["flow", "connector"],
            registry=r,
        )
        self.subscriber_gauge = Gauge(
            "mycel_subscribers",
            "Connected subscribers of a fan-out connector.",
            ["connector"],
            registry=r,
        )
        self.slow_dropped = Counter(
            "mycel_slow_consumers_dropped",
            "Subscribers closed because their send queue was full.",
            ["connector"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "mycel_queue_depth",
            "Messages waiting in a connector's queues.",
            ["connector"],
            registry=r,
        )
        self.replication_lag = Gauge(
            "mycel_replication_lag_bytes",
            "WAL bytes between the server's position and the last confirmed one.",
            ["connector"],
            registry=r,
        )
        self.in_flight = Gauge(
            "mycel_in_flight",
            "Events being processed by flows right now.",
            registry=r,
        )

    def fan_out(
        self, flow: str, connector: str, delivered: int, filtered: int, errors: int
    ) -> None:
        if delivered:
            self.fan_out_deliveries.labels(flow, connector).inc(delivered)
        if filtered:
            self.filtered.labels(flow, connector).inc(filtered)
        if errors:
            self.filter_errors.labels(flow, connector).inc(errors)

    def subscribers(self, connector: str, count: int) -> None:
        self.subscriber_gauge.labels(connector).set(count)

    def track_queue_depth(self, connector: str, depth: Callable[[], float]) -> None:
        """Report ``depth()`` as the connector's queue depth at each scrape."""
        self.queue_depth.labels(connector).set_function(depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)
