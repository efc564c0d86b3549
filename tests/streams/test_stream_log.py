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
from tests.factories import history
from tests.factories import make_reading as reading
from tests.streams.conftest import Backend

pytestmark = pytest.mark.anyio

MARKER = "marker"  # a subscribed tenant whose reading's arrival shows the feed is past what came before


async def test_ids_increase_per_well_and_history_returns_them_in_order(backend: Backend) -> None:
    with anyio.fail_after(5):
        async with backend.open() as broker:
            ids = await broker.log.publish([reading(float(i)) for i in range(50)])
            ids += await broker.log.publish([reading(float(i)) for i in range(50, 100)])
            assert ids == sorted(ids)
            assert len(set(ids)) == 100
            found = await history(broker.log, Topic("acme", "w1"), ZERO_ID, 1000)
            assert [e.id for e in found.events] == ids
            assert [Reading.from_json(e.data).value for e in found.events] == [float(i) for i in range(100)]
            assert {(e.well, e.tag) for e in found.events} == {("w1", "p")}
            assert not found.truncated


async def test_ids_are_totally_ordered_across_a_tenants_wells(backend: Backend) -> None:
    with anyio.fail_after(5):
        async with backend.open() as broker:
            wells = [f"w{n}" for n in range(5)]
            ids = []
            for round_ in range(20):
                ids += await broker.log.publish([reading(float(round_), well=well) for well in wells])
            assert ids == sorted(ids), "one clock per tenant: ids grow across its wells"
            assert len(set(ids)) == len(ids), "no two wells share an id"


async def test_history_after_an_id_is_exclusive_and_paged(backend: Backend) -> None:
    with anyio.fail_after(5):
        async with backend.open() as broker:
            ids = await broker.log.publish([reading(float(i)) for i in range(30)])
            page = await history(broker.log, Topic("acme", "w1"), ids[9], 10)
            assert [e.id for e in page.events] == ids[10:20]
            assert page.more
            assert page.cursor == ids[19]
            upto = await broker.log.range(Topic("acme", "w1"), ids[9], ids[14], 100)
            assert [e.id for e in upto.events] == ids[10:15], "a range ends at its upper bound, inclusive"
            rest = await history(broker.log, Topic("acme", "w1"), ids[-1], 10)
            assert rest.events == []
            assert not rest.truncated


async def test_a_snapshot_read_holds_latest_per_tag_at_the_tenants_clock(backend: Backend) -> None:
    with anyio.fail_after(5):
        async with backend.open() as broker:
            empty = await broker.log.read("acme", ["w1"], None, 0)
            assert empty.clock == ZERO_ID
            assert empty.wells["w1"].latest == {}
            await broker.log.publish([reading(1.0, "p"), reading(2.0, "t"), reading(3.0, "p")])
            ids = await broker.log.publish([reading(None, "t"), reading(9.0, "p", well="w2")])
            snap = await broker.log.read("acme", ["w1"], None, 0)
            assert snap.clock == ids[-1], "the tenant's clock, moved on by w2 too"
            latest = snap.wells["w1"].latest or {}
            assert {tag: Reading.from_json(data).value for tag, data in latest.items()} == {"p": 3.0, "t": None}
            assert Reading.from_json(latest["t"]).quality == "BAD"


async def test_a_read_of_every_well_covers_the_registry_atomically(backend: Backend) -> None:
    with anyio.fail_after(5):
        async with backend.open() as broker:
            await broker.registry.register("acme", ["quiet"])
            first = await broker.log.publish([reading(1.0, well="w1"), reading(2.0, well="w2")])
            later = await broker.log.publish([reading(3.0, well="w2"), reading(4.0, well="w3")])
            read = await broker.log.read("acme", None, first[0], 100)
            assert sorted(read.wells) == ["quiet", "w1", "w2", "w3"]
            assert read.clock == later[-1]
            merged = sorted(event.id for state in read.wells.values() for event in state.events)
            assert merged == [first[1], *later], "everything after the id, in every well"
            assert all(state.complete and not state.truncated for state in read.wells.values())
            some = await broker.log.read("acme", ["w2"], ZERO_ID, 1)
            assert [e.id for e in some.wells["w2"].events] == [first[1]]
            assert not some.wells["w2"].complete, "a read of one entry of two is not complete"


