"""Gateways going away on purpose: SIGTERM under 1,000 streams, and streams retired by age."""

from __future__ import annotations

import asyncio
import signal

import anyio
import httpx
import pytest

from app.settings import StreamSettings
from app.streams.redis import connect_redis
from app.streams.redis.keys import lease_key
from tests.conftest import gateway_process, make_settings, running_gateway, wait_until
from tests.faults.streams import PacedPublisher, assert_exactly_the_log, recording_streams, stream_log
from tests.sse_client import SSEReader

pytestmark = pytest.mark.anyio

WELLS = [f"w{i:02d}" for i in range(10)]
TENANT_LEASES = lease_key("{acme}:tenant")


async def test_sigterm_under_1000_streams_ends_all_with_a_retry_and_a_second_gateway_fills_in(
    redis_url: str, redis_server, secret: str, token
) -> None:
    headers = {"Authorization": f"Bearer {token('acme')}"}
    limits = httpx.Limits(max_connections=None)
    grace = {"WELLSTREAM_STREAM__SHUTDOWN_GRACE_S": "5", "WELLSTREAM_STREAM__SHUTDOWN_RETRY_SPREAD_MS": "3000"}
    with anyio.fail_after(120):
        async with (
            gateway_process(secret, WELLSTREAM_REDIS_URL=redis_url, **grace) as first,
            gateway_process(secret, WELLSTREAM_REDIS_URL=redis_url) as second,
            connect_redis(redis_url) as broker,
            httpx.AsyncClient(timeout=60, limits=limits) as client,
        ):
            # 20 readings/s over 10 wells: each reaches 100 streams, 2,000 events/s to parse here.
            publisher = PacedPublisher(broker, WELLS, per_tick=2, tick_s=0.1)
            async with recording_streams(client, first.url, WELLS, 100, headers) as streams:
                publishing = asyncio.create_task(publisher.run())
                await wait_until(lambda: all(len(s.ids) >= 2 for s in streams))
                first.process.send_signal(signal.SIGTERM)
                await wait_until(lambda: all(s.ended for s in streams))
                assert await asyncio.wait_for(first.process.wait(), 30) == 0
                with redis_server.client() as r:
                    # The stopped gateway uncounted its 1,000 streams on the way out, so they do
                    # not hold the tenant's cap for a lease TTL while the clients come back.
                    assert r.zcard(TENANT_LEASES) == 0
                goodbyes = [s.last_block for s in streams]
                # Like an EventSource: come back with the last id, here to the gateway still up.
                tasks = [
                    asyncio.create_task(s.run(client, f"{second.url}/tenants/acme/wells/{s.well}/stream", headers))
                    for s in streams
                ]
                await asyncio.sleep(0.5)  # readings keep coming while the clients move
                publisher.stop.set()
                await publishing
                for stream in streams:
                    last = publisher.last_acknowledged(stream.well)
                    await wait_until(lambda: bool(stream.ids) and stream.ids[-1] >= last)  # noqa: B023
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            logs = {well: stream_log(redis_server.port, well) for well in WELLS}
    for goodbye in goodbyes:
        assert goodbye is not None
        assert goodbye.retry is not None, "every stream got a retry hint"
        assert "shutting down" in " ".join(goodbye.comments)
    assert len({g.retry for g in goodbyes if g is not None}) > 100, "retry hints spread the reconnects"
    for stream in streams:
        assert_exactly_the_log(stream, logs[stream.well])


async def test_streams_past_their_maximum_age_end_with_a_spread_retry_and_resume(
    redis_url: str, secret: str, token
) -> None:
    headers = {"Authorization": f"Bearer {token('acme')}"}
    settings = make_settings(secret, redis_url=redis_url, stream=StreamSettings(max_age_s=1, heartbeat_s=0.2))
    with anyio.fail_after(30):
        async with running_gateway(settings) as gateway, httpx.AsyncClient(timeout=10) as client:

            async def one() -> list[str]:
                url = f"{gateway.url}/tenants/acme/wells/w1/stream"
                async with client.stream("GET", url, headers=headers) as response:
                    return [" ".join(b.comments) + f" retry={b.retry}" async for b in SSEReader(response)]

            results = await asyncio.gather(*(one() for _ in range(20)))
    for blocks in results:
        assert "maximum age" in blocks[-1]
        assert "retry=None" not in blocks[-1]
    assert len({blocks[-1] for blocks in results}) > 1, "retry hints are jittered"
