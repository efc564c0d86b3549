"""One conformance suite, run against the memory broker and a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import redis

from app.models import ZERO_ID, Origin, Reading, StreamEvent, StreamId, Topic
from app.streams.broker import Broker
from app.streams.memory import MemoryBroker
from app.streams.redis import RedisBroker, channel_name, latest_key, log_key
from tests.factories import make_reading as reading

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def open_broker(kind: str, redis_url: str, max_len: int = 10_000, max_age_s: float = 0) -> AsyncIterator[Broker]:
    if kind == "memory":
        broker = MemoryBroker(max_len=max_len, max_age_s=max_age_s)
        yield broker
        await broker.aclose()
    else:
        async with RedisBroker.connect(redis_url, max_len=max_len, max_age_s=max_age_s) as redis_broker:
            yield redis_broker


async def test_ids_increase_per_topic_and_history_returns_them_in_order(kind: str, url: str) -> None:
    with anyio.fail_after(5):
        async with open_broker(kind, url) as broker:
            ids = await broker.publish([reading(float(i)) for i in range(50)])
            ids += await broker.publish([reading(float(i)) for i in range(50, 100)])
            assert ids == sorted(ids)
            assert len(set(ids)) == 100
            found = await broker.history(Topic("acme", "w1"), ZERO_ID, 1000)
            assert [e.id for e in found.events] == ids
            assert [Reading.from_json(e.data).value for e in found.events] == [float(i) for i in range(100)]
            assert not found.truncated


async def test_history_after_an_id_is_exclusive_and_paged(kind: str, url: str) -> None:
    with anyio.fail_after(5):
        async with open_broker(kind, url) as broker:
            ids = await broker.publish([reading(float(i)) for i in range(30)])
            page = await broker.history(Topic("acme", "w1"), ids[9], 10)
            assert [e.id for e in page.events] == ids[10:20]
            rest = await broker.history(Topic("acme", "w1"), ids[-1], 10)
            assert rest.events == []
            assert not rest.truncated


async def test_snapshot_holds_latest_per_tag_and_newest_id(kind: str, url: str) -> None:
    with anyio.fail_after(5):
        async with open_broker(kind, url) as broker:
            empty = await broker.snapshot(Topic("acme", "w1"))
            assert empty.readings == {}
            assert empty.last_id == ZERO_ID
            await broker.publish([reading(1.0, "p"), reading(2.0, "t"), reading(3.0, "p")])
            ids = await broker.publish([reading(None, "t")])
            snap = await broker.snapshot(Topic("acme", "w1"))
            assert snap.last_id == ids[-1]
            assert {tag: Reading.from_json(data).value for tag, data in snap.readings.items()} == {"p": 3.0, "t": None}
            assert Reading.from_json(snap.readings["t"]).quality == "BAD"


async def test_tenants_with_the_same_well_id_are_kept_apart(kind: str, url: str) -> None:
    with anyio.fail_after(5):
        async with open_broker(kind, url) as broker:
            await broker.publish([reading(1.0, tenant="acme", well="w1"), reading(2.0, tenant="globex", well="w1")])
            acme = await broker.history(Topic("acme", "w1"), ZERO_ID, 10)
            globex = await broker.history(Topic("globex", "w1"), ZERO_ID, 10)
            assert [Reading.from_json(e.data).tenant_id for e in acme.events] == ["acme"]
            assert [Reading.from_json(e.data).tenant_id for e in globex.events] == ["globex"]
            assert await broker.wells("acme") == ["w1"]
            assert await broker.wells("nobody") == []


async def test_trimmed_history_is_reported_as_truncated(kind: str, url: str) -> None:
    with anyio.fail_after(5):
        async with open_broker(kind, url, max_len=10) as broker:
            ids: list[StreamId] = []
            for i in range(300):  # one by one, so Redis's approximate MAXLEN ~ gets to trim whole nodes
                ids += await broker.publish([reading(float(i))])
            topic = Topic("acme", "w1")
            assert (await broker.history(topic, ids[0], 1000)).truncated
            kept = await broker.history(topic, ids[-5], 1000)
            assert not kept.truncated
            assert [e.id for e in kept.events] == ids[-4:]
            future = StreamId(ids[-1].ms + 10_000, 0)
            assert (await broker.history(topic, future, 10)).truncated, "an id never issued is unknown, not current"


async def test_history_is_trimmed_by_age(kind: str, url: str) -> None:
    with anyio.fail_after(10):
        async with open_broker(kind, url, max_age_s=0.5) as broker:
            old = await broker.publish([reading(float(i)) for i in range(300)])
            await asyncio.sleep(0.7)
            new = await broker.publish([reading(1000.0)])
            topic = Topic("acme", "w1")
            assert (await broker.history(topic, old[0], 1000)).truncated
            found = await broker.history(topic, ZERO_ID, 1000)
            assert found.events[-1].id == new[0]
            assert len(found.events) < 100, "whole nodes of old entries are gone (Redis trims MINID ~ by node)"


async def test_live_feed_delivers_subscribed_topics_only_in_order(kind: str, url: str) -> None:
    with anyio.fail_after(5):
        async with open_broker(kind, url) as broker:
            got: list[tuple[Topic, StreamEvent]] = []
            twenty = asyncio.Event()

            def deliver(topic: Topic, event: StreamEvent) -> None:
                got.append((topic, event))
                if len(got) >= 20:
                    twenty.set()

            feed = await broker.open_feed(deliver)
            await feed.subscribe(Topic("acme", "w1"))
            ids = await broker.publish([reading(float(i)) for i in range(20)] + [reading(well="w2")])
            await twenty.wait()
            await asyncio.sleep(0.05)
            assert [event.id for _, event in got] == ids[:20]
            assert {topic for topic, _ in got} == {Topic("acme", "w1")}
            assert got[0][1].tag == "p"
            assert Reading.from_json(got[0][1].data).value == 0.0
            await feed.unsubscribe(Topic("acme", "w1"))
            await asyncio.sleep(0.05)
            await broker.publish([reading()])
            await asyncio.sleep(0.05)
            assert len(got) == 20
            await feed.aclose()


async def test_redis_layout_is_the_documented_contract(redis_url: str) -> None:
    with anyio.fail_after(5):
        async with RedisBroker.connect(redis_url) as broker:
            client = redis.asyncio.Redis.from_url(redis_url)
            pubsub = client.pubsub()
            await pubsub.subscribe(channel_name(Topic("acme", "w1")))
            await pubsub.get_message(timeout=1)  # the subscribe confirmation
            [stream_id] = await broker.publish([reading(4.5, "p")])
            message = await pubsub.get_message(timeout=2)
            assert message is not None
            raw_id, _, data = message["data"].partition(b" ")
            assert raw_id.decode() == str(stream_id)
            assert Reading.from_json(data).value == 4.5
            assert log_key(Topic("acme", "w1")) == "scada:{acme/w1}:log"
            entries: Any = await client.xrange("scada:{acme/w1}:log")
            [(entry_id, fields)] = entries
            assert entry_id.decode() == str(stream_id)
            assert fields[b"r"] == data
            assert await client.hget(latest_key(Topic("acme", "w1")), "p") == data
            assert await client.smembers("scada:{acme}:wells") == {b"w1"}
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            await client.aclose()


async def test_the_well_registry_is_per_tenant(kind: str, url: str) -> None:
    with anyio.fail_after(5):
        async with open_broker(kind, url) as broker:
            await broker.register_wells("acme", ["w1", "w2"])
            await broker.publish([reading(well="w3")])
            assert await broker.wells("acme") == ["w1", "w2", "w3"]
            assert await broker.has_well("acme", "w3")
            assert not await broker.has_well("globex", "w1")


async def test_a_ticket_redeems_once_and_expires(kind: str, url: str) -> None:
    with anyio.fail_after(10):
        async with open_broker(kind, url) as broker:
            await broker.put_ticket("k1", b"payload", ttl_s=5)
            assert await broker.take_ticket("k1") == b"payload"
            assert await broker.take_ticket("k1") is None, "single use"
            await broker.put_ticket("k2", b"short", ttl_s=1)
            await asyncio.sleep(1.2)
            assert await broker.take_ticket("k2") is None, "expired"
            assert await broker.take_ticket("never") is None


async def test_leases_count_across_callers_and_expire_unless_renewed(kind: str, url: str) -> None:
    with anyio.fail_after(10):
        async with open_broker(kind, url) as broker:
            counters = [("{acme}:tenant", 3), ("{acme}:sub:s1", 2)]
            assert await broker.acquire_lease(counters, "g1:1", ttl_s=30) is None
            assert await broker.acquire_lease(counters, "g2:1", ttl_s=30) is None
            assert await broker.acquire_lease(counters, "g1:2", ttl_s=30) == 1, "the subject's counter is full"
            other = [("{acme}:tenant", 3), ("{acme}:sub:s2", 2)]
            assert await broker.acquire_lease(other, "g1:3", ttl_s=30) is None
            assert await broker.acquire_lease(other, "g1:4", ttl_s=30) == 0, "the tenant's counter is full"
            await broker.release_leases([(key, "g1:1") for key, _ in counters])
            assert await broker.acquire_lease(counters, "g1:5", ttl_s=1) is None, "released, so there is room"
            await broker.renew_leases([("{acme}:tenant", "g1:5"), ("{acme}:sub:s1", "g1:5")], ttl_s=30)
            await broker.release_leases([(key, "g1:3") for key, _ in other])
            await asyncio.sleep(1.2)
            assert await broker.acquire_lease(counters, "g1:6", ttl_s=30) == 1, "a renewed lease still counts"


async def test_a_lease_that_is_not_renewed_stops_counting(kind: str, url: str) -> None:
    with anyio.fail_after(10):
        async with open_broker(kind, url) as broker:
            counters = [("{acme}:tenant", 1)]
            assert await broker.acquire_lease(counters, "dead-gateway:1", ttl_s=0.5) is None
            assert await broker.acquire_lease(counters, "g1:1", ttl_s=30) == 0
            await asyncio.sleep(0.7)
            assert await broker.acquire_lease(counters, "g1:1", ttl_s=30) is None


async def test_a_batch_published_twice_with_its_origin_is_stored_once(kind: str, url: str) -> None:
    topic = Topic("acme", "w1")
    first, other = Origin("a1b2c3d4", (1, 2, 3)), Origin("ffff0000", (1, 2, 3))
    with anyio.fail_after(5):
        async with open_broker(kind, url) as broker:
            batch = [reading(float(i)) for i in range(3)]
            assert len(await broker.publish(batch, first)) == 3
            assert await broker.publish(batch, first) == [], "a retry of the same batch adds nothing"
            # A retry merged with newer readings: only the new ones land, in order.
            more = [*batch, reading(3.0), reading(4.0)]
            assert len(await broker.publish(more, Origin("a1b2c3d4", (1, 2, 3, 4, 5)))) == 2
            assert len(await broker.publish(batch, other)) == 3, "producers are independent"
            assert len(await broker.publish(batch)) == 3, "without an origin nothing is skipped"
            found = await broker.history(topic, ZERO_ID, 100)
            values = [Reading.from_json(e.data).value for e in found.events]
            assert values == [0.0, 1.0, 2.0, 3.0, 4.0, 0.0, 1.0, 2.0, 0.0, 1.0, 2.0]
            with pytest.raises(ValueError, match="one seq per reading"):
                await broker.publish(batch, Origin("a1b2c3d4", (9,)))
    with pytest.raises(ValueError, match="hex"):
        Origin("not-hex!", (1,))


async def test_a_key_of_the_wrong_type_rejects_its_readings_only_and_a_retry_repeats_nothing(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with redis.Redis.from_url(redis_url) as client:
        client.set(log_key(Topic("acme", "w2")), "not a stream")  # something else wrote our key
        client.set(latest_key(Topic("acme", "w3")), "not a hash")
    batch = [reading(1.0, well="w1"), reading(2.0, well="w2"), reading(3.0, well="w3"), reading(4.0, well="w1")]
    origin = Origin("0123abcd", (1, 2, 3, 4))
    with anyio.fail_after(5):
        async with RedisBroker.connect(redis_url) as broker:
            ids = await broker.publish(batch, origin)
            assert len(ids) == 3, "w2's reading is refused; w3's is stored (only its latest is not)"
            assert broker.rejected == 1
            assert await broker.publish(batch, origin) == [], "the retry repeats nothing"
            w1 = await broker.history(Topic("acme", "w1"), ZERO_ID, 10)
            assert [Reading.from_json(e.data).value for e in w1.events] == [1.0, 4.0]
            w3 = await broker.history(Topic("acme", "w3"), ZERO_ID, 10)
            assert [Reading.from_json(e.data).value for e in w3.events] == [3.0]
    assert "scada:{acme/w2}:log" in caplog.text