async def test_tenants_with_the_same_well_id_are_kept_apart(backend: Backend) -> None:
    with anyio.fail_after(5):
        async with backend.open() as broker:
            await broker.log.publish([reading(1.0, tenant="acme", well="w1"), reading(2.0, tenant="globex", well="w1")])
            acme = await history(broker.log, Topic("acme", "w1"), ZERO_ID, 10)
            globex = await history(broker.log, Topic("globex", "w1"), ZERO_ID, 10)
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
            await broker.log.publish([reading(1.0, well="w2")])
            topic = Topic("acme", "w1")
            assert (await history(broker.log, topic, ids[0], 1000)).truncated
            kept = await history(broker.log, topic, ids[-5], 1000)
            assert not kept.truncated
            assert [e.id for e in kept.events] == ids[-4:]
            read = await broker.log.read("acme", ["w1", "w2"], ids[0], 100)
            assert read.wells["w1"].truncated, "w1 needs a reset"
            assert "p" in (read.wells["w1"].latest or {}), "with its latest values"
            assert not read.wells["w2"].truncated, "w2's history still reaches back"
            unknown = await broker.log.read("acme", ["w1", "w2"], StreamId(read.clock.ms + 10_000, 0), 10)
            assert all(state.truncated for state in unknown.wells.values()), "an id never issued is unknown"


async def test_history_is_trimmed_by_age(backend: Backend) -> None:
    with anyio.fail_after(10):
        async with backend.open(max_age_s=0.5) as broker:
            old = await broker.log.publish([reading(float(i)) for i in range(300)])
            await backend.advance(0.7)
            new = await broker.log.publish([reading(1000.0)])
            topic = Topic("acme", "w1")
            assert (await history(broker.log, topic, old[0], 1000)).truncated
            found = await history(broker.log, topic, ZERO_ID, 1000)
            assert found.events[-1].id == new[0]
            assert len(found.events) < 100, "whole nodes of old entries are gone (Redis trims MINID ~ by node)"


async def test_live_feed_delivers_subscribed_tenants_only_in_id_order(backend: Backend) -> None:
    with anyio.fail_after(5):
        async with backend.open() as broker:
            got: list[tuple[str, StreamEvent]] = []
            twenty = asyncio.Event()

            def deliver(tenant: str, event: StreamEvent) -> None:
                got.append((tenant, event))
                if len(got) >= 20:
                    twenty.set()

            async with broker.log.live_feed(deliver) as feed:
                await feed.subscribe("acme")
                await feed.subscribe(MARKER)
                batch = [reading(float(i), well=f"w{i % 3}") for i in range(20)] + [reading(tenant="globex")]
                ids = await broker.log.publish(batch)
                await twenty.wait()
                # Nothing of globex can come after the marker: one publisher's messages arrive in order.
                [marker] = await broker.log.publish([reading(tenant=MARKER)])
                await wait_until(lambda: got[-1][1].id == marker)
                assert [event.id for _, event in got[:-1]] == ids[:20], "every well of the tenant, in id order"
                assert {tenant for tenant, _ in got[:-1]} == {"acme"}
                assert [event.well for _, event in got[:3]] == ["w0", "w1", "w2"]
                assert Reading.from_json(got[0][1].data).value == 0.0
                await feed.unsubscribe("acme")
                await broker.log.publish([reading()])
                [marker] = await broker.log.publish([reading(tenant=MARKER)])
                await wait_until(lambda: got[-1][1].id == marker)
                assert len(got) == 22, "after unsubscribing, only the marker came"


async def test_clocks_give_each_tenants_newest_id_and_zero_for_a_tenant_with_none(backend: Backend) -> None:
    with anyio.fail_after(5):
        async with backend.open() as broker:
            assert await broker.log.clocks([]) == {}
            acme = await broker.log.publish([reading(1.0), reading(2.0, well="w2")])
            globex = await broker.log.publish([reading(3.0, tenant="globex")])
            clocks = await broker.log.clocks(["acme", "globex", "initech"])
            assert clocks == {"acme": acme[-1], "globex": globex[-1], "initech": ZERO_ID}


