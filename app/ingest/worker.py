"""The ingest worker (`wellstream ingest`): the site's adapters feeding one publisher, until stopped."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence

from app.adapters.base import Adapter, ReadingSink
from app.adapters.registry import build_adapter
from app.backoff import Backoff
from app.cancellation import pause
from app.errors import BrokerError
from app.ingest.metrics import ingest_registry, serve_metrics
from app.ingest.publisher import Publisher
from app.ingest.sitefile import Site
from app.ingest.spool import Spool
from app.models import Reading
from app.settings import SpoolSettings
from app.streams.seams import Broker, WellRegistry, WorkerLeases

logger = logging.getLogger(__name__)

LEASE_TTL_S = 2.0  # a worker silent this long is gone: its tags go stale at the next sweep
LEASE_BEAT_S = 0.5


def adapters_for(site: Site, credentials: Mapping[str, str]) -> list[Adapter]:
    """One adapter per connection of the site file; `credentials` holds the variables it names."""
    return [build_adapter(connection, credentials) for connection in site.connections]


class ConnectionHealth:
    """A sink in front of the publisher that keeps one connection's vital signs.

    Whether the adapter is connected, its error count, readings by quality and the time of
    the last one: a connection that went quiet shows even while its adapter reconnects.
    """

    def __init__(self, adapter: Adapter, sink: ReadingSink, protocol: str = "") -> None:
        self.adapter = adapter
        self.protocol = protocol
        self._sink = sink
        self.readings: dict[str, int] = {"GOOD": 0, "UNCERTAIN": 0, "BAD": 0}
        self.last_reading_at: float | None = None

    async def submit(self, readings: Sequence[Reading]) -> None:
        for reading in readings:
            self.readings[reading.quality] += 1
        if readings:
            self.last_reading_at = time.monotonic()
        await self._sink.submit(readings)

    def report(self) -> dict[str, object]:
        age = None if self.last_reading_at is None else round(time.monotonic() - self.last_reading_at, 1)
        adapter = self.adapter
        return {
            "connection": adapter.name,
            "connected": adapter.connected,
            "errors": adapter.errors,
            "readings": dict(self.readings),
            "last_reading_age_s": age,
        }


async def run_ingest(
    site: Site,
    broker: Broker,
    stop: asyncio.Event,
    credentials: Mapping[str, str],
    health_every_s: float = 30,
    spool: SpoolSettings | None = None,
    metrics: tuple[str, int] | None = None,
) -> None:
    """Register the site's wells, run every adapter into one publisher until `stop`, then flush.

    `metrics` (host, port): serve Prometheus /metrics there while running.

    With `spool` settings (enabled), batches Redis cannot take go to that local spool; the
    spool is opened before anything runs, so a locked or unwritable path fails at start
    (SpoolError). Redis being down at start is not fatal: registration is retried meanwhile.
    """
    opened = None
    if spool is not None and spool.enabled:
        opened = await Spool.open(spool.path, spool.max_bytes, spool.max_readings, spool.synchronous)
    try:
        await _run_adapters(site, broker, stop, credentials, health_every_s, opened, spool, metrics)
    finally:
        if opened is not None:
            await opened.aclose()


async def _run_adapters(
    site: Site,
    broker: Broker,
    stop: asyncio.Event,
    credentials: Mapping[str, str],
    health_every_s: float,
    spool: Spool | None,
    settings: SpoolSettings | None,
    metrics: tuple[str, int] | None,
) -> None:
    adapters = adapters_for(site, credentials)
    settings = settings or SpoolSettings()
    publisher = Publisher(
        broker.log, spool=spool, publish_timeout_s=settings.publish_timeout_s, drain_on_exit_s=settings.drain_on_exit_s
    )
    lease = WorkerLease(publisher.producer, site, adapters, broker.workers, publisher)
    async with publisher:
        health = [
            ConnectionHealth(adapter, publisher, connection.protocol)
            for adapter, connection in zip(adapters, site.connections, strict=True)
        ]
        stop_metrics = serve_metrics(ingest_registry(health, publisher), *metrics) if metrics else None
        tasks = [asyncio.create_task(a.run(h), name=a.name) for a, h in zip(adapters, health, strict=True)]
        tasks.append(asyncio.create_task(_log_health(health, publisher, health_every_s), name="health"))
        tasks.append(asyncio.create_task(_register_wells(site, broker.registry), name="register-wells"))
        tasks.append(asyncio.create_task(lease.keep(), name="worker-lease"))
        logger.info("ingesting from %d connections", len(adapters))
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if stop_metrics is not None:
                await asyncio.to_thread(stop_metrics)
    await lease.end()  # after the last readings are out: the sweep must not be overtaken by them
    logger.info(
        "ingest stopped after publishing %d readings",
        publisher.counters.published,
        extra={"fields": {"event": "ingest-stopped", **publisher.report()}},
    )


class WorkerLease:
    """This worker's lease on each tenant it feeds, so that gateways can tell when it is gone.

    Renewed every LEASE_BEAT_S for LEASE_TTL_S; a worker that stops renewing (SIGKILL, its host
    gone, a network split) has its tags marked stale by whichever gateway sweeps first (see
    WorkerLeases). The first beat claims the tags; a beat that finds its lease gone (it ran
    out, say, while Redis was away) claims them again and republishes what the adapters know,
    so a verdict of stale on a worker that was only slow is undone at once. A clean stop ends
    the leases, and the tags go stale at the next sweep: nothing updates them any more.
    """

    def __init__(
        self, worker: str, site: Site, adapters: Sequence[Adapter], leases: WorkerLeases, sink: ReadingSink
    ) -> None:
        self._worker = worker
        self._leases = leases
        self._sink = sink
        self._tags: dict[str, list[tuple[str, str]]] = {}
        self._adapters: dict[str, list[Adapter]] = {}
        for connection, adapter in zip(site.connections, adapters, strict=True):
            self._tags.setdefault(connection.tenant, []).extend(connection.feeds())
            self._adapters.setdefault(connection.tenant, []).append(adapter)

    async def keep(self) -> None:
        failing = False
        while True:
            try:
                for tenant, tags in self._tags.items():
                    if await self._leases.beat(self._worker, tenant, LEASE_TTL_S):
                        await self._claim(tenant, tags)
                if failing:
                    logger.info("worker lease renewed again")
                failing = False
            except BrokerError as exc:
                if not failing:
                    logger.warning("cannot renew this worker's lease, its tags may be marked stale: %s", exc)
                failing = True
            await pause(LEASE_BEAT_S)

    async def _claim(self, tenant: str, tags: list[tuple[str, str]]) -> None:
        await self._leases.beat(self._worker, tenant, LEASE_TTL_S, tags)
        known = [reading for adapter in self._adapters[tenant] for reading in adapter.current()]
        if known:
            await self._sink.submit([reading.model_copy(update={"ingested_at": None}) for reading in known])

    async def end(self) -> None:
        """End every lease now (bounded: an unreachable Redis must not hold the exit; the leases then run out)."""
        try:
            async with asyncio.timeout(LEASE_TTL_S):
                for tenant in self._tags:
                    await self._leases.beat(self._worker, tenant, 0)
        except (BrokerError, TimeoutError) as exc:
            logger.warning("could not end this worker's leases, they run out in %.0f s: %s", LEASE_TTL_S, exc)


async def _register_wells(site: Site, registry: WellRegistry) -> None:
    # Publishing adds a well too; registering up front lets the gateway know wells that are quiet.
    backoff = Backoff()
    while True:
        try:
            for tenant, wells in site.registry().items():
                await registry.register(tenant, wells)
            return
        except BrokerError as exc:
            delay = backoff.next()
            if backoff.failures == 1:
                logger.warning("registering the site's wells failed, retrying: %s", exc)
            await pause(delay)


async def _log_health(health: list[ConnectionHealth], publisher: Publisher, every_s: float) -> None:
    while True:
        await pause(every_s)
        for connection in health:
            logger.info("connection health", extra={"fields": {"event": "ingest-health", **connection.report()}})
        logger.info("publisher health", extra={"fields": {"event": "publisher-health", **publisher.report()}})
