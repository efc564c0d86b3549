"""Security issue 15, item 7: a malformed value from another producer is skipped and counted, never a 500.

Anyone with Redis access can write into the layout without the publish script. Here an
`Intruder` does, beside readings published the proper way, and a real gateway on a real
redis-server must go on answering with the good readings only: /latest, snapshots, live
streams, resumes and gap fills. A reading under another tenant's or well's key is malformed
too: tenant isolation must not depend on every producer being right.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from app.models import StreamId, Topic
from app.settings import Settings
from app.streams.redis import RedisStreamLog, connect_redis
from app.streams.redis.keys import channel_name, clock_key, latest_key, log_key, wells_key
from app.streams.seams import Broker
from tests.conftest import RunningGateway, make_settings, running_gateway
from tests.factories import make_reading
from tests.prometheus import parse_samples, value
from tests.sse_client import SSEReader

pytestmark = pytest.mark.anyio

W1 = Topic("acme", "w1")
LATEST = "/tenants/acme/wells/w1/latest"
WELL_STREAM = "/tenants/acme/wells/w1/stream"
TENANT_STREAM = "/tenants/acme/stream?wells=w1,w2"


def reading_json(tag: str, **changes: Any) -> bytes:
    """A reading of acme/w1 as published, with some fields changed (or removed, with None)."""
    fields = orjson.loads(make_reading(666.0, tag).to_json())
    for name, new in changes.items():
        if new is None:
            fields.pop(name, None)
        else:
            fields[name] = new
    return orjson.dumps(fields)


# Each one is wrong in one way only, under a field named after it; 666.0 marks them all.
POISON: dict[bytes, bytes] = {
    b"not-json": b"not json",
    b"not-utf8": b"\xff\xfe{",
    b"wrong-shape": b"[666.0]",
    b"no-value": reading_json("no-value", value=None),
    b"bad-quality": reading_json("bad-quality", quality="EXCELLENT"),
    b"bad-id": reading_json("bad-id", wellId="w1:*"),
    b"other-tenant": reading_json("other-tenant", tenantId="globex"),
    b"other-well": reading_json("other-well", wellId="w2"),
    b"huge": reading_json("huge", unit="x" * 1_000_000),
    b"huge-junk": b"x" * 1_000_000,
}
# On the live channel a reading names its own well: one of another well of the same tenant is that
# well's reading as far as the channel can tell. Only its log key (and latest key) say otherwise.
LIVE_POISON = {name: data for name, data in POISON.items() if name != b"other-well"}
# Only in the latest hash: a field and a reading that disagree on the tag, a field that is no tag.
LATEST_ONLY: dict[bytes, bytes] = {
    b"wrong-tag": reading_json("elsewhere"),
    b"\xff\xfe": reading_json("p"),
}


@dataclass
class Intruder:
    """Another producer with Redis access, writing into the layout without the publish script."""

    client: aioredis.Redis

    async def poison_latest(self, topic: Topic, values: dict[bytes, bytes]) -> None:
        await self.client.hset(latest_key(topic), mapping=values)  # type: ignore[arg-type]

    async def append(self, topic: Topic, payloads: list[bytes], live: bool = True) -> list[str]:
        """XADD (and SPUBLISH, if `live`) each payload with the tenant's next id, as the layout says."""
        raw = await self.client.get(clock_key(topic.tenant))
        text = raw.decode() if isinstance(raw, bytes) else raw
        clock = StreamId.parse(text) if text else StreamId(0, 0)
        ids = [str(StreamId(clock.ms, clock.seq + n)) for n in range(1, len(payloads) + 1)]
        for stream_id, payload in zip(ids, payloads, strict=True):
            await self.client.xadd(log_key(topic), {"r": payload}, id=stream_id)
            if live:
                await self.client.spublish(channel_name(topic.tenant), stream_id.encode() + b" " + payload)
        await self.client.set(clock_key(topic.tenant), ids[-1])
        return ids

    async def announce(self, tenant: str, message: bytes) -> None:
        """A live message only: nothing in the log."""
        await self.client.spublish(channel_name(tenant), message)


@dataclass
class Site:
    gateway: RunningGateway
    broker: Broker
    intruder: Intruder
    client: httpx.AsyncClient
    headers: dict[str, str]

    def stream(self, path: str, last_id: str | None = None) -> contextlib.AbstractAsyncContextManager[httpx.Response]:
        headers = self.headers if last_id is None else {**self.headers, "Last-Event-ID": last_id}
        return self.client.stream("GET", self.gateway.url + path, headers=headers)

    async def latest(self) -> httpx.Response:
        return await self.client.get(self.gateway.url + LATEST, headers=self.headers)

    async def malformed(self, source: str) -> float:
        response = await self.client.get(self.gateway.url + "/metrics")
        return value(parse_samples(response.text), "wellstream_malformed_total", source=source)


