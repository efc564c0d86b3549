"""The live feed after Redis froze while a subscribe was in flight, with nothing else subscribed."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from app.gateway.hub import Hub
from app.streams.redis import connect_redis
from tests.conftest import RedisServer, wait_until
from tests.factories import make_reading

pytestmark = pytest.mark.anyio


async def test_a_subscribe_lost_in_a_freeze_does_not_delay_every_later_one(own_redis: RedisServer) -> None:
    # The SUBSCRIBE sent into the frozen Redis is never answered on the new connection; if its
    # waiter stayed in line, each later subscriber would get the previous one's reply and the
    # well could never be streamed again on this gateway.
    with anyio.fail_after(30):
        async with connect_redis(own_redis.url, timeout_s=0.5, ping_interval_s=0.2) as broker:
            async with Hub(broker.log) as hub:
                own_redis.freeze()
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(hub.subscribe("acme", frozenset({"w1"})), 0.5)
                assert hub.tenants == 0
                await wait_until(lambda: not hub.live)  # three missed pongs: the feed gave up on it
                own_redis.thaw()
                await wait_until(lambda: hub.live and hub.feed_reconnects >= 1)
                for value in (1.0, 2.0, 3.0):
                    sub = await asyncio.wait_for(hub.subscribe("acme", frozenset({"w1"})), 5)
                    await broker.log.publish([make_reading(value)])
                    await wait_until(lambda: bool(sub.frames))  # noqa: B023 - awaited at once
                    assert f'"value":{value}'.encode() in sub.frames[0].data
                    await hub.unsubscribe(sub)
