"""Which broker a process runs on, chosen once from the settings."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from app.settings import Settings
from app.streams.memory import memory_broker
from app.streams.redis import connect_redis
from app.streams.seams import Broker


@contextlib.asynccontextmanager
async def open_broker(settings: Settings) -> AsyncIterator[Broker]:
    """The Redis broker when `redis_url` is set, else the embedded memory broker."""
    history = settings.history
    if not settings.redis_url:
        yield memory_broker(history.max_len, history.max_age_s)
        return
    redis = settings.redis
    async with connect_redis(
        settings.redis_url,
        history.max_len,
        history.max_age_s,
        timeout_s=redis.timeout_s,
        ping_interval_s=redis.ping_interval_s,
        max_connections=redis.max_connections,
        pool_timeout_s=redis.pool_timeout_s,
        sentinel_password=redis.sentinel_password.get_secret_value() if redis.sentinel_password else None,
        cluster=redis.cluster,
        min_replicas_ack=redis.min_replicas_ack,
    ) as broker:
        yield broker
