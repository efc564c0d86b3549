"""Stream counts released in batches: a thousand streams ending at once, some of them cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import anyio
import pytest
import redis

from app.auth.admission import StreamLimits
from app.models import Principal
from app.settings import LimitSettings
from app.streams.redis import connect_redis
from app.streams.redis.keys import lease_key

pytestmark = pytest.mark.anyio

ROOMY = LimitSettings(
    streams_per_subject=100_000, streams_per_tenant=100_000, connects_per_s=100_000, connect_burst=100_000
)

PRINCIPAL = Principal(subject="tester", tenant="acme", expires_at=time.time() + 86_400)


@contextlib.asynccontextmanager
async def started_limits(redis_url: str) -> AsyncIterator[StreamLimits]:
    async with connect_redis(redis_url, max_connections=4) as broker:
        async with StreamLimits(ROOMY, broker.leases) as limits:
            yield limits


def tenant_count(redis_url: str) -> int:
    with redis.Redis.from_url(redis_url) as client:
        return int(client.zcard(lease_key("{acme}:tenant")))


async def test_a_thousand_streams_ending_at_once_are_all_uncounted_even_if_cancelled(redis_url: str) -> None:
    with anyio.fail_after(30):
        async with started_limits(redis_url) as limits:
            leases = [await limits.admit(PRINCIPAL) for _ in range(1000)]
            assert tenant_count(redis_url) == 1000
            releases = [asyncio.create_task(lease.release()) for lease in leases]
            await asyncio.sleep(0)
            for task in releases[::3]:
                task.cancel()  # a server's shutdown cancelling some streams mid-release
            await asyncio.gather(*releases, return_exceptions=True)
            await asyncio.gather(*(lease.release() for lease in leases))  # twice is harmless
        assert tenant_count(redis_url) == 0
        assert limits.open == 0


async def test_a_stream_counts_as_open_until_its_release_has_reached_redis(redis_url: str) -> None:
    with anyio.fail_after(30):
        async with started_limits(redis_url) as limits:
            first, _ = await limits.admit(PRINCIPAL), await limits.admit(PRINCIPAL)
            release = asyncio.create_task(first.release())
            await asyncio.sleep(0)  # the release is queued, not yet sent
            assert tenant_count(redis_url) == 2
            assert limits.open == 2, "a caller waiting for 1 would race the release"
            await release
            assert tenant_count(redis_url) == 1
            assert limits.open == 1
