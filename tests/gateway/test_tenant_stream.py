"""GET /tenants/{tenant}/stream: one stream for many wells, resumed exactly with one Last-Event-ID."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest

from app.errors import BrokerError
from app.models import StreamId, Topic
from app.settings import HistorySettings
from app.streams.redis import connect_redis
from app.streams.seams import Broker
from tests.conftest import RedisServer, make_settings, running_gateway, wait_until
from tests.factories import history, make_reading
from tests.sse_client import SSEReader

pytestmark = pytest.mark.anyio


class Publisher:
    """`per_tick` readings every 10 ms, spread over `wells`; every id it was given."""

    def __init__(self, broker: Broker, wells: list[str], per_tick: int = 10) -> None:
        self.broker = broker
        self.wells = wells
        self.per_tick = per_tick
        self.ids: list[StreamId] = []
        self.stop = asyncio.Event()
        self.done = False
        self._n = 0

    async def run(self) -> None:
        while not self.stop.is_set():
            batch = []
            for _ in range(self.per_tick):
                batch.append(make_reading(float(self._n), well=self.wells[self._n % len(self.wells)]))
                self._n += 1
            with contextlib.suppress(BrokerError):  # Redis away: a batch never acknowledged is expected by nobody
                self.ids += await self.broker.log.publish(batch)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.01)
        self.done = True


@contextlib.asynccontextmanager
async def publishing(redis_url: str, wells: list[str]) -> AsyncIterator[Publisher]:
    async with connect_redis(redis_url) as broker:
        publisher = Publisher(broker, wells, per_tick=20)
        task = asyncio.create_task(publisher.run())
        try:
            yield publisher
        finally:
            publisher.stop.set()
            await task


async def merged_log(broker: Broker, tenant: str, wells: list[str], after: StreamId) -> list[tuple[str, str]]:
    """Every stored entry of the wells after `after`, as (id, well), in id order: what a stream must carry."""
    entries = []
    for well in wells:
        found = await history(broker.log, Topic(tenant, well), after)
        entries += [(event.id, event.well) for event in found.events]
    return [(str(stream_id), well) for stream_id, well in sorted(entries)]


class Follower:
    """A client of one stream of many wells that is cut at random points and resumes with its
    Last-Event-ID, alternately on two gateways, as a browser would (refusals are retried)."""

    def __init__(self, client: httpx.AsyncClient, urls: list[str], headers: dict[str, str], seed: int) -> None:
        self.client = client
        self.urls = urls
        self.headers = headers
        self.rng = random.Random(seed)
        self.received: list[tuple[str, str]] = []  # (id, well) of every reading, in arrival order
        self.start: StreamId | None = None  # the first snapshot's id: the log is compared from there
        self.last_id: str | None = None
        self.cuts = 0

    async def follow(self, readings: int, until: StreamId | None = None) -> None:
        """One connection: until `readings` more readings arrived (or the reading `until`)."""
        url = self.urls[self.cuts % len(self.urls)]
        self.cuts += 1
        resume = {"Last-Event-ID": self.last_id} if self.last_id else {}
        try:
            async with self.client.stream("GET", url, headers=self.headers | resume) as response:
                if response.status_code != 200:
                    await asyncio.sleep(0.2)  # Redis away: 503, try again
                    return
                await self._read(SSEReader(response), readings, until)
        except httpx.TransportError:
            await asyncio.sleep(0.2)

    async def _read(self, events: SSEReader, readings: int, until: StreamId | None) -> None:
        async for event in events:
            if not event.data:
                continue  # the retry: line, heartbeats
            assert event.event in {"snapshot", "reading"}, event
            if event.event == "snapshot" and self.start is None:
                self.start = StreamId.parse(event.json()["lastEventId"])
            elif event.event == "reading":
                self.received.append((event.id or "", event.json()["wellId"]))
                readings -= 1
            self.last_id = events.last_id
            if until is not None and self.last_id == str(until):
                return
            if until is None and readings <= 0:
                return  # the connection is cut here


async def test_a_stream_of_100_wells_cut_and_resumed_20_times_on_two_gateways_misses_and_repeats_nothing(
    redis_url: str, secret: str, token
) -> None:
    await cut_and_resume(redis_url, secret, token, kill=None)


async def test_the_same_through_a_redis_kill_9_and_restart(own_redis: RedisServer, secret: str, token) -> None:
    await cut_and_resume(own_redis.url, secret, token, kill=own_redis)


async def kill_and_restart(server: RedisServer, after_s: float) -> None:
    await asyncio.sleep(after_s)
    server.kill()  # acknowledged writes are on disk (AOF, fsync always)
    await asyncio.sleep(0.5)
    server.start()


async def cut_and_resume(redis_url: str, secret: str, token: Any, kill: RedisServer | None) -> None:
    wells = [f"m{n:03d}" for n in range(100)]
    headers = {"Authorization": f"Bearer {token('acme')}"}
    settings = make_settings(secret, redis_url=redis_url, history=HistorySettings(replay_page=50))
    with anyio.fail_after(120):
        async with (
            running_gateway(settings) as first,
            running_gateway(settings) as second,
            httpx.AsyncClient(timeout=30) as client,
            publishing(redis_url, wells) as publisher,
        ):
            await wait_until(lambda: len(publisher.ids) >= 200)  # every well registered by publishing
            url = "/tenants/acme/stream"
            follower = Follower(client, [first.url + url, second.url + url], headers, seed=13)
            outage: asyncio.Task[None] | None = None
            while follower.cuts < 20:
                if kill is not None and follower.cuts == 10:  # while a stream is open: the gap is filled in place
                    outage = asyncio.create_task(kill_and_restart(kill, after_s=0.1))
                await asyncio.sleep(follower.rng.uniform(0, 0.2))  # a gap of up to 400 readings to catch up on
                await follower.follow(follower.rng.randint(50, 400))
            if outage is not None:
                await outage
            publisher.stop.set()
            await wait_until(lambda: publisher.done)
            while follower.last_id != str(publisher.ids[-1]):  # the last stretch, up to the last reading published
                await follower.follow(0, until=publisher.ids[-1])
            assert follower.start is not None
            expected = await merged_log(publisher.broker, "acme", wells, follower.start)
    assert len(follower.received) == len(expected), "none missing, none twice"
    assert follower.received == expected, "in id order, across every well"


async def test_a_resume_older_than_one_wells_history_resets_that_well_and_is_exact_for_the_rest(
    redis_url: str, secret: str, token
) -> None:
    headers = {"Authorization": f"Bearer {token('acme')}"}
    settings = make_settings(secret, redis_url=redis_url, history=HistorySettings(max_len=10))
    with anyio.fail_after(30):
        async with running_gateway(settings) as gateway, connect_redis(redis_url, max_len=10) as broker:
            [start] = await broker.log.publish([make_reading(0.0, well="w1")])
            quiet = await broker.log.publish([make_reading(1.0, well="w2"), make_reading(2.0, well="w2")])
            for n in range(300):  # one by one, so Redis's MAXLEN ~ trims whole nodes of w1's log
                await broker.log.publish([make_reading(float(n), well="w1")])
            url = f"{gateway.url}/tenants/acme/stream?wells=w1,w2"
            async with httpx.AsyncClient(timeout=10) as client:
                async with client.stream("GET", url, headers=headers | {"Last-Event-ID": str(start)}) as response:
                    seen = await read_until_snapshot(SSEReader(response))
            [first, second, reset, snapshot] = seen
            assert [first[0], second[0]] == ["reading", "reading"]
            assert [first[2], second[2]] == [str(quiet[0]), str(quiet[1])], "w2 exactly from the id on"
            assert reset[0] == "reset"
            assert reset[1] == {
                "tenantId": "acme",
                "wellId": "w1",
                "reason": "history-truncated",
                "lastEventId": str(start),
            }
            assert snapshot[0] == "snapshot"
            assert snapshot[1]["wellId"] == "w1"
            clock = await broker.log.read("acme", ["w1"], None, 0)
            assert snapshot[2] == str(clock.clock), "the snapshot stands at the tenant's clock"


async def read_until_snapshot(events: SSEReader) -> list[tuple[str, dict[str, object], str | None]]:
    seen: list[tuple[str, dict[str, object], str | None]] = []
    async for event in events:
        if event.data:
            seen.append((event.event, event.json(), event.id))
            if event.event == "snapshot":
                return seen
    raise EOFError("the stream ended")


async def test_a_stream_of_every_well_starts_with_a_snapshot_of_each_and_carries_wells_registered_later(
    redis_url: str, secret: str, token
) -> None:
    headers = {"Authorization": f"Bearer {token('acme')}"}
    with anyio.fail_after(30):
        async with (
            running_gateway(make_settings(secret, redis_url=redis_url)) as gateway,
            connect_redis(redis_url) as broker,
            httpx.AsyncClient(timeout=10) as client,
        ):
            await broker.log.publish([make_reading(1.0, well="w1"), make_reading(2.0, well="w2")])
            async with client.stream("GET", f"{gateway.url}/tenants/acme/stream", headers=headers) as response:
                events = SSEReader(response)
                registered = await broker.registry.wells("acme")
                snapshots = [await events.next_event("snapshot") for _ in registered]
                assert sorted(s.json()["wellId"] for s in snapshots) == registered, "one snapshot per well"
                assert len({s.id for s in snapshots}) == 1, "all at one point of the tenant's order"
                [fresh] = await broker.log.publish([make_reading(3.0, well="brand-new")])
                await broker.log.publish([make_reading(4.0, tenant="globex", well="w1")])  # never on acme's stream
                [mine] = await broker.log.publish([make_reading(5.0, well="w1")])
                got = [await events.next_event("reading"), await events.next_event("reading")]
            assert [(e.id, e.json()["tenantId"], e.json()["wellId"]) for e in got] == [
                (str(fresh), "acme", "brand-new"),
                (str(mine), "acme", "w1"),
            ]


async def test_wells_are_checked_and_capped(redis_url: str, secret: str, token) -> None:
    settings = make_settings(secret, redis_url=redis_url, auth={"limits": {"wells_per_stream": 3}})
    headers = {"Authorization": f"Bearer {token('acme')}"}
    narrow = {"Authorization": f"Bearer {token('acme', wells=['w1', 'w2'])}"}
    with anyio.fail_after(30):
        async with running_gateway(settings) as gateway, httpx.AsyncClient(timeout=10) as client:
            base = f"{gateway.url}/tenants/acme/stream"
            unknown = await client.get(base + "?wells=w1,nope", headers=headers)
            assert unknown.status_code == 404
            assert unknown.json() == {"error": "unknown wells: nope"}
            hidden = await client.get(base + "?wells=w1,w9", headers=narrow)
            assert hidden.status_code == 404, "a well outside the token's claim is as unknown as a missing one"
            too_many = await client.get(base + "?wells=w1,w2,w9,w00", headers=headers)
            assert too_many.status_code == 400
            assert "1-3" in too_many.json()["error"]
            malformed = await client.get(base + "?wells=w1,a:b", headers=headers)
            assert malformed.status_code == 400
            everything = await client.get(base, headers=headers)
            assert everything.status_code == 400, "the test registry holds more wells than the cap"
            assert "?wells=" in everything.json()["error"]
            async with client.stream("GET", base, headers=narrow) as response:
                assert response.status_code == 200, "without ?wells=, the token's own wells"
                reader = SSEReader(response)
                snapshots = [await reader.next_event("snapshot") for _ in range(2)]
            assert sorted(s.json()["wellId"] for s in snapshots) == ["w1", "w2"]
            post = await client.post(base, headers=headers)
            assert post.status_code == 405
            assert post.headers["allow"] == "GET, HEAD"


async def test_a_stream_of_many_wells_counts_as_one_stream(redis_url: str, secret: str, token) -> None:
    settings = make_settings(secret, redis_url=redis_url, auth={"limits": {"streams_per_subject": 1}})
    headers = {"Authorization": f"Bearer {token('acme', wells=['w1', 'w2', 'w9'])}"}
    with anyio.fail_after(30):
        async with running_gateway(settings) as gateway, httpx.AsyncClient(timeout=10) as client:
            base = f"{gateway.url}/tenants/acme/stream"
            async with client.stream("GET", base, headers=headers) as response:
                assert response.status_code == 200
                await SSEReader(response).next_event("snapshot")
                second = await client.get(f"{gateway.url}/tenants/acme/wells/w1/stream", headers=headers)
                assert second.status_code == 429, "three wells, one stream: the subject's one place is taken"


async def test_a_ticket_for_every_well_opens_one_stream_of_many_wells_once(redis_url: str, secret: str, token) -> None:
    headers = {"Authorization": f"Bearer {token('acme', wells=['w1', 'w2'])}"}
    with anyio.fail_after(30):
        async with (
            running_gateway(make_settings(secret, redis_url=redis_url)) as gateway,
            httpx.AsyncClient() as client,
        ):
            issued = await client.post(
                f"{gateway.url}/tenants/acme/stream-tickets", headers=headers, json={"wells": None}
            )
            assert issued.status_code == 200
            url = f"{gateway.url}/tenants/acme/stream?ticket={issued.json()['ticket']}"
            async with client.stream("GET", url) as response:
                assert response.status_code == 200
                reader = SSEReader(response)
                snapshots = [await reader.next_event("snapshot") for _ in range(2)]
            assert sorted(s.json()["wellId"] for s in snapshots) == ["w1", "w2"], "the token's wells, no more"
            assert (await client.get(url)).status_code == 401, "single use"


async def test_the_latest_mode_conflates_to_max_rate_and_always_delivers_the_last_value(
    redis_url: str, secret: str, token
) -> None:
    headers = {"Authorization": f"Bearer {token('acme')}"}
    url_tail = "/tenants/acme/stream?wells=w1,w2&mode=latest&maxRate=2"
    received: list[tuple[float, str, str, float]] = []  # (arrival, well, tag, value)
    with anyio.fail_after(30):
        async with (
            running_gateway(make_settings(secret, redis_url=redis_url)) as gateway,
            connect_redis(redis_url) as broker,
            httpx.AsyncClient(timeout=10) as client,
        ):
            loop = asyncio.get_running_loop()
            async with client.stream("GET", gateway.url + url_tail, headers=headers) as response:
                events = SSEReader(response)
                first = [await events.next_event("snapshot"), await events.next_event("snapshot")]
                for n in range(60):  # 3 s of bursts: 20 readings/s per tag
                    await broker.log.publish([make_reading(float(n), "p"), make_reading(float(n), "q", well="w2")])
                    await asyncio.sleep(0.05)
                async for event in events:
                    if event.event == "reading":
                        assert event.id is None, "a conflated reading has no id: its stream is not resumable"
                        data = event.json()
                        received.append((loop.time(), data["wellId"], data["tagName"], data["value"]))
                        if {(w, v) for _, w, _, v in received if v == 59.0} == {("w1", 59.0), ("w2", 59.0)}:
                            break
            async with client.stream(
                "GET", gateway.url + url_tail, headers=headers | {"Last-Event-ID": first[0].id or ""}
            ) as response:
                resumed = await SSEReader(response).next_event()
    for key in (("w1", "p"), ("w2", "q")):
        values = [v for _, well, tag, v in received if (well, tag) == key]
        assert values[-1] == 59.0, "the last value of the burst arrives"
        assert len(values) < 20, "conflated: far fewer updates than the 60 readings published"
        assert values == sorted(values), "newer values only"
    assert resumed.event == "snapshot", "a conflated stream resumes with a fresh snapshot"


async def test_the_latest_mode_refuses_bad_rates(redis_url: str, secret: str, token) -> None:
    headers = {"Authorization": f"Bearer {token('acme')}"}
    with anyio.fail_after(30):
        async with (
            running_gateway(make_settings(secret, redis_url=redis_url)) as gateway,
            httpx.AsyncClient() as client,
        ):
            for query in ("mode=latest&maxRate=0", "mode=latest&maxRate=abc", "mode=latest&maxRate=1000", "mode=fast"):
                response = await client.get(f"{gateway.url}/tenants/acme/stream?wells=w1&{query}", headers=headers)
                assert response.status_code == 400, query
                assert response.json()["error"]