async def test_a_restarted_feed_reports_a_gap_and_delivers_again(backend: Backend) -> None:
    with anyio.fail_after(10):
        async with backend.open() as broker:
            got: list[StreamEvent] = []
            gaps: list[int] = []
            async with broker.log.live_feed(lambda tenant, event: got.append(event)) as feed:
                feed.on_gap = lambda: gaps.append(feed.reconnects)
                await feed.subscribe("acme")
                await feed.restart("the test asks for it")
                await wait_until(lambda: gaps == [1] and feed.connected)
                await feed.confirmed("acme")
                [stream_id] = await broker.log.publish([reading(1.0)])
                await wait_until(lambda: [event.id for event in got] == [stream_id])


async def test_redis_layout_is_the_documented_contract(redis_url: str) -> None:
    with anyio.fail_after(5):
        async with connect_redis(redis_url) as broker:
            client = redis.asyncio.Redis.from_url(redis_url)
            pubsub = client.pubsub()
            await pubsub.ssubscribe(channel_name("acme"))  # sharded: the channel lives in the tenant's slot
            await pubsub.get_message(timeout=1)  # the subscribe confirmation
            [stream_id] = await broker.log.publish([reading(4.5, "p")], Origin("a1b2c3d4", (7,)))
            message = await pubsub.get_message(timeout=2)
            assert message is not None
            assert message["type"] == "smessage"
            raw_id, _, data = message["data"].partition(b" ")
            assert raw_id.decode() == str(stream_id)
            assert Reading.from_json(data).value == 4.5
            assert log_key(Topic("acme", "w1")) == "scada:{acme}:log:w1"
            entries: Any = await client.xrange("scada:{acme}:log:w1")
            [(entry_id, fields)] = entries
            assert entry_id.decode() == str(stream_id)
            assert fields[b"r"] == data
            assert await client.hget(latest_key(Topic("acme", "w1")), "p") == data
            assert await client.hget("scada:{acme}:latest:w1", "p") == data
            assert await client.smembers("scada:{acme}:wells") == {b"w1"}
            assert await client.get("scada:{acme}:clock") == str(stream_id).encode()
            assert await client.get("scada:{acme}:producer:a1b2c3d4") == b"7", "a producer's seq is kept per tenant"
            assert channel_name("acme") == "scada:{acme}:live"
            await pubsub.aclose()
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
            found = await history(broker.log, topic, ZERO_ID, 100)
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
            w1 = await history(broker.log, Topic("acme", "w1"), ZERO_ID, 10)
            assert [Reading.from_json(e.data).value for e in w1.events] == [1.0, 4.0]
            w3 = await history(broker.log, Topic("acme", "w3"), ZERO_ID, 10)
            assert [Reading.from_json(e.data).value for e in w3.events] == [3.0]
    assert "scada:{acme}:log:w2" in caplog.text


async def test_a_lost_clock_moves_past_the_logs_it_finds(redis_url: str) -> None:
    with anyio.fail_after(5):
        async with connect_redis(redis_url) as broker:
            before = await broker.log.publish([reading(1.0), reading(2.0, well="w2")])
            with redis.Redis.from_url(redis_url) as client:
                client.delete("scada:{acme}:clock")  # lost (or a log older than the clock)
                client.xadd("scada:{acme}:log:w1", {"r": reading(3.0).to_json()}, id=f"{before[-1].ms + 60_000}-0")
            after = await broker.log.publish([reading(4.0), reading(5.0, well="w2")])
            assert after[0] > StreamId(before[-1].ms + 60_000, 0), "the clock jumped past the newest entry it met"
            assert after == sorted(after)
            assert len(after) == 2


async def test_streams_that_open_while_the_feed_resubscribes_do_not_stop_it(redis_url: str) -> None:
    # Each SSUBSCRIBE of the resubscribe yields; subscribes meanwhile changed the topics under the
    # loop, whose RuntimeError ended the reader for good (connected False, no gap fill ever).
    with anyio.fail_after(20):
        async with connect_redis(redis_url) as broker:
            gaps: list[int] = []
            async with broker.log.live_feed(lambda tenant, event: None) as feed:
                for n in range(50):
                    await feed.subscribe(f"t{n}")
                feed.on_gap = lambda: gaps.append(1)
                churning: list[asyncio.Task[None]] = []

                async def churn() -> None:  # a stream opening on every turn of the loop
                    while not gaps:
                        churning.append(asyncio.create_task(feed.subscribe(f"x{len(churning)}")))
                        await asyncio.sleep(0)

                opening = asyncio.create_task(churn())
                await feed.restart("the test asks for it")
                await wait_until(lambda: feed.connected and gaps == [1])
                await opening
                await asyncio.gather(*churning)
