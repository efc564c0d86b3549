"""Stream counts released in batches: a thousand streams ending at once, some of them cancelled."""

from __future__ import annotations

import asyncio
import time

import anyio
import pytest
import redis

from app.auth.limits import StreamLimits
from app.models import Principal
from app.settings import LimitSettings
from app.streams.redis import RedisBroker, lease_key

pytestmark = pytest.mark.anyio

ROOMY = LimitSettings(
    streams_per_subject=100_000, streams_per_tenant=100_000, connects_per_s=100_000, connect_burst=100_000
)


async def test_a_thousand_streams_ending_at_once_are_all_uncounted_even_if_cancelled(redis_url: str) -> None:
    principal = Principal(subject="tester", tenant="acme", expires_at=time.time() + 600)
    with anyio.fail_after(30):
        async with RedisBroker.connect(redis_url, max_connections=4) as broker:
            limits = StreamLimits(ROOMY, broker)
            await limits.start()
            try:
                leases = [await limits.admit(principal) for _ in range(1000)]
                with redis.Redis.from_url(redis_url) as client:
                    assert client.zcard(lease_key("{acme}:tenant")) == 1000
                releases = [asyncio.create_task(lease.release()) for lease in leases]
                await asyncio.sleep(0)
                for task in releases[::3]:
                    task.cancel()  # a server's shutdown cancelling some streams mid-release
                await asyncio.gather(*releases, return_exceptions=True)
                await asyncio.gather(*(lease.release() for lease in leases))  # twice is harmless
            finally:
                await limits.aclose()
            with redis.Redis.from_url(redis_url) as client:
                assert client.zcard(lease_key("{acme}:tenant")) == 0
            assert limits.open == 0


async def test_a_stream_counts_as_open_until_its_release_has_reached_redis(redis_url: str) -> None:
    principal = Principal(subject="tester", tenant="acme", expires_at=time.time() + 600)
    with anyio.fail_after(30):
        async with RedisBroker.connect(redis_url, max_connections=4) as broker:
            limits = StreamLimits(ROOMY, broker)
            await limits.start()
            try:
                first, _ = await limits.admit(principal), await limits.admit(principal)
                release = asyncio.create_task(first.release())
                await asyncio.sleep(0)  # the release is queued, not yet sent
                with redis.Redis.from_url(redis_url) as client:
                    assert client.zcard(lease_key("{acme}:tenant")) == 2
                assert limits.open == 2, "a caller waiting for 1 would race the release"
                await release
                with redis.Redis.from_url(redis_url) as client:
                    assert client.zcard(lease_key("{acme}:tenant")) == 1
                assert limits.open == 1
            finally:
                await limits.aclose()