@contextlib.asynccontextmanager
async def site(redis_url: str, secret: str, token: str) -> AsyncIterator[Site]:
    settings: Settings = make_settings(secret, redis_url=redis_url)
    async with (
        connect_redis(redis_url) as broker,
        running_gateway(settings) as gateway,
        httpx.AsyncClient(timeout=10) as client,
    ):
        raw = aioredis.Redis.from_url(redis_url)
        try:
            yield Site(gateway, broker, Intruder(raw), client, {"Authorization": f"Bearer {token}"})
        finally:
            await raw.aclose()


def tags_of(readings: list[dict[str, Any]]) -> list[str]:
    return [reading["tagName"] for reading in readings]


def snapshot_of(events: list[dict[str, Any]], well: str) -> list[str]:
    return next(tags_of(event["readings"]) for event in events if event["wellId"] == well)


async def test_latest_answers_200_with_the_good_readings_beside_malformed_ones(redis_url: str, secret: str, token):
    with anyio.fail_after(10):
        async with site(redis_url, secret, token("acme")) as s:
            ids = await s.broker.log.publish([make_reading(1.0, "p"), make_reading(2.0, "t")])
            await s.intruder.poison_latest(W1, POISON | LATEST_ONLY)
            response = await s.latest()
            assert response.status_code == 200
            body = response.json()
            assert tags_of(body["readings"]) == ["p", "t"]
            assert [r["value"] for r in body["readings"]] == [1.0, 2.0]
            assert body["lastEventId"] == str(ids[-1])
            assert b"666" not in response.content
            assert b"globex" not in response.content


async def test_a_fresh_stream_snapshots_only_the_good_readings(redis_url: str, secret: str, token) -> None:
    with anyio.fail_after(10):
        async with site(redis_url, secret, token("acme")) as s:
            await s.broker.log.publish([make_reading(1.0, "p"), make_reading(2.0, "t"), make_reading(3.0, well="w2")])
            await s.intruder.poison_latest(W1, POISON | LATEST_ONLY)
            async with s.stream(WELL_STREAM) as one, s.stream(TENANT_STREAM) as many:
                assert one.status_code == 200
                assert many.status_code == 200
                single = (await SSEReader(one).next_event("snapshot")).json()
                assert tags_of(single["readings"]) == ["p", "t"]
                reader = SSEReader(many)
                snapshots = [(await reader.next_event("snapshot")).json() for _ in range(2)]
                assert snapshot_of(snapshots, "w1") == ["p", "t"]
                assert snapshot_of(snapshots, "w2") == ["p"]


async def test_live_streams_skip_malformed_entries_and_keep_flowing(redis_url: str, secret: str, token) -> None:
    with anyio.fail_after(10):
        async with site(redis_url, secret, token("acme")) as s:
            await s.broker.log.publish([make_reading(1.0)])
            async with s.stream(WELL_STREAM) as one, s.stream(TENANT_STREAM) as many:
                readers = [SSEReader(one), SSEReader(many)]
                for reader in readers:
                    await reader.next_event("snapshot")
                await s.intruder.append(W1, list(LIVE_POISON.values()))
                await s.intruder.announce("acme", b"not-an-id " + make_reading(666.0).to_json())
                await s.intruder.announce("acme", b"no-space-at-all")
                good = await s.broker.log.publish([make_reading(2.0)])
                for reader in readers:
                    event = await reader.next_event("reading")
                    assert (event.id, event.json()["value"]) == (str(good[0]), 2.0), "the next reading is the good one"


async def test_resume_by_last_event_id_replays_past_malformed_entries(redis_url: str, secret: str, token) -> None:
    with anyio.fail_after(10):
        async with site(redis_url, secret, token("acme")) as s:
            before = await s.broker.log.publish([make_reading(1.0)])
            await s.intruder.append(W1, list(POISON.values()))
            await s.intruder.client.xadd(log_key(W1), {"x": b"no r field"}, id="*")
            ids = await s.broker.log.publish([make_reading(2.0), make_reading(3.0, well="w2")])
            good = list(zip(ids, ["w1", "w2"], strict=True))
            for path, wells in ((WELL_STREAM, {"w1"}), (TENANT_STREAM, {"w1", "w2"})):
                expected = [str(stream_id) for stream_id, well in good if well in wells]
                async with s.stream(path, last_id=str(before[0])) as response:
                    assert response.status_code == 200
                    reader = SSEReader(response)
                    replayed = [await reader.next_event() for _ in expected]
                    assert [(e.event, e.id) for e in replayed] == [("reading", i) for i in expected]
                    live = await s.broker.log.publish([make_reading(4.0)])
                    event = await reader.next_event()
                    assert (event.event, event.id) == ("reading", str(live[0])), "live after the replay"
                good += [(live[0], "w1")]


