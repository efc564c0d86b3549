"""The batching publisher: order kept, nothing dropped on exit, retries while Redis is down."""

from __future__ import annotations

import asyncio
from pathlib import Path

import anyio
import pytest

from app.ingest.publisher import Publisher
from app.models import ZERO_ID, Reading, Topic
from app.streams.memory import memory_broker
from app.streams.redis import connect_redis
from tests.conftest import RedisServer, wait_until
from tests.factories import history
from tests.factories import make_reading as reading

pytestmark = pytest.mark.anyio

TOPIC = Topic("acme", "w1")


async def test_batches_keep_order_and_exit_publishes_everything_pending() -> None:
    broker = memory_broker()
    with anyio.fail_after(5):
        async with Publisher(broker.log, max_batch=64, max_delay_s=0.01) as publisher:
            for start in range(0, 1000, 7):
                await publisher.submit([reading(float(v)) for v in range(start, min(start + 7, 1000))])
        found = await history(broker.log, TOPIC, ZERO_ID, 2000)
        assert [Reading.from_json(e.data).value for e in found.events] == [float(v) for v in range(1000)]
        assert publisher.counters.published == 1000


async def test_readings_submitted_while_redis_is_down_arrive_in_order_once_it_is_back(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, appendonly=True)  # what was stored before the outage survives it
    server.start()
    try:
        with anyio.fail_after(20):
            async with connect_redis(server.url) as broker:
                async with Publisher(broker.log, max_batch=50, max_delay_s=0.005) as publisher:
                    await publisher.submit([reading(float(v)) for v in range(100)])
                    await asyncio.sleep(0.2)
                    server.stop()
                    await publisher.submit([reading(float(v)) for v in range(100, 300)])
                    await asyncio.sleep(0.5)  # publishing fails and is retried meanwhile
                    server.start()
                found = await history(broker.log, TOPIC, ZERO_ID, 1000)
        assert [Reading.from_json(e.data).value for e in found.events] == [float(v) for v in range(300)]
    finally:
        server.stop()


async def test_ingest_logs_each_connections_health(caplog: pytest.LogCaptureFixture) -> None:
    from app.ingest.sitefile import Site
    from app.ingest.worker import run_ingest

    caplog.set_level("INFO", logger="app.ingest.worker")
    site = Site.model_validate(
        {
            "tenants": {"acme": {"wells": ["w1"]}},
            "connections": [
                {"protocol": "simulator", "id": "sim", "tenant": "acme", "wells": ["w1"], "interval_s": 0.02}
            ],
        }
    )
    broker = memory_broker()
    stop = asyncio.Event()

    def health_lines() -> list[dict[str, object]]:
        lines = [getattr(r, "fields", {}) for r in caplog.records]
        return [fields for fields in lines if fields.get("event") == "ingest-health"]

    with anyio.fail_after(10):
        task = asyncio.create_task(run_ingest(site, broker, stop, {}, health_every_s=0.2))
        await wait_until(lambda: any(line.get("last_reading_age_s") is not None for line in health_lines()))
        stop.set()
        await task
    health = health_lines()
    assert health, "a health line per connection"
    assert health[-1]["connection"] == "sim"
    assert health[-1]["connected"] is True
    assert health[-1]["errors"] == 0
    readings = health[-1]["readings"]
    assert isinstance(readings, dict)
    assert sum(readings.values()) > 0
    assert health[-1]["last_reading_age_s"] is not None
    assert await broker.registry.has_well("acme", "w1")
