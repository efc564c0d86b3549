"""The batching publisher between adapters and the broker: one broker round trip per batch."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence

from app.adapters.base import Adapter, ReadingSink
from app.adapters.modbus import ModbusAdapter
from app.adapters.mqtt import MqttAdapter, MqttConnection
from app.adapters.opcua import OpcuaAdapter, OpcuaConnection
from app.adapters.simulator import SimulatorAdapter
from app.errors import BrokerError
from app.models import Reading
from app.site import SimulatorConnection, Site
from app.streams.broker import Broker

logger = logging.getLogger(__name__)


class Publisher:
    """Collects readings for up to `max_delay_s` or `max_batch` readings, then publishes them.

    `submit` applies backpressure: when `max_pending` readings wait (the broker is slow or
    down), adapters await instead of growing memory without bound. While the broker is down,
    the current batch is retried with capped backoff, so nothing accepted is dropped.
    """

    def __init__(self, broker: Broker, max_batch: int = 500, max_delay_s: float = 0.005, max_pending: int = 50_000):
        self._broker = broker
        self._max_batch = max_batch
        self._max_delay_s = max_delay_s
        self._max_pending = max_pending
        self._pending: list[Reading] = []
        self._has_pending = asyncio.Event()
        self._has_room = asyncio.Event()
        self._has_room.set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.published = 0

    async def submit(self, readings: Sequence[Reading]) -> None:
        while len(self._pending) >= self._max_pending:
            self._has_room.clear()
            await self._has_room.wait()
        self._pending.extend(readings)
        self._has_pending.set()

    async def __aenter__(self) -> Publisher:
        self._task = asyncio.create_task(self._run(), name="publisher")
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Let the one task that publishes finish what is pending: cancelling it mid-batch
        # would drop or reorder readings.
        self._closing = True
        self._has_pending.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while not (self._closing and not self._pending):
            await self._has_pending.wait()
            self._has_pending.clear()
            if len(self._pending) < self._max_batch and not self._closing:
                await asyncio.sleep(self._max_delay_s)
            await self._flush()

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
            await self._publish(batch)
        self._has_room.set()

    async def _publish(self, batch: list[Reading]) -> None:
        backoff = 0.05
        while True:
            try:
                await self._broker.publish(batch)
                self.published += len(batch)
                return
            except BrokerError as exc:
                logger.warning("publish of %d readings failed, retrying in %.2f s: %s", len(batch), backoff, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)


def adapters_for(site: Site, credentials: Mapping[str, str]) -> list[Adapter]:
    """One adapter per connection of the site file; `credentials` holds the variables it names."""
    adapters: list[Adapter] = []
    for c in site.connections:
        if isinstance(c, SimulatorConnection):
            adapters.append(SimulatorAdapter([(c.tenant, well) for well in c.wells], c.interval_s, name=c.id))
        elif isinstance(c, MqttConnection):
            adapters.append(MqttAdapter(c, credentials=credentials))
        elif isinstance(c, OpcuaConnection):
            adapters.append(OpcuaAdapter(c, credentials=credentials))
        else:
            adapters.append(ModbusAdapter(c))
    return adapters


class ConnectionHealth:
    """A sink in front of the publisher that keeps one connection's vital signs.

    Whether the adapter is connected, its error count, readings by quality and the time of
    the last one: a connection that went quiet shows even while its adapter reconnects.
    """

    def __init__(self, adapter: Adapter, sink: ReadingSink) -> None:
        self.adapter = adapter
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
            "connected": getattr(adapter, "connected", None),
            "errors": getattr(adapter, "errors", None),
            "readings": dict(self.readings),
            "last_reading_age_s": age,
        }


async def run_ingest(
    site: Site, broker: Broker, stop: asyncio.Event, credentials: Mapping[str, str], health_every_s: float = 30
) -> None:
    """Register the site's wells, run every adapter into one publisher until `stop`, then flush."""
    for tenant, wells in site.registry().items():
        await broker.register_wells(tenant, wells)
    adapters = adapters_for(site, credentials)
    async with Publisher(broker) as publisher:
        health = [ConnectionHealth(adapter, publisher) for adapter in adapters]
        tasks = [asyncio.create_task(a.run(h), name=a.name) for a, h in zip(adapters, health, strict=True)]
        tasks.append(asyncio.create_task(_log_health(health, publisher, health_every_s), name="health"))
        logger.info("ingesting from %d connections", len(adapters))
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    logger.info("ingest stopped after publishing %d readings", publisher.published)


async def _log_health(health: list[ConnectionHealth], publisher: Publisher, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        for connection in health:
            logger.info("connection health", extra={"fields": {"event": "ingest-health", **connection.report()}})
        logger.info(
            "publisher health", extra={"fields": {"event": "publisher-health", "published": publisher.published}}
        )
