"""The stream log's conformance suite, on the memory broker and a real redis-server."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest
import redis

from app.models import ZERO_ID, Origin, Reading, StreamEvent, StreamId, Topic
from app.streams.redis import connect_redis
from app.streams.redis.keys import channel_name, latest_key, log_key
from tests.conftest import wait_until
from tests.factories import make_reading as reading
from tests.streams.conftest import Backend

pytestmark = pytest.mark.anyio

MARKER = Topic("acme", "marker")  # a subscribed topic whose arrival shows the feed is past what came before


async def test_ids_increase_per_topic_and_history_returns_them_in_order(backend: Backend) -> None:
    with anyio.fail_after(5):
        async with backend.open() as broker:
            ids = await broker.log.publish([reading(float(i)) for i in range(50)])
            ids += await broker.log.publish([reading(float(i)) for i in range(50, 100)])
            assert ids == sorted(ids)
            assert len(set(ids)) == 100
            found = await broker.log.history(Topic("acme", "w1"), ZERO_ID, 1000)
            assert [e.id for e in found.events] == ids
            assert [Reading.from_json(e.data).value for e in found.events] == [float(i) for i in range(100)]
            assert not found.truncated


async def test_history_after_an_id_is_exclusive_and_paged(backend: Backend) -> None:
    with anyio.fail_after(5):
        async with backend.open() as broker:
            ids = await broker.log.publish([reading(float(i)) for i in range(30)])
            page = await broker.log.history(Topic("acme", "w1"), ids[9], 10)
            assert [e.id for e in page.events] == ids[10:20]
            rest = await broker.log.history(Topic("acme", "w1"), ids[-1], 10)
            assert rest.events == []
            assert not rest.truncated


async def test_snapshot_holds_latest_per_tag_and_newest_id(backend: Backend) -> None:
    with anyio.fail_after(5):
        async with backend.open() as broker:
            empty = await broker.log.snapshot(Topic("acme", "w1"))
            assert empty.readings == {}
            assert empty.last_id == ZERO_ID
            await broker.log.publish([reading(1.0, "p"), reading(2.0, "t"), reading(3.0, "p")])
            ids = await broker.log.publish([reading(None, "t")])
            snap = await broker.log.snapshot(Topic("acme", "w1"))
            assert snap.last_id == ids[-1]
            assert {tag: Reading.from_json(data).value for tag, data in snap.readings.items()} == {"p": 3.0, "t": None}
            assert Reading.from_json(snap.readings["t"]).quality == "BAD"


async def test_tenants_with_the_same_well_id_are_kept_apart(backend: Backend) -> None:
    with anyio.fail_after(5):
        async with backend.open() as broker:
            await broker.log.publish([reading(1.0, tenant="acme", well="w1"), reading(2.0, tenant="globex", well="w1")])
            acme = await broker.log.history(Topic("acme", "w1"), ZERO_ID, 10)
            globex = await broker.log.history(Topic("globex", "w1"), ZERO_ID, 10)
            assert [Reading.from_json(e.data).tenant_id for e in acme.events] == ["acme"]
            assert [Reading.from_json(e.data).tenant_id for e in globex.events] == ["globex"]
            assert await broker.registry.wells("acme") == ["w1"]
            assert await broker.registry.wells("nobody") == []


async def test_trimmed_history_is_reported_as_truncated(backend: Backend) -> None:
    with anyio.fail_after(5):
        async with backend.open(max_len=10) as broker:
            ids: list[StreamId] = []
            for i in range(300):  # one by one, so Redis's approximate MAXLEN ~ gets to trim whole nodes
                ids += await broker.log.publish([reading(float(i))])
            topic = Topic("acme", "w1")
            assert (await broker.log.history(topic, ids[0], 1000)).truncated
            kept = await broker.log.history(topic, ids[-5], 1000)
            assert not kept.truncated
            assert [e.id for e in kept.events] == ids[-4:]
            future = StreamId(ids[-1].ms + 10_000, 0)
            assert (await broker.log.history(topic, future, 10)).truncated, "an id never issued is unknown, not current"


async def test_history_is_trimmed_by_age(backend: Backend) -> None:
    with anyio.fail_after(10):
        async with backend.open(max_age_s=0.5) as broker:
            old = await broker.log.publish([reading(float(i)) for i in range(300)])
            await backend.advance(0.7)
            new = await broker.log.publish([reading(1000.0)])
            topic = Topic("acme", "w1")
            assert (await broker.log.history(topic, old[0], 1000)).truncated
            found = await broker.log.history(topic, ZERO_ID, 1000)
            assert found.events[-1].id == new[0]
            assert len(found.events) < 100, "whole nodes of old entries are gone (Redis trims MINID ~ by node)"


async def test_live_feed_delivers_subscribed_topics_only_in_order(backend: Backend) -> None:
    with anyio.fail_after(5):
        async with backend.open() as broker:
            got: list[tuple[Topic, StreamEvent]] = []
            twenty = asyncio.Event()

            def deliver(topic: Topic, event: StreamEvent) -> None:
                got.append((topic, event))
                if len(got) >= 20:
                    twenty.set()

            async with broker.log.live_feed(deliver) as feed:
                await feed.subscribe(Topic("acme", "w1"))
                await feed.subscribe(MARKER)
                ids = await broker.log.publish([reading(float(i)) for i in range(20)] + [reading(well="w2")])
                await twenty.wait()
                # Nothing from w2 can come after the marker: one publisher's messages arrive in order.
                [marker] = await broker.log.publish([reading(well=MARKER.well)])
                await wait_until(lambda: got[-1][1].id == marker)
                assert [event.id for _, event in got[:-1]] == ids[:20]
                assert {topic for topic, _ in got[:-1]} == {Topic("acme", "w1")}
                assert got[0][1].tag == "p"
                assert Reading.from_json(got[0][1].data).value == 0.0
                await feed.unsubscribe(Topic("acme", "w1"))
                await broker.log.publish([reading()])
                [marker] = await broker.log.publish([reading(well=MARKER.well)])
                await wait_until(lambda: got[-1][1].id == marker)
                assert len(got) == 22, "after unsubscribing, only the marker came"


async def test_redis_layout_is_the_documented_contract(redis_url: str) -> None:
    with anyio.fail_after(5):
        async with connect_redis(redis_url) as broker:
            client = redis.asyncio.Redis.from_url(redis_url)
            pubsub = client.pubsub()
            await pubsub.subscribe(channel_name(Topic("acme", "w1")))
            await pubsub.get_message(timeout=1)  # the subscribe confirmation
            [stream_id] = await broker.log.publish([reading(4.5, "p")])
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


async def test_a_batch_published_twice_with_its_origin_is_stored_once(backend: Backend) -> None:
    topic = Topic("acme", "w1")
    first, other = Origin("a1b2c3d4", (1, 2, 3)), Origin("ffff0000", (1, 2, 3))
    with anyio.fail_after(5):
        async with backend.open() as broker:
            batch = [reading(float(i)) for i in range(3)]
            assert len(await broker.log.publish(batch, first)) == 3
            assert await broker.log.publish(batch, first) == [], "a retry of the same batch adds nothing"
            # A retry merged with newer readings: only the new ones land, in order.
            more = [*batch, reading(3.0), reading(4.0)]
            assert len(await broker.log.publish(more, Origin("a1b2c3d4", (1, 2, 3, 4, 5)))) == 2
            assert len(await broker.log.publish(batch, other)) == 3, "producers are independent"
            assert len(await broker.log.publish(batch)) == 3, "without an origin nothing is skipped"
            found = await broker.log.history(topic, ZERO_ID, 100)
            values = [Reading.from_json(e.data).value for e in found.events]
            assert values == [0.0, 1.0, 2.0, 3.0, 4.0, 0.0, 1.0, 2.0, 0.0, 1.0, 2.0]
            with pytest.raises(ValueError, match="one seq per reading"):
                await broker.log.publish(batch, Origin("a1b2c3d4", (9,)))
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
        async with connect_redis(redis_url) as broker:
            ids = await broker.log.publish(batch, origin)
            assert len(ids) == 3, "w2's reading is refused; w3's is stored (only its latest is not)"
            assert broker.log.rejected == 1
            assert await broker.log.publish(batch, origin) == [], "the retry repeats nothing"
            w1 = await broker.log.history(Topic("acme", "w1"), ZERO_ID, 10)
            assert [Reading.from_json(e.data).value for e in w1.events] == [1.0, 4.0]
            w3 = await broker.log.history(Topic("acme", "w3"), ZERO_ID, 10)
            assert [Reading.from_json(e.data).value for e in w3.events] == [3.0]
    assert "scada:{acme/w2}:log" in caplog.text
