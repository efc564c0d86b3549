"""Catch-up paths of one stream, driven directly on the memory broker and a real hub."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence

import anyio
import pytest
from starlette.types import Message

from app.gateway.eventstream import EventStream
from app.gateway.hub import Hub
from app.models import Selection, StreamId, TenantRead, Topic
from app.settings import HistorySettings, StreamSettings
from app.streams.memory import memory_broker
from tests.conftest import wait_until
from tests.factories import history
from tests.factories import make_reading as reading

pytestmark = pytest.mark.anyio

TOPIC = Topic("acme", "w1")
W1 = Selection("acme", frozenset({"w1"}))


async def test_trimming_that_overtakes_a_paged_replay_is_reported_not_skipped() -> None:
    broker = memory_broker(max_len=100)
    with anyio.fail_after(5):
        async with Hub(broker.log) as hub:
            ids: list[StreamId] = await broker.log.publish([reading(float(i)) for i in range(100)])
            stream = EventStream(hub, broker.log, W1, ids[10], StreamSettings(), HistorySettings(replay_page=10))
            sub = await hub.subscribe("acme", W1.wells)
            pages = stream._catch_up(sub)
            first = await anext(pages)
            assert first.count(b"event: reading") == 10
            await broker.log.publish([reading(float(i)) for i in range(100, 250)])  # trims what is not sent yet
            with pytest.raises(StopAsyncIteration):
                await anext(pages)
            assert sub.end_reason == "upstream-gap", "ended with a retry: it resumes from the last id it got"
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
            found = await history(broker.log, TOPIC, first[0], 1)
            assert found.events == []
            assert found.cursor > first[0], "the cursor moves past what it skipped"
            found = await history(broker.log, TOPIC, first[0], 10)
            assert [e.id for e in found.events] == last
            await client.aclose()


async def test_live_frames_that_the_catch_up_already_sent_are_not_sent_again() -> None:
    broker = memory_broker()
    many = Selection("acme", frozenset({"w1", "w2"}))
    with anyio.fail_after(5):
        async with Hub(broker.log) as hub:
            before = await broker.log.publish([reading(0.0)])
            sub = await hub.subscribe("acme", many.wells)
            # Published after the subscription and before the catch-up reads: both queued live and in history.
            both = await broker.log.publish([reading(1.0), reading(2.0, well="w2"), reading(3.0)])
            stream = EventStream(hub, broker.log, many, before[0], StreamSettings(), HistorySettings())
            caught_up = b"".join([page async for page in stream._catch_up(sub)])
            assert [line for line in caught_up.split(b"\n") if line.startswith(b"id: ")] == [
                f"id: {stream_id}".encode() for stream_id in both
            ]
            later = await broker.log.publish([reading(4.0, well="w2")])
            chunks, _, _ = sub.take()
            assert [chunk.split(b"\n")[0] for chunk in chunks] == [f"id: {later[0]}".encode()], "only what is new"
            await hub.unsubscribe(sub)


async def test_a_stream_that_stops_sending_while_its_well_publishes_is_ended_not_left_silent() -> None:
    broker = memory_broker()
    w1 = frozenset({"w1"})
    with anyio.fail_after(10):
        async with Hub(broker.log, heartbeat_s=0.4, stall_s=0.5) as hub:
            silent = await hub.subscribe("acme", w1)  # nobody takes its frames: a writer that stopped
            flowing = await hub.subscribe("acme", w1)
            await broker.log.publish([reading(1.0)])
            while silent.end_reason is None:
                flowing.take()  # this one's writer keeps up
                flowing.sent(asyncio.get_running_loop().time())
                await broker.log.publish([reading(2.0)])
                await asyncio.sleep(0.05)
            assert silent.end_reason == "stalled"
            assert flowing.end_reason is None, "a stream that keeps sending is left alone"
            assert hub.stats.stalled == 1
            await hub.unsubscribe(silent)
            await hub.unsubscribe(flowing)


@pytest.mark.parametrize("wells", [frozenset({"w1"}), frozenset({"w1", "w2"}), None], ids=["well", "wells", "all"])
async def test_a_stream_the_fan_out_no_longer_reaches_is_ended_not_left_silent(wells: frozenset[str] | None) -> None:
    # Nothing in the hub drops a stream from its index on purpose; a bug that did would leave the
    # stream with an empty queue, which the stalled check cannot see. The sweeper holds each
    # stream's completed sends against its wells' publishes instead of trusting the queue.
    broker = memory_broker()
    with anyio.fail_after(10):
        async with Hub(broker.log, heartbeat_s=0.4, stall_s=0.5) as hub:
            lost = await hub.subscribe("acme", wells)
            flowing = await hub.subscribe("acme", wells)
            channel = hub._channels["acme"]
            for subs in (channel.everything, *channel.by_well.values()):
                subs.discard(lost)
            while lost.end_reason is None:
                flowing.take()  # this one's writer keeps up and its sends complete
                flowing.sent(asyncio.get_running_loop().time())
                await broker.log.publish([reading(2.0)])
                await asyncio.sleep(0.05)
            assert lost.end_reason == "silent"
            assert not lost.frames, "nothing ever reached it: the queue check alone would have left it open"
            assert flowing.end_reason is None, "a stream whose sends keep up is left alone"
            assert (hub.stats.silent, hub.stats.stalled) == (1, 0)
            await hub.unsubscribe(lost)
            await hub.unsubscribe(flowing)


async def test_a_stream_asked_to_end_that_does_not_is_broken_off_within_the_send_timeout() -> None:
    broker = memory_broker()
    broken: list[str] = []
    with anyio.fail_after(10):
        async with Hub(broker.log, heartbeat_s=0.2, send_timeout_s=0.3) as hub:
            sub = await hub.subscribe("acme", frozenset({"w1"}), interrupt=lambda: broken.append("interrupted"))
            sub.end("upstream-gap")  # its writer never reacts (stuck somewhere outside a send)
            await wait_until(lambda: bool(broken))
            assert broken == ["interrupted"]
            await hub.unsubscribe(sub)


async def test_a_conflated_stream_sends_each_tag_at_most_max_rate_times_a_second_and_its_last_value() -> None:
    broker = memory_broker()
    selection = Selection("acme", frozenset({"w1"}), max_rate=4)  # at most every 0.25 s per tag
    sends: list[tuple[float, bytes]] = []
    finished = asyncio.Event()

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            body: bytes = message["body"]
            sends.append((asyncio.get_running_loop().time(), body))
            if b'"value":39.0' in body:
                finished.set()

    with anyio.fail_after(10):
        async with Hub(broker.log) as hub:
            stream = EventStream(hub, broker.log, selection, None, StreamSettings(), HistorySettings())
            writer = asyncio.create_task(stream._write(send))
            await wait_until(lambda: bool(sends))  # the snapshot is out
            for n in range(40):  # 2 s at 20 readings/s of each of two tags
                await broker.log.publish([reading(float(n), "p"), reading(float(n), "q")])
                await asyncio.sleep(0.05)
            await finished.wait()
            writer.cancel()
    readings = [(at, body) for at, body in sends if b"event: reading" in body]
    for tag in (b'"tagName":"p"', b'"tagName":"q"'):
        times = [at for at, body in readings if tag in body]
        assert all(later - earlier >= 0.25 - 1e-3 for earlier, later in itertools.pairwise(times)), tag
    assert b'"tagName":"q","value":39.0' in b"".join(body for _, body in readings), "the last value is never dropped"
    assert all(b"id: " not in body for _, body in readings)


async def test_a_burst_across_a_field_is_not_taken_for_a_slow_client() -> None:
    broker = memory_broker()
    with anyio.fail_after(5):
        async with Hub(broker.log, queue_size=8) as hub:
            field = await hub.subscribe("acme", None)
            one = await hub.subscribe("acme", frozenset({"w0"}))
            await broker.log.publish([reading(float(n), well=f"w{n % 10}") for n in range(100)])
            assert field.end_reason is None, "100 readings of 10 wells fit a stream of every well"
            assert len(field.frames) == 100
            await broker.log.publish([reading(float(n), well="w0") for n in range(10)])
            assert one.end_reason == "slow", "a per-well stream keeps its own queue size"
            await hub.unsubscribe(field)
            await hub.unsubscribe(one)


async def test_a_stream_whose_catch_up_read_waits_is_not_ended_as_stalled() -> None:
    # As under a burst of opens, when the snapshot read waits for a pooled Redis connection longer
    # than stall_s: the stream has no 200 yet, so it is not silent; it used to get its 200 and snapshot
    # and then at once "stream stalled" (docs/performance.md, admission while publishing).
    broker = memory_broker()
    read = broker.log.read
    reading_now = asyncio.Event()

    async def slow_read(tenant: str, wells: Sequence[str] | None, after: StreamId | None, count: int) -> TenantRead:
        reading_now.set()
        await asyncio.sleep(1.0)
        return await read(tenant, wells, after, count)

    broker.log.read = slow_read  # type: ignore[method-assign]
    with anyio.fail_after(10):
        async with Hub(broker.log, heartbeat_s=0.2, stall_s=0.3) as hub:
            stream = EventStream(hub, broker.log, W1, None, StreamSettings(), HistorySettings())
            sub = await hub.subscribe("acme", W1.wells)
            pages = stream._catch_up(sub)

            async def first_page() -> bytes:
                return await anext(pages)

            snapshot = asyncio.create_task(first_page())
            await reading_now.wait()
            await broker.log.publish([reading(1.0)])  # queued while the read waits
            assert b"event: snapshot" in await snapshot
            assert sub.end_reason is None, "a catch-up that waits on the broker is not a stalled stream"
            chunks, _, _ = sub.take()
            assert chunks == [], "the snapshot, read after it was published, already holds it"
            await asyncio.sleep(0.6)  # nothing queued now: the sweeper still has nothing to end
            assert sub.end_reason is None
            await hub.unsubscribe(sub)


async def test_a_reading_queued_after_the_catch_up_and_never_sent_still_ends_the_stream() -> None:
    broker = memory_broker()
    with anyio.fail_after(10):
        async with Hub(broker.log, heartbeat_s=0.2, stall_s=0.3) as hub:
            stream = EventStream(hub, broker.log, W1, None, StreamSettings(), HistorySettings())
            sub = await hub.subscribe("acme", W1.wells)
            async for _ in stream._catch_up(sub):
                pass
            await broker.log.publish([reading(1.0)])  # nobody takes it: a writer that stopped
            await wait_until(lambda: sub.end_reason is not None)
            assert sub.end_reason == "stalled"
            await hub.unsubscribe(sub)
