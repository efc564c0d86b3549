"""Prometheus exposition: the gateway's /metrics, and an ingest worker's own port.

The hot paths bump plain ints (app/streams/stats.py, the audit refusal counter, the ingest
publisher's counters); the collectors here read them at scrape time. One registry per
gateway app, so several apps in one process (tests) never collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from app.auth import audit

if TYPE_CHECKING:
    from app.ingest import ConnectionHealth, Publisher
    from app.streams.fanout import Hub

__all__ = ["CONTENT_TYPE", "gateway_registry", "ingest_registry", "render", "serve_metrics"]

# The classic text format every Prometheus (2.x too) and agent reads; our names need no escaping.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class GatewayCollector(Collector):
    def __init__(self, hub: Callable[[], Hub | None]) -> None:
        self._hub = hub

    def collect(self) -> Iterable[Metric]:
        hub = self._hub()
        if hub is None:  # before the lifespan started
            return
        stats = hub.stats
        open_streams = GaugeMetricFamily("wellstream_open_streams", "Open SSE streams", labels=["tenant"])
        for tenant, count in sorted(hub.streams_by_tenant().items()):
            open_streams.add_metric([tenant], count)
        yield open_streams
        yield GaugeMetricFamily("wellstream_hub_subscriptions", "Wells this gateway is subscribed to", hub.topics)
        yield GaugeMetricFamily(
            "wellstream_live", "1 when the live feed is connected and no gap is being filled", hub.live
        )
        yield _counter("wellstream_streams_opened", "Streams that got a 200 and started", stats.streams_opened)
        closed = CounterMetricFamily("wellstream_streams_closed", "Streams ended, by reason", labels=["reason"])
        for reason, count in sorted(stats.streams_closed.items()):
            closed.add_metric([reason], count)
        yield closed
        yield _counter("wellstream_events_sent", "Reading events sent live to streams", stats.events_sent)
        yield _counter("wellstream_bytes_sent", "Bytes of live frames sent to streams", stats.bytes_sent)
        yield _counter("wellstream_snapshots", "Catch-ups that sent a snapshot", stats.snapshots)
        yield _counter("wellstream_replays", "Catch-ups that resumed from history (Last-Event-ID)", stats.replays)
        yield _counter("wellstream_resets", "Resumes older than history: reset + snapshot", stats.resets)
        yield _counter("wellstream_slow_evictions", "Streams ended because their queue filled", stats.slow_disconnects)
        yield _counter("wellstream_send_timeouts", "Streams ended because a send was stuck", stats.send_timeouts)
        yield _counter("wellstream_redis_reconnects", "Live feed reconnects to Redis", hub.feed_reconnects)
        # Every reconnect is a gap the hub fills: one count, under the name each question looks for.
        yield _counter("wellstream_gap_fills", "Live feed gaps filled from history", hub.feed_reconnects)
        yield _counter("wellstream_gap_events", "Events sent from history by gap fills", stats.gap_events)
        refused = CounterMetricFamily(
            "wellstream_refusals", "Auth failures and limit hits, by kind and reason", labels=["kind", "reason"]
        )
        for (kind, reason), count in sorted(audit.refusals.items()):
            refused.add_metric([kind, reason], count)
        yield refused
        latency = stats.latency
        yield HistogramMetricFamily(
            "wellstream_delivery_latency_seconds",
            "Device timestamp to live send, oldest reading of each send",
            buckets=latency.cumulative(),
            sum_value=latency.sum,
        )


def gateway_registry(hub: Callable[[], Hub | None]) -> CollectorRegistry:
    """`hub` is called at each scrape: the hub exists only while the app's lifespan runs."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(hub))
    ProcessCollector(registry=registry)  # open fds, memory, CPU: what an SRE sizes by
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


class IngestCollector(Collector):
    def __init__(self, connections: list[ConnectionHealth], publisher: Publisher) -> None:
        self._connections = connections
        self._publisher = publisher

    def collect(self) -> Iterable[Metric]:
        labels = ["connection", "protocol"]
        readings = CounterMetricFamily(
            "wellstream_ingest_readings", "Readings read from devices", labels=[*labels, "quality"]
        )
        connected = GaugeMetricFamily("wellstream_ingest_connected", "1 while the adapter is connected", labels=labels)
        errors = CounterMetricFamily("wellstream_ingest_errors", "Failed connects and lost connections", labels=labels)
        age = GaugeMetricFamily(
            "wellstream_ingest_last_reading_age_seconds", "Time since the connection's last reading", labels=labels
        )
        for health in self._connections:
            names = [health.adapter.name, health.protocol]
            for quality, count in health.readings.items():
                readings.add_metric([*names, quality], count)
            connected.add_metric(names, health.adapter.connected)
            errors.add_metric(names, health.adapter.errors)
            report = health.report()
            if isinstance(report["last_reading_age_s"], float):
                age.add_metric(names, report["last_reading_age_s"])
        yield from (readings, connected, errors, age)
        publisher = self._publisher
        yield _counter("wellstream_ingest_accepted", "Readings handed to the publisher", publisher.accepted)
        yield _counter(
            "wellstream_ingest_published", "Readings Redis took (directly or from the spool)", publisher.published
        )
        yield _counter(
            "wellstream_spool_spooled", "Readings written to the spool while Redis was down", publisher.spooled
        )
        yield _counter("wellstream_spool_drained", "Readings drained from the spool into Redis", publisher.drained)
        yield _counter(
            "wellstream_spool_dropped",
            "Readings dropped because the spool hit its size bound (oldest first)",
            publisher.dropped,
        )
        yield _counter("wellstream_ingest_lost", "Readings neither Redis nor the spool took (on exit)", publisher.lost)
        yield _counter(
            "wellstream_ingest_rejected",
            "Readings Redis refused for good (a key of the wrong type)",
            publisher.rejected,
        )
        yield GaugeMetricFamily("wellstream_spool_depth_readings", "Readings waiting in the spool", publisher.depth)
        yield GaugeMetricFamily(
            "wellstream_spool_depth_bytes", "Bytes of readings waiting in the spool", publisher.depth_bytes
        )


def ingest_registry(connections: list[ConnectionHealth], publisher: Publisher) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(IngestCollector(connections, publisher))
    ProcessCollector(registry=registry)
    return registry


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> Callable[[], None]:
    """Serve /metrics from a thread (an ingest worker has no web server); returns the stop function."""
    server, thread = start_http_server(port, addr=host, registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stop
