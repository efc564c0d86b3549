"""The command pool in front of a real Redis: callers take turns in order, and one that waits past
`pool_timeout_s` fails (a stream open then answers 503) instead of hanging."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from app.streams.redis.client import RedisClient, close_client, open_client

pytestmark = pytest.mark.anyio


def occupy(client: RedisClient, seconds: float) -> asyncio.Task[object]:
    """A blocking command holding one pooled connection for `seconds`."""

    async def hold() -> object:
        return await client.blpop(["never"], timeout=seconds)

    return asyncio.create_task(hold())


async def test_callers_are_served_in_the_order_they_asked_each_round_trip(redis_url: str) -> None:
    client = open_client(redis_url, max_connections=1, timeout_s=5)
    try:
        holder = occupy(client, 0.3)  # the one connection, busy
        await asyncio.sleep(0.05)
        served: list[int] = []

        async def caller(n: int) -> None:  # three round trips, as a stream open makes
            for _ in range(3):
                await client.rpush("order", n)
            served.append(n)

        callers = []
        for n in range(20):
            callers.append(asyncio.create_task(caller(n)))
            await asyncio.sleep(0)  # each asks before the next
        await asyncio.gather(holder, *callers)
        # Each round trip queues behind every caller already waiting: none is passed by one that
        # comes back for its next command (redis-py's own pool let it, and late callers waited out
        # the pool timeout under a burst of opens).
        assert [int(v) for v in await client.lrange("order", 0, -1)] == list(range(20)) * 3
        assert served == list(range(20))
    finally:
        await close_client(client)


async def test_a_caller_waiting_past_the_pool_timeout_fails_instead_of_hanging(redis_url: str) -> None:
    client = open_client(redis_url, max_connections=1, timeout_s=5, pool_timeout_s=0.2)
    try:
        holder = occupy(client, 3)
        await asyncio.sleep(0.05)
        with pytest.raises(RedisConnectionError, match="No connection available"):
            await client.ping()
        holder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await holder
    finally:
        await close_client(client)
