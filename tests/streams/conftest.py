"""Each seam's conformance suite runs on every backend: the memory broker, a real redis-server and a
real six-node Redis Cluster (tests/cluster.py).

`backend.advance(s)` moves time on: the memory broker's injected clocks jump, Redis (whose TTLs and
trimming use the server's own clock) is waited for. An assertion that something expired can then
only fail, never pass, if the wait was too short.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from app.streams.memory import memory_broker
from app.streams.redis import connect_redis
from app.streams.seams import Broker
from tests.cluster import LocalCluster


class FakeClock:
    """Real time plus an offset that `advance` grows: ids still increase as they would."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset_s

    def epoch_ms(self) -> int:
        return int((time.time() + self.offset_s) * 1000)


@dataclass
class Backend:
    kind: str
    open: Callable[..., contextlib.AbstractAsyncContextManager[Broker]]
    clock: FakeClock | None

    async def advance(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.offset_s += seconds
        else:
            await asyncio.sleep(seconds)


@pytest.fixture(params=["memory", "redis", "cluster"])
def kind(request: pytest.FixtureRequest) -> str:
    """Every seam's suite runs on the memory broker, one redis-server, and a six-node Redis Cluster."""
    return str(request.param)


@pytest.fixture
def url(kind: str, request: pytest.FixtureRequest) -> str:
    """Only the variant that needs a server starts (and flushes) it."""
    if kind == "cluster":
        cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        return cluster.startup_url
    return str(request.getfixturevalue("redis_url")) if kind == "redis" else ""


@pytest.fixture
def backend(kind: str, url: str) -> Backend:
    if kind in ("redis", "cluster"):

        @contextlib.asynccontextmanager
        async def open_redis(max_len: int = 10_000, max_age_s: float = 0) -> AsyncIterator[Broker]:
            async with connect_redis(url, max_len=max_len, max_age_s=max_age_s, cluster=kind == "cluster") as broker:
                yield broker

        return Backend(kind, open_redis, None)
    clock = FakeClock()

    @contextlib.asynccontextmanager
    async def open_memory(max_len: int = 10_000, max_age_s: float = 0) -> AsyncIterator[Broker]:
        yield memory_broker(max_len, max_age_s, clock=clock.epoch_ms, monotonic=clock.monotonic)

    return Backend(kind, open_memory, clock)
