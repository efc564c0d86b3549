"""The feed audit on a real redis-server: a subscription lost while its connection stays up is repaired."""

from __future__ import annotations

import asyncio

import anyio
import pytest
import redis.asyncio

from app.gateway.hub import Hub
from app.gateway.subscriber import Subscriber
from app.models import StreamId
from app.streams.redis import connect_redis
from app.streams.redis.feed import RedisFeed
from app.streams.redis.keys import channel_name, clock_key
from tests.conftest import wait_until
from tests.factories import make_reading

pytestmark = pytest.mark.anyio


async def writer(sub: Subscriber, got: list[StreamId]) -> None:
    """What a stream's writer does with its queue, minus the socket: every send completes."""
    loop = asyncio.get_running_loop()
    while sub.end_reason is None:
        await sub.wait()
        frames, _ = sub.take_frames()
        got.extend(frame.id for frame in frames)
        sub.sent(loop.time())


async def test_a_subscription_lost_while_connected_is_repaired_and_no_reading_is_missed(redis_url: str) -> None:
    with anyio.fail_after(30):
        async with connect_redis(redis_url) as broker, Hub(broker.log, stall_s=1.0, heartbeat_s=10) as hub:
            sub = await hub.subscribe("audit", frozenset({"w1"}))
            got: list[StreamId] = []
            taking = asyncio.create_task(writer(sub, got))
            published = await broker.log.publish([make_reading(0.0, tenant="audit")])
            await wait_until(lambda: got == published)
            feed = hub._feed
            assert isinstance(feed, RedisFeed)
            assert feed._conn is not None
            # What a slot moving on Redis Cluster does to a sharded subscription (and what a
            # bookkeeping bug could do): the subscription is gone, the connection stays up.
            await feed._conn.send_command("SUNSUBSCRIBE", channel_name("audit"))
            for value in range(1, 40):
                published += await broker.log.publish([make_reading(float(value), tenant="audit")])
                await asyncio.sleep(0.1)
            await wait_until(lambda: len(got) >= len(published))
            assert got == published, "every reading once, in order, on the stream that stayed open"
            assert sub.end_reason is None
            assert (hub.stats.feed_silences, hub.feed_reconnects, hub.stats.silent) == (1, 1, 0)
            sub.end("client-closed")
            await taking
            await hub.unsubscribe(sub)


async def test_a_feed_that_delivers_is_left_alone_by_the_audit(redis_url: str) -> None:
    # The other side of the check: tenants that publish and tenants that are quiet, rounds that
    # fall between a publish and its delivery, and nothing counts as lost.
    with anyio.fail_after(30):
        async with connect_redis(redis_url) as broker, Hub(broker.log, stall_s=0.3, heartbeat_s=10) as hub:
            subs = [await hub.subscribe(tenant, None) for tenant in ("busy", "quiet")]
            got: list[StreamId] = []
            ignored: list[StreamId] = []
            tasks = [asyncio.create_task(writer(subs[0], got)), asyncio.create_task(writer(subs[1], ignored))]
            published: list[StreamId] = []
            for value in range(60):
                published += await broker.log.publish([make_reading(float(value), tenant="busy")])
                await asyncio.sleep(0.03)
            await wait_until(lambda: got == published)
            assert (hub.stats.feed_silences, hub.feed_reconnects) == (0, 0)
            for sub in subs:
                sub.end("client-closed")
            await asyncio.gather(*tasks)
            for sub in subs:
                await hub.unsubscribe(sub)


async def test_a_malformed_message_of_another_producer_is_not_taken_for_a_lost_subscription(redis_url: str) -> None:
    # Another producer following the layout: the clock moved past an id whose live message the
    # gateway skipped as malformed. It arrived; restarting the feed for it would refill every tenant.
    with anyio.fail_after(30):
        async with connect_redis(redis_url) as broker, Hub(broker.log, stall_s=0.3, heartbeat_s=10) as hub:
            sub = await hub.subscribe("foreign", frozenset({"w1"}))
            [good] = await broker.log.publish([make_reading(1.0, tenant="foreign")])
            await wait_until(lambda: bool(sub.frames))
            await asyncio.sleep(0.7)  # the audit has read this tenant's clock: what follows is checked
            client = redis.asyncio.Redis.from_url(redis_url)
            bad = StreamId(good.ms + 1, 0)
            await client.set(clock_key("foreign"), str(bad))
            await client.spublish(channel_name("foreign"), f"{bad} not a reading")
            await wait_until(lambda: hub.malformed.get("live", 0) >= 1)
            await asyncio.sleep(1.5)  # several audit rounds after it: each must count it as arrived
            assert (hub.stats.feed_silences, hub.feed_reconnects) == (0, 0)
            await client.aclose()
            sub.end("client-closed")
            await hub.unsubscribe(sub)