async def test_a_gap_fill_skips_malformed_entries(redis_url: str, secret: str, token) -> None:
    with anyio.fail_after(10):
        async with site(redis_url, secret, token("acme")) as s:
            await s.broker.log.publish([make_reading(1.0)])
            async with s.stream(WELL_STREAM) as response:
                reader = SSEReader(response)
                await reader.next_event("snapshot")
                first = await s.broker.log.publish([make_reading(2.0)])
                assert (await reader.next_event("reading")).id == str(first[0])
                # History only, as if the live feed had been away: the poison, then a good entry.
                ids = await s.intruder.append(W1, [*POISON.values(), make_reading(3.0).to_json()], live=False)
                log = s.gateway.running.broker.log
                assert isinstance(log, RedisStreamLog)
                (feed,) = log.feeds
                assert feed.on_gap is not None
                feed.on_gap()  # what the feed calls after it reconnected: the hub fills the gap from history
                event = await reader.next_event("reading")
                assert (event.id, event.json()["value"]) == (ids[-1], 3.0)


async def test_malformed_values_are_counted_by_source_and_logged_once_per_place(
    redis_url: str, secret: str, token, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with anyio.fail_after(10):
        async with site(redis_url, secret, token("acme")) as s:
            before = await s.broker.log.publish([make_reading(1.0, "p")])
            await s.intruder.poison_latest(W1, POISON)
            for _ in range(3):  # a poisoned hash is read by every request
                assert (await s.latest()).status_code == 200
            assert await s.malformed("latest") == 3 * len(POISON)
            async with s.stream(WELL_STREAM) as response:
                reader = SSEReader(response)
                await reader.next_event("snapshot")
                await s.intruder.append(W1, list(POISON.values()))
                good = await s.broker.log.publish([make_reading(2.0)])
                assert (await reader.next_event("reading")).id == str(good[0])
            assert await s.malformed("live") == len(LIVE_POISON)
            async with s.stream(WELL_STREAM, last_id=str(before[0])) as response:
                assert (await SSEReader(response).next_event("reading")).id == str(good[0])
            assert await s.malformed("log") == len(POISON)
            lines = [r for r in caplog.records if r.levelno == logging.WARNING and "malformed" in r.getMessage()]
            assert len(lines) == 2 * len(POISON) + len(LIVE_POISON), "one line per place, however often it is read"
            assert len({r.getMessage() for r in lines}) == len(lines)
            assert all(len(r.getMessage()) < 500 for r in lines), "a huge value is never logged whole"


async def test_a_wells_set_member_that_is_no_well_id_is_skipped(redis_url: str, secret: str, token) -> None:
    with anyio.fail_after(10):
        async with site(redis_url, secret, token("acme")) as s:
            await s.broker.log.publish([make_reading(1.0)])
            await s.intruder.client.sadd(wells_key("acme"), b"\xff\xfe", b"w*:x")
            listed = await s.client.get(s.gateway.url + "/tenants/acme/wells", headers=s.headers)
            assert listed.status_code == 200
            wells = listed.json()["wells"]
            assert "w1" in wells
            assert "w*:x" not in wells
            async with s.stream("/tenants/acme/stream") as response:
                assert response.status_code == 200
                reader = SSEReader(response)
                snapshots = [(await reader.next_event("snapshot")).json() for _ in wells]
                assert sorted(snapshot["wellId"] for snapshot in snapshots) == wells
                assert snapshot_of(snapshots, "w1") == ["p"]
                live = await s.broker.log.publish([make_reading(2.0)])
                assert (await reader.next_event()).id == str(live[0]), "no snapshot of a well that is not one"
            assert await s.malformed("wells") >= 4, "each member, at each read of the set"


def test_log_lines_are_bounded_per_place_and_per_window(caplog: pytest.LogCaptureFixture) -> None:
    from app.streams.codec import MalformedValues

    now = [0.0]
    skipped = MalformedValues(clock=lambda: now[0], quiet_s=60, lines_per_window=3, window_s=1)
    for n in range(10):
        assert skipped.skip("latest", "scada:{acme}:latest:w1 field x", ValueError("bad")) == (n == 0)
    assert skipped.counts["latest"] == 10, "each skip counts, logged or not"
    logged = [skipped.skip("log", f"scada:{{acme}}:log:w1 entry 1-{n}", ValueError("bad")) for n in range(10)]
    assert logged.count(True) == 2, "three lines a window at most"
    now[0] = 1.0
    assert skipped.skip("log", "scada:{acme}:log:w1 entry 2-0", ValueError("bad")), "a new window"
    assert caplog.records[-1].getMessage().endswith("(8 more not logged)")
    now[0] = 61.0
    assert skipped.skip("latest", "scada:{acme}:latest:w1 field x", ValueError("bad")), "again after quiet_s"
    assert dict(skipped.counts) == {"latest": 11, "log": 11}
