"""The batching publisher between adapters and the broker: one broker round trip per batch."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence

from app.adapters.base import Adapter
from app.adapters.modbus import ModbusAdapter
from app.adapters.mqtt import MqttAdapter, MqttConnection
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
        else:
            adapters.append(ModbusAdapter(c))
    return adapters


async def run_ingest(site: Site, broker: Broker, stop: asyncio.Event, credentials: Mapping[str, str]) -> None:
    """Register the site's wells, run every adapter into one publisher until `stop`, then flush."""
    for tenant, wells in site.registry().items():
        await broker.register_wells(tenant, wells)
    adapters = adapters_for(site, credentials)
    async with Publisher(broker) as publisher:
        tasks = [asyncio.create_task(adapter.run(publisher), name=adapter.name) for adapter in adapters]
        logger.info("ingesting from %d connections", len(tasks))
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    logger.info("ingest stopped after publishing %d readings", publisher.published)
