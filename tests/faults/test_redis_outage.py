"""The gateway through Redis going away for real: killed (and restarted from its AOF), or frozen.

Streams that stay connected must see every reading published while Redis was up, in order,
none twice: the hub fills the gap from the stream log before it goes live again.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import anyio
import httpx
import pytest

from app.streams.redis import RedisBroker
from tests.conftest import RedisServer, gateway_process, wait_until
from tests.faults.streams import (
    PacedPublisher,
    RecordingStream,
    assert_exactly_the_log,
    recording_streams,
    stream_log,
)

pytestmark = pytest.mark.anyio

WELLS = [f"w{i:02d}" for i in range(10)]
# Fast health checks so the test sees an outage in about a second; production keeps the defaults.
FAST = {
    "WELLSTREAM_REDIS__PING_INTERVAL_S": "0.3",
    "WELLSTREAM_REDIS__TIMEOUT_S": "1",
    "WELLSTREAM_STREAM__HEARTBEAT_S": "0.5",
}


async def readyz(client: httpx.AsyncClient, base: str) -> int:
    return (await client.get(base + "/readyz", timeout=10)).status_code


async def until_readyz(client: httpx.AsyncClient, base: str, status: int) -> None:
    while await readyz(client, base) != status:  # noqa: ASYNC110 - another process's state
        await asyncio.sleep(0.05)


async def caught_up(streams: list[RecordingStream], publisher: PacedPublisher) -> None:
    """Until every stream has received the newest reading acknowledged for its well."""
    for stream in streams:
        last = publisher.last_acknowledged(stream.well)
        await wait_until(lambda: bool(stream.ids) and stream.ids[-1] >= last)  # noqa: B023 - awaited at once


@pytest.fixture
def aof_redis(tmp_path: Path):
    # appendfsync always: what Redis acknowledged is on disk when it is killed, as the test expects.
    server = RedisServer(tmp_path, appendonly=True, appendfsync="always")
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.thaw()  # a frozen process cannot act on SIGTERM
    server.stop()


async def test_kill_9_of_redis_under_50_streams_loses_nothing_for_streams_that_stay_open(
    aof_redis: RedisServer, secret: str, token
) -> None:
    headers = {"Authorization": f"Bearer {token('acme')}"}
    stop = asyncio.Event()
    with anyio.fail_after(90):
        async with (
            gateway_process(secret, WELLSTREAM_REDIS_URL=aof_redis.url, **FAST) as gateway,
            RedisBroker.connect(aof_redis.url, timeout_s=1) as broker,
            httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=None)) as client,
            recording_streams(client, gateway.url, WELLS, 5, headers) as streams,
        ):
            publisher = PacedPublisher(broker, WELLS)  # 10 readings every 50 ms: 200/s
            publishing = asyncio.create_task(publisher.run(stop))
            await wait_until(lambda: all(len(s.ids) >= 10 for s in streams))

            aof_redis.kill()
            refused_before = publisher.refused
            await wait_until(lambda: publisher.refused > refused_before + 5)  # the publisher saw it too
            assert await readyz(client, gateway.url) == 503
            heartbeats = [s.heartbeats for s in streams]
            await wait_until(lambda: all(s.heartbeats > h for s, h in zip(streams, heartbeats, strict=True)))

            aof_redis.start()
            await wait_until(lambda: bool(publisher.acknowledged.get(WELLS[0])))
            acked_before = sum(map(len, publisher.acknowledged.values()))
            await wait_until(lambda: sum(map(len, publisher.acknowledged.values())) > acked_before + 200)
            stop.set()
            await publishing
            await caught_up(streams, publisher)
            await until_readyz(client, gateway.url, 200)
            logs = {well: stream_log(aof_redis.port, well) for well in WELLS}
    assert publisher.refused > 0, "Redis was really down while the publisher ran"
    for stream in streams:
        assert not stream.ended, "the stream stayed open through the outage"
        assert_exactly_the_log(stream, logs[stream.well])
        acknowledged = set(publisher.acknowledged[stream.well])
        assert acknowledged <= set(stream.ids) | {i for i in acknowledged if i <= (stream.snapshot_id or i)}


async def test_a_frozen_redis_is_detected_by_the_health_check_and_the_gap_filled_after_sigcont(
    aof_redis: RedisServer, secret: str, token
) -> None:
    headers = {"Authorization": f"Bearer {token('acme')}"}
    stop = asyncio.Event()
    with anyio.fail_after(90):
        async with (
            gateway_process(secret, WELLSTREAM_REDIS_URL=aof_redis.url, **FAST) as gateway,
            RedisBroker.connect(aof_redis.url, timeout_s=1) as broker,
            httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=None)) as client,
            recording_streams(client, gateway.url, WELLS[:5], 2, headers) as streams,
        ):
            publisher = PacedPublisher(broker, WELLS[:5])
            publishing = asyncio.create_task(publisher.run(stop))
            await wait_until(lambda: all(len(s.ids) >= 10 for s in streams))

            aof_redis.freeze()
            # Frozen, the TCP connections stay up: only the health check can tell.
            await until_readyz(client, gateway.url, 503)
            heartbeats = [s.heartbeats for s in streams]
            await wait_until(lambda: all(s.heartbeats > h for s, h in zip(streams, heartbeats, strict=True)))
            aof_redis.thaw()

            acked_before = sum(map(len, publisher.acknowledged.values()))
            await wait_until(lambda: sum(map(len, publisher.acknowledged.values())) > acked_before + 200)
            stop.set()
            await publishing
            await caught_up(streams, publisher)
            await until_readyz(client, gateway.url, 200)
            logs = {well: stream_log(aof_redis.port, well) for well in WELLS[:5]}
            gateway.process.send_signal(signal.SIGTERM)
    for stream in streams:
        assert not stream.ended or stream.last_block is not None
        assert_exactly_the_log(stream, logs[stream.well])
