"""The Redis connection every store shares, its error mapping, and its server-side scripts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from app.errors import BrokerError

# Either kind: every store speaks to both, keeping each call inside one hash slot.
RedisClient = Redis | RedisCluster


@contextlib.contextmanager
def redis_errors(action: str) -> Iterator[None]:
    """A redis-py or socket error leaves app/streams/ only as BrokerError."""
    try:
        yield
    except (RedisError, RedisClusterException, OSError) as exc:  # the cluster's own errors are no RedisError
        raise BrokerError(action, str(exc)) from exc


def script(client: RedisClient, name: str, *, after: tuple[str, ...] = ()) -> AsyncScript:
    """The Lua script `<name>.lua` next to this module, registered on `client` (EVALSHA, loaded on demand).

    `after`: scripts whose definitions it uses (clock.lua, say), placed before it in one source.
    """
    files = resources.files(__package__)
    source = "\n".join(files.joinpath(f"{part}.lua").read_text(encoding="utf-8") for part in (*after, name))
    return client.register_script(source)


class FairConnectionPool(aioredis.BlockingConnectionPool):
    """redis-py's blocking pool, handing its connections out in the order they were asked for.

    redis-py's own lets a caller that arrives just as a connection comes back take it ahead of
    those already waiting, and a waiter it woke that lost that race waits again at the back. Under
    a burst of stream opens (5,000 at once while readings flow, three round trips each) most
    callers got a connection at once while hundreds waited out the pool's 10 s timeout and their
    streams were refused with a 503 (docs/performance.md, admission while publishing). A FIFO
    semaphore in front lets at most `max_connections` callers into the pool, so it never blocks
    and no caller is passed: the longest wait is the queue ahead of it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._turns = asyncio.Semaphore(self.max_connections)  # FIFO: no barging since Python 3.11.1

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        try:
            async with asyncio.timeout(self.timeout):
                await self._turns.acquire()
        except TimeoutError:
            raise RedisConnectionError("No connection available.") from None  # what the pool itself raises
        try:
            connection: AbstractConnection = await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except BaseException:
            self._turns.release()
            raise
        return connection

    async def release(self, connection: AbstractConnection) -> None:
        try:
            await super().release(connection)
        finally:
            self._turns.release()


def open_client(url: str, max_connections: int, timeout_s: float, cluster: bool = False) -> RedisClient:
    """`timeout_s` bounds every command and connect, so a frozen Redis (SIGSTOP, a dead host
    without a RST) turns into a BrokerError instead of a request that hangs for ever.

    `cluster`: `url` names any one node of a Redis Cluster; the client finds the rest and
    follows slot moves and failovers for commands (MOVED, ASK, a refreshed slot map).
    """
    if cluster:
        return RedisCluster.from_url(
            url,
            # Per node, and over it redis-py fails a command instead of waiting: a burst of stream
            # opens must not turn into 503s, so the bound is generous.
            max_connections=max(max_connections, 1024),
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            decode_responses=False,
        )
    # A blocking pool: a burst of stream opens waits, in turn, for one of a bounded set of
    # connections instead of failing with "Too many connections".
    pool = FairConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=10,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
    )
    return aioredis.Redis(connection_pool=pool, decode_responses=False, health_check_interval=10)
