"""The gateway through Redis going away for real: killed (and restarted from its AOF), or frozen.

Streams that stay connected must see every reading published while Redis was up, in order,
none twice: the hub fills the gap from the stream log before it goes live again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import httpx
import pytest

from app.models import StreamId
from app.streams.redis import connect_redis
from tests.conftest import GatewayProcess, RedisServer, gateway_process, wait_for_status, wait_until
from tests.faults.streams import (
    FAST_FEED,
    PacedPublisher,
    RecordingStream,
    assert_exactly_the_log,
    recording_streams,
    stream_log,
)

pytestmark = pytest.mark.anyio

WELLS = [f"w{i:02d}" for i in range(10)]


async def readyz(client: httpx.AsyncClient, base: str) -> int:
    return (await client.get(base + "/readyz", timeout=10)).status_code


@dataclass
class Scene:
    """A gateway process on the Redis under test, recording streams, and a paced publisher."""

    gateway: GatewayProcess
    client: httpx.AsyncClient
    streams: list[RecordingStream]
    publisher: PacedPublisher
    redis: RedisServer

    async def heartbeats_go_on(self) -> None:
        before = [s.heartbeats for s in self.streams]
        await wait_until(lambda: all(s.heartbeats > h for s, h in zip(self.streams, before, strict=True)))

    async def settle(self) -> dict[str, list[StreamId]]:
        """Let 200 more readings through, stop publishing, and wait until every stream has them all."""
        acked = self.publisher.acknowledged
        before = sum(map(len, acked.values()))
        await wait_until(lambda: sum(map(len, acked.values())) > before + 200)
        self.publisher.stop.set()
        for stream in self.streams:
            last = self.publisher.last_acknowledged(stream.well)
            await wait_until(lambda: bool(stream.ids) and stream.ids[-1] >= last)  # noqa: B023 - awaited at once
        await wait_for_status(self.gateway.url + "/readyz")
        return {well: stream_log(self.redis.port, well) for well in self.publisher.wells}


@contextlib.asynccontextmanager
async def flowing(redis: RedisServer, secret: str, token: str, wells: list[str], per_well: int) -> AsyncIterator[Scene]:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        gateway_process(secret, WELLSTREAM_REDIS_URL=redis.url, **FAST_FEED) as gateway,
        connect_redis(redis.url, timeout_s=1) as broker,
        httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=None)) as client,
        recording_streams(client, gateway.url, wells, per_well, headers) as streams,
    ):
        publisher = PacedPublisher(broker, wells)  # 10 readings every 50 ms: 200/s
        publishing = asyncio.create_task(publisher.run())
        try:
            await wait_until(lambda: all(len(s.ids) >= 10 for s in streams))
            yield Scene(gateway, client, streams, publisher, redis)
        finally:
            publisher.stop.set()
            await publishing


async def test_kill_9_of_redis_under_50_streams_loses_nothing_for_streams_that_stay_open(
    own_redis: RedisServer, secret: str, token
) -> None:
    with anyio.fail_after(90):
        async with flowing(own_redis, secret, token("acme"), WELLS, 5) as scene:
            publisher = scene.publisher
            own_redis.kill()
            refused_before = publisher.refused
            await wait_until(lambda: publisher.refused > refused_before + 5)  # the publisher saw it too
            assert await readyz(scene.client, scene.gateway.url) == 503
            await scene.heartbeats_go_on()
            own_redis.start()
            logs = await scene.settle()
    for stream in scene.streams:
        assert not stream.ended, "the stream stayed open through the outage"
        assert_exactly_the_log(stream, logs[stream.well])
        assert set(publisher.acknowledged[stream.well]) <= set(stream.ids)


async def test_a_frozen_redis_is_detected_by_the_health_check_and_the_gap_filled_after_sigcont(
    own_redis: RedisServer, secret: str, token
) -> None:
    with anyio.fail_after(90):
        async with flowing(own_redis, secret, token("acme"), WELLS[:5], 2) as scene:
            own_redis.freeze()
            # Frozen, the TCP connections stay up: only the health check can tell.
            await wait_for_status(scene.gateway.url + "/readyz", status=503)
            await scene.heartbeats_go_on()
            own_redis.thaw()
            logs = await scene.settle()
    for stream in scene.streams:
        assert not stream.ended, "the stream stayed open through the freeze"
        assert_exactly_the_log(stream, logs[stream.well])
