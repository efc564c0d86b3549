"""The Redis connection every store shares, its error mapping, and its server-side scripts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from importlib import resources
from typing import Any, NamedTuple
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.asyncio.client import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
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


HEALTH_CHECK_S = 10  # a pooled connection idle this long is PINGed before its next command


class _InTurn:
    """A FIFO semaphore in front of a redis-py pool: at most `max_connections` callers inside, served
    in the order they asked (see FairConnectionPool), each waiting at most `turn_timeout_s`."""

    max_connections: int
    turn_timeout_s = 10.0

    def _turns(self) -> asyncio.Semaphore:
        turns: asyncio.Semaphore | None = getattr(self, "_turn_semaphore", None)
        if turns is None:
            turns = self._turn_semaphore = asyncio.Semaphore(self.max_connections)  # FIFO since Python 3.11.1
        return turns

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        turns = self._turns()
        if turns.locked():  # a turn to wait for, bounded; else acquire() takes one without suspending
            try:
                async with asyncio.timeout(self.turn_timeout_s):
                    await turns.acquire()
            except TimeoutError:
                raise RedisConnectionError("No connection available.") from None  # what the pool itself raises
        else:
            await turns.acquire()  # no timer to arm and cancel on every command of an idle pool
        try:
            connection: AbstractConnection = await super().get_connection(*args, **kwargs)  # type: ignore[misc]
        except BaseException:
            turns.release()
            raise
        return connection

    async def release(self, connection: AbstractConnection) -> None:
        try:
            await super().release(connection)  # type: ignore[misc]
        finally:
            self._turns().release()


class FairConnectionPool(_InTurn, aioredis.BlockingConnectionPool):
    """redis-py's blocking pool, handing its connections out in the order they were asked for.

    redis-py's own lets a caller that arrives just as a connection comes back take it ahead of
    those already waiting, and a waiter it woke that lost that race waits again at the back. Under
    a burst of stream opens (5,000 at once while readings flow, three round trips each) most
    callers got a connection at once while hundreds waited out the pool's 10 s timeout and their
    streams were refused with a 503 (docs/performance.md, admission while publishing). A FIFO
    semaphore in front lets at most `max_connections` callers into the pool, so it never blocks
    and no caller is passed: the longest wait is the queue ahead of it.
    """


class FairSentinelPool(_InTurn, SentinelConnectionPool):
    """redis-py's Sentinel pool fails the command past `max_connections` ("Too many connections"):
    the same turns in front make a burst wait in order instead of answering 503."""


def open_client(
    url: str,
    max_connections: int,
    timeout_s: float,
    cluster: bool = False,
    pool_timeout_s: float = 10.0,
    sentinel_password: str | None = None,
) -> RedisClient:
    """`timeout_s` bounds every command and connect, so a frozen Redis (SIGSTOP, a dead host
    without a RST) turns into a BrokerError instead of a request that hangs for ever.

    `pool_timeout_s`: how long a command waits, in turn, for one of `max_connections` pooled
    connections before it fails (a stream open then answers 503 with a retry hint).
    `cluster`: `url` names any one node of a Redis Cluster; the client finds the rest and
    follows slot moves and failovers for commands (MOVED, ASK, a refreshed slot map).
    `redis+sentinel://host:port,host:port/<service>[/<db>]`: a primary watched by Redis
    Sentinel; every new connection asks the sentinels where the primary is now.
    """
    if url.startswith(SENTINEL_SCHEME):
        if cluster:
            raise ValueError("a redis+sentinel:// URL names one primary, not a cluster: unset redis.cluster")
        return _sentinel_client(url, max_connections, timeout_s, pool_timeout_s, sentinel_password)
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
        timeout=pool_timeout_s,  # never reached: the turns in front let only max_connections in
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        # A connection setting: given to Redis() beside a pool of our own it was ignored. A
        # connection idle this long is PINGed before its next command, so one a NAT or firewall
        # dropped without a word is replaced there, not failing the command it was handed.
        health_check_interval=HEALTH_CHECK_S,
    )
    pool.turn_timeout_s = pool_timeout_s
    return aioredis.Redis(connection_pool=pool, decode_responses=False)


SENTINEL_SCHEME = "redis+sentinel://"


class SentinelTarget(NamedTuple):
    sentinels: list[tuple[str, int]]
    service: str
    db: int = 0
    username: str | None = None  # the primary's ACL user and password (the sentinels take none)
    password: str | None = None


def parse_sentinel_url(url: str) -> SentinelTarget:
    """`redis+sentinel://[user:password@]host:port,host:port/<service>[/<db>]`, the user and
    password percent-encoded as in any URL; ValueError saying what is wrong."""
    rest = url.removeprefix(SENTINEL_SCHEME)
    username = password = None
    if "@" in rest:
        credentials, rest = rest.rsplit("@", 1)
        user, _, secret = credentials.partition(":")
        username, password = unquote(user) or None, unquote(secret) or None
    hosts, _, path = rest.partition("/")
    service, _, db = path.partition("/")
    if not hosts or not service:
        raise ValueError("a sentinel URL is redis+sentinel://host:port[,host:port...]/<service>[/<db>]")
    sentinels = []
    for item in hosts.split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"sentinel {item!r} is not host:port")
        sentinels.append((host.strip("[]"), int(port)))
    if db and not db.isdigit():
        raise ValueError(f"database {db!r} is not a number")
    return SentinelTarget(sentinels, unquote(service), int(db or 0), username, password)


def _sentinel_client(
    url: str, max_connections: int, timeout_s: float, pool_timeout_s: float, sentinel_password: str | None
) -> Redis:
    target = parse_sentinel_url(url)
    options: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if sentinel_password is not None:  # the sentinels' own requirepass; the URL's credentials are the primary's
        options["password"] = sentinel_password
    sentinel = Sentinel(
        target.sentinels, sentinel_kwargs=options, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
    )
    # redis-py's Sentinel pool, taken in turn: it finds the primary anew on every connect and
    # drops connections to a primary that was demoted (READONLY).
    client: Redis = sentinel.master_for(
        target.service,
        connection_pool_class=FairSentinelPool,
        db=target.db,
        username=target.username,
        password=target.password,
        max_connections=max_connections,
        health_check_interval=HEALTH_CHECK_S,
    )
    pool = client.connection_pool
    assert isinstance(pool, FairSentinelPool)
    pool.turn_timeout_s = pool_timeout_s
    return client


async def close_client(client: RedisClient) -> None:
    """Every connection of the client, its sentinels' included."""
    if isinstance(client, RedisCluster):
        await client.aclose()
        return
    pool = client.connection_pool
    await client.aclose(close_connection_pool=True)
    if isinstance(pool, SentinelConnectionPool):
        for sentinel in pool.sentinel_manager.sentinels:
            await sentinel.aclose(close_connection_pool=True)
