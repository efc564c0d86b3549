"""The lease store's conformance suite, on the memory broker and a real redis-server."""

from __future__ import annotations

import anyio
import pytest

from tests.streams.conftest import Backend

pytestmark = pytest.mark.anyio


async def test_leases_count_across_callers_until_released(backend: Backend) -> None:
    with anyio.fail_after(5):
        async with backend.open() as broker:
            counters = [("{acme}:tenant", 3), ("{acme}:sub:s1", 2)]
            assert await broker.leases.acquire(counters, "g1:1", ttl_s=30) is None
            assert await broker.leases.acquire(counters, "g2:1", ttl_s=30) is None
            assert await broker.leases.acquire(counters, "g1:2", ttl_s=30) == 1, "the subject's counter is full"
            other = [("{acme}:tenant", 3), ("{acme}:sub:s2", 2)]
            assert await broker.leases.acquire(other, "g1:3", ttl_s=30) is None
            assert await broker.leases.acquire(other, "g1:4", ttl_s=30) == 0, "the tenant's counter is full"
            await broker.leases.release([(key, "g1:1") for key, _ in counters])
            assert await broker.leases.acquire(counters, "g1:5", ttl_s=30) is None, "released, so there is room"


async def test_a_renewed_lease_still_counts_after_its_first_ttl(backend: Backend) -> None:
    with anyio.fail_after(5):
        async with backend.open() as broker:
            counters = [("{acme}:tenant", 1)]
            # A first TTL with room for a busy machine (and a cluster client's first script load)
            # between the acquire and the renew.
            assert await broker.leases.acquire(counters, "g1:1", ttl_s=1.0) is None
            await broker.leases.renew([("{acme}:tenant", "g1:1")], ttl_s=30)
            await backend.advance(1.2)
            assert await broker.leases.acquire(counters, "g1:2", ttl_s=30) == 0, "a renewed lease still counts"


async def test_a_lease_that_is_not_renewed_stops_counting(backend: Backend) -> None:
    with anyio.fail_after(5):
        async with backend.open() as broker:
            counters = [("{acme}:tenant", 1)]
            assert await broker.leases.acquire(counters, "dead-gateway:1", ttl_s=0.3) is None
            assert await broker.leases.acquire(counters, "g1:1", ttl_s=30) == 0
            await backend.advance(0.5)
            assert await broker.leases.acquire(counters, "g1:1", ttl_s=30) is None


async def test_renewing_a_released_lease_does_not_bring_it_back(backend: Backend) -> None:
    with anyio.fail_after(5):
        async with backend.open() as broker:
            counters = [("{acme}:tenant", 1)]
            assert await broker.leases.acquire(counters, "g1:1", ttl_s=30) is None
            await broker.leases.release([("{acme}:tenant", "g1:1")])
            await broker.leases.renew([("{acme}:tenant", "g1:1")], ttl_s=30)
            assert await broker.leases.acquire(counters, "g1:2", ttl_s=30) is None
