"""Catch-up paths of one stream, driven directly on the memory broker and a real hub."""

from __future__ import annotations

import anyio
import pytest

from app.gateway.eventstream import EventStream
from app.gateway.hub import Hub
from app.models import StreamId, Topic
from app.settings import HistorySettings, StreamSettings
from app.streams.memory import memory_broker
from tests.factories import make_reading as reading

pytestmark = pytest.mark.anyio

TOPIC = Topic("acme", "w1")


async def test_trimming_that_overtakes_a_paged_replay_is_reported_not_skipped() -> None:
    broker = memory_broker(max_len=100)
    with anyio.fail_after(5):
        async with Hub(broker.log) as hub:
            ids: list[StreamId] = await broker.log.publish([reading(float(i)) for i in range(100)])
            stream = EventStream(
                hub, broker.log, TOPIC, ids[10], None, StreamSettings(), HistorySettings(replay_page=10)
            )
            sub = await hub.subscribe(TOPIC)
            pages = stream._catch_up(sub)
            first = await anext(pages)
            assert first.count(b"event: reading") == 10
            await broker.log.publish([reading(float(i)) for i in range(100, 250)])  # trims what is not sent yet
            second = await anext(pages)
            assert second.startswith(b"event: reset")
            assert b"event: snapshot" in second
            with pytest.raises(StopAsyncIteration):
                await anext(pages)
            await hub.unsubscribe(sub)


async def test_unreadable_entries_are_skipped_and_the_replay_goes_on(redis_url: str) -> None:
    import redis.asyncio as aioredis

    from app.streams.redis import connect_redis
    from app.streams.redis.keys import log_key

    with anyio.fail_after(5):
        async with connect_redis(redis_url) as broker:
            client = aioredis.Redis.from_url(redis_url)
            first = await broker.log.publish([reading(1.0)])
            await client.xadd(log_key(TOPIC), {"r": b"not json"})
            await client.xadd(log_key(TOPIC), {"other": b"x"})
            last = await broker.log.publish([reading(2.0)])
            found = await broker.log.history(TOPIC, first[0], 1)
            assert found.events == []
            assert found.cursor > first[0], "the cursor moves past what it skipped"
            found = await broker.log.history(TOPIC, first[0], 10)
            assert [e.id for e in found.events] == last
            await client.aclose()
