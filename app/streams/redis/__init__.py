"""The Redis broker: every store of app/streams/seams.py on one standalone Redis.

`async with connect_redis(url) as broker:` is the usual way to get one. The layout is in
keys.py (and docs/design.md); the server-side scripts are the .lua files next to this.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from app.streams.codec import MalformedValues
from app.streams.redis.client import RedisClient, close_client, open_client
from app.streams.redis.credentials import RedisRevocations, RedisSessions
from app.streams.redis.log import RedisStreamLog
from app.streams.redis.stores import RedisLeases, RedisRegistry, RedisTickets, RedisWorkerLeases
from app.streams.seams import Broker

__all__ = ["RedisHealth", "RedisStreamLog", "connect_redis"]


class RedisHealth:
    def __init__(self, client: RedisClient) -> None:
        self._client = client

    async def ready(self) -> bool:
        client = self._client
        try:
            if isinstance(client, RedisCluster):
                # Every primary, so a lost one (its slots unserved until a replica takes over) shows.
                answers = await asyncio.wait_for(client.ping(target_nodes=RedisCluster.PRIMARIES), timeout=2)
                return bool(answers)
            return bool(await asyncio.wait_for(client.ping(), timeout=2))
        except (RedisError, RedisClusterException, OSError, TimeoutError):
            return False


@contextlib.asynccontextmanager
async def connect_redis(
    url: str,
    max_len: int = 10_000,
    max_age_s: float = 0,
    max_connections: int = 32,
    timeout_s: float = 5.0,
    pool_timeout_s: float = 10.0,
    sentinel_password: str | None = None,
    ping_interval_s: float = 5.0,
    cluster: bool = False,
    min_replicas_ack: int | None = None,
) -> AsyncIterator[Broker]:
    """Every store on one connection pool, closed (live feeds first) on exit.

    `timeout_s` bounds every command and connect; `pool_timeout_s` a command's wait for its turn
    at one of the `max_connections` pooled connections; `sentinel_password` the Sentinels' own
    (a redis+sentinel:// URL's credentials are the primary's); `ping_interval_s` is the live feed's health
    check (three missed pongs: reconnect). `cluster`: `url` names any one node of a Redis Cluster.
    `min_replicas_ack`: replicas that must have a published batch before it counts as stored
    (None: 1 where the primary has replicas; replicas.py).
    """
    client = open_client(url, max_connections, timeout_s, cluster, pool_timeout_s, sentinel_password)
    malformed = MalformedValues()
    log = RedisStreamLog(client, max_len, max_age_s, ping_interval_s, malformed, min_replicas_ack, timeout_s / 2)
    try:
        yield Broker(
            log=log,
            registry=RedisRegistry(client, malformed),
            tickets=RedisTickets(client),
            sessions=RedisSessions(client),
            revocations=RedisRevocations(client),
            leases=RedisLeases(client),
            workers=RedisWorkerLeases(client, max_len, max_age_s),
            health=RedisHealth(client),
        )
    finally:
        await log.aclose()
        await close_client(client)
