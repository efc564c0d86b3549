"""The Redis connection every store shares, its error mapping, and its server-side scripts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib import resources

import redis.asyncio as aioredis
from redis.asyncio.client import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from app.errors import BrokerError


@contextlib.contextmanager
def redis_errors(action: str) -> Iterator[None]:
    """A redis-py or socket error leaves app/streams/ only as BrokerError."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise BrokerError(action, str(exc)) from exc


def script(client: Redis, name: str, *, after: tuple[str, ...] = ()) -> AsyncScript:
    """The Lua script `<name>.lua` next to this module, registered on `client` (EVALSHA, loaded on demand).

    `after`: scripts whose definitions it uses (clock.lua, say), placed before it in one source.
    """
    files = resources.files(__package__)
    source = "\n".join(files.joinpath(f"{part}.lua").read_text(encoding="utf-8") for part in (*after, name))
    return client.register_script(source)


def open_client(url: str, max_connections: int, timeout_s: float) -> Redis:
    """`timeout_s` bounds every command and connect, so a frozen Redis (SIGSTOP, a dead host
    without a RST) turns into a BrokerError instead of a request that hangs for ever."""
    # A blocking pool: a burst of stream opens waits for one of a bounded set of connections
    # instead of failing with "Too many connections".
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=10,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
    )
    return aioredis.Redis(connection_pool=pool, decode_responses=False, health_check_interval=10)
