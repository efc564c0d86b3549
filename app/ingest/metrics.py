"""An ingest worker's /metrics, on a port of its own (the worker has no web server)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from app.ingest.publisher import Publisher
    from app.ingest.worker import ConnectionHealth


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class ScanTimes(Protocol):
    """One polled group's scans: the last one's duration (None before the first) and the overruns so far."""

    @property
    def last_scan_s(self) -> float | None: ...

    @property
    def overruns(self) -> int: ...


@runtime_checkable
class Scanning(Protocol):
    """An adapter that polls in scans (Modbus): its groups' scan times, by group name.

    Optional beside `Adapter`, as a broker's health is beside `Broker`: only polling adapters scan.
    """

    @property
    def scans(self) -> Mapping[str, ScanTimes]: ...


def scan_metrics(connections: list[ConnectionHealth]) -> tuple[GaugeMetricFamily, CounterMetricFamily]:
    labels = ["connection", "group"]
    seconds = GaugeMetricFamily(
        "wellstream_ingest_scan_seconds", "How long the group's last scan of its device took", labels=labels
    )
    overruns = CounterMetricFamily(
        "wellstream_ingest_scan_overruns", "Scans that took longer than the group's interval", labels=labels
    )
    for health in connections:
        adapter = health.adapter
        if not isinstance(adapter, Scanning):
            continue
        for group, scan in adapter.scans.items():
            if scan.last_scan_s is not None:
                seconds.add_metric([adapter.name, group], scan.last_scan_s)
            overruns.add_metric([adapter.name, group], scan.overruns)
    return seconds, overruns


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
        yield from scan_metrics(self._connections)
        publisher = self._publisher
        yield counter("wellstream_ingest_accepted", "Readings handed to the publisher", publisher.counters.accepted)
        yield counter(
            "wellstream_ingest_published",
            "Readings Redis took (directly or from the spool)",
            publisher.counters.published,
        )
        yield counter(
            "wellstream_spool_spooled", "Readings written to the spool while Redis was down", publisher.counters.spooled
        )
        yield counter(
            "wellstream_spool_drained", "Readings drained from the spool into Redis", publisher.counters.drained
        )
        yield counter(
            "wellstream_spool_dropped",
            "Readings dropped because the spool hit its size bound (oldest first)",
            publisher.counters.dropped,
        )
        yield counter(
            "wellstream_ingest_lost", "Readings neither Redis nor the spool took (on exit)", publisher.counters.lost
        )
        yield counter(
            "wellstream_ingest_rejected",
            "Readings Redis refused for good (a key of the wrong type)",
            publisher.rejected,
        )
        yield GaugeMetricFamily(
            "wellstream_spool_depth_readings", "Readings waiting in the spool", publisher.counters.depth
        )
        yield GaugeMetricFamily(
            "wellstream_spool_depth_bytes", "Bytes of readings waiting in the spool", publisher.counters.depth_bytes
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
