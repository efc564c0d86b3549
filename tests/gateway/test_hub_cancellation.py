"""Clients that go away mid-subscribe must not disturb anyone else (regressions from review)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from app.gateway.hub import Hub
from app.streams.redis import connect_redis
from app.streams.seams import Broker
from tests.conftest import RedisServer, wait_until
from tests.factories import make_reading

pytestmark = pytest.mark.anyio


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own: it gets frozen with SIGSTOP."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@contextlib.asynccontextmanager
async def started_hub(url: str) -> AsyncIterator[tuple[Hub, Broker]]:
    async with connect_redis(url) as broker, Hub(broker.log) as hub:
        yield hub, broker


@pytest.mark.parametrize("yields", range(6))
async def test_a_subscribe_cancelled_at_any_step_leaves_the_feed_and_other_streams_alone(
    redis_url: str, yields: int
) -> None:
    with anyio.fail_after(10):
        async with started_hub(redis_url) as (hub, broker):
            steady = await hub.subscribe("acme", frozenset({"w1"}))
            leaving = asyncio.create_task(hub.subscribe("globex", frozenset({"w2"})))  # a new upstream subscription
            for _ in range(yields):
                await asyncio.sleep(0)
            leaving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await hub.unsubscribe(await leaving)
            # A reading published now arrives on the same connection only if the feed was left alone.
            [marker] = await broker.log.publish([make_reading(1.0)])
            await wait_until(lambda: bool(steady.frames))
            assert steady.frames[0].id == marker
            assert steady.end_reason is None
            assert hub._feed is not None
            assert hub.feed_reconnects == 0
            assert hub.tenants == 1
            late = await hub.subscribe("globex", frozenset({"w2"}))  # the channel still works
            await hub.unsubscribe(late)
            await hub.unsubscribe(steady)


async def test_the_first_subscriber_leaving_does_not_fail_those_waiting_with_it(own_redis: RedisServer) -> None:
    assert own_redis.process is not None
    with anyio.fail_after(15):
        async with started_hub(own_redis.url) as (hub, _):
            os.kill(own_redis.process.pid, signal.SIGSTOP)  # confirmations now wait
            try:
                first = asyncio.create_task(hub.subscribe("acme", frozenset({"w9"})))
                await wait_until(lambda: hub.open_streams == 1)
                joiner = asyncio.create_task(hub.subscribe("acme", frozenset({"w9"})))
                await wait_until(lambda: hub.open_streams == 2)
                first.cancel()
                await wait_until(lambda: hub.open_streams == 1)  # the first one has left
            finally:
                os.kill(own_redis.process.pid, signal.SIGCONT)
            sub = await joiner
            assert sub.end_reason is None
            assert hub.open_streams == 1
            with contextlib.suppress(asyncio.CancelledError):
                await first
            await hub.unsubscribe(sub)
            assert hub.tenants == 0
