"""Prometheus metrics of one runtime.

Each runtime has its own registry, so that tests can run several runtimes in
one process. The admin endpoint serves it at ``/metrics``. Plugins record
through the methods here, or create further metrics in :attr:`registry`.

"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

__all__ = ["Metrics"]


class Metrics:
    """The metrics every runtime exposes; see docs/operating.md."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events_in = Counter(
            "mycel_events_in",
            "Events a flow received from its source.",
            ["flow"],
            registry=r,
        )
        self.events_out = Counter(
            "mycel_events_out",
            "Events a to block delivered.",
            ["flow", "connector"],
            registry=r,
        )
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
