"""A gateway and a publisher on a primary watched by Redis Sentinel: the primary killed -9 under load.

`redis+sentinel://` URLs: every new connection asks the sentinels where the primary is, so the
live feed's reconnect lands on the promoted replica, resubscribes and fills the gap from history.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import anyio
import httpx
import pytest
import redis

from app.errors import BrokerError
from app.models import StreamId, Topic
from app.streams.redis import connect_redis
from app.streams.redis.client import parse_sentinel_url
from app.streams.redis.keys import log_key
from tests.conftest import gateway_process, wait_for_status, wait_until
from tests.factories import make_reading
from tests.faults.streams import FAST_FEED, PacedPublisher, assert_exactly_the_log, recording_streams
from tests.sentinel import SentinelGroup

pytestmark = pytest.mark.anyio

WELLS = [f"w{i:02d}" for i in range(5)]


def log_of(port: int, well: str) -> list[StreamId]:
    with redis.Redis(port=port, socket_timeout=5) as client:
        entries = client.xrange(log_key(Topic("acme", well)))
    return [StreamId.parse(raw.decode()) for raw, _ in entries]


def test_a_sentinel_url_names_its_sentinels_service_and_database() -> None:
    assert parse_sentinel_url("redis+sentinel://:pw@10.0.0.1:26379,[::1]:26380/main/2") == (
        [("10.0.0.1", 26379), ("::1", 26380)],
        "main",
        2,
        None,
        "pw",
    )
    # An ACL user, and a password with characters a URL must encode.
    target = parse_sentinel_url("redis+sentinel://ingest:p%40ss%2Fw%3Ard@h:26379/main")
    assert (target.username, target.password, target.db) == ("ingest", "p@ss/w:rd", 0)
    for bad in ("redis+sentinel://h:1", "redis+sentinel://h/main", "redis+sentinel://h:1/main/x"):
        with pytest.raises(ValueError, match=r"sentinel|database"):
            parse_sentinel_url(bad)


async def test_the_primary_killed_9_under_load_fails_over_through_sentinel_and_loses_nothing(
    tmp_path: Path, secret: str, token
) -> None:
    headers = {"Authorization": f"Bearer {token('acme')}"}
    with SentinelGroup(tmp_path / "redis") as group, anyio.fail_after(90):
        async with (
            gateway_process(secret, WELLSTREAM_REDIS_URL=group.url, **FAST_FEED) as gateway,
            connect_redis(group.url, timeout_s=1) as broker,
            httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=None)) as client,
            recording_streams(client, gateway.url, WELLS, 2, headers) as streams,
        ):
            publisher = PacedPublisher(broker, WELLS)  # 200 readings/s
            publishing = asyncio.create_task(publisher.run())
            try:
                await wait_until(lambda: all(len(s.ids) >= 10 for s in streams))
                seen: list[int] = []
                # Between two batches, once the replica has everything (what a primary had not
                # passed on dies with it: docs/deploy.md).
                async with publisher.gate:
                    await asyncio.to_thread(group.wait_replicated)
                    group.primary.kill()
                with contextlib.suppress(httpx.TransportError):
                    seen.append((await client.get(gateway.url + "/readyz", timeout=5)).status_code)
                promoted = await asyncio.to_thread(group.wait_failed_over)
                refused = publisher.refused
                acked = sum(map(len, publisher.acknowledged.values()))
                await wait_until(lambda: sum(map(len, publisher.acknowledged.values())) > acked + 200)
            finally:
                publisher.stop.set()
                await publishing
            for stream in streams:
                last = publisher.last_acknowledged(stream.well)
                await wait_until(lambda: bool(stream.ids) and stream.ids[-1] >= last)  # noqa: B023
            await wait_for_status(gateway.url + "/readyz")
            logs = {well: await asyncio.to_thread(log_of, promoted, well) for well in WELLS}
    assert refused > 0, "the publisher saw the primary go"
    assert seen == [503], "/readyz said the gateway had no primary"
    for stream in streams:
        assert not stream.ended, "the stream stayed open through the failover"
        assert_exactly_the_log(stream, logs[stream.well])
        assert set(publisher.acknowledged[stream.well]) <= set(stream.ids)


async def test_a_burst_through_sentinel_waits_its_turn_instead_of_failing(tmp_path: Path) -> None:
    # redis-py's Sentinel pool fails a command past max_connections; opens in a burst would get 503s.
    with SentinelGroup(tmp_path / "redis") as group, anyio.fail_after(30):
        async with connect_redis(group.url, timeout_s=5) as broker:
            await broker.log.publish([make_reading(1.0)])
            reads = await asyncio.gather(*(broker.log.read("acme", ["w1"], None, 0) for _ in range(200)))
    assert all("w1" in read.wells for read in reads)


async def test_sentinels_with_a_password_of_their_own_are_asked_with_it(tmp_path: Path) -> None:
    with SentinelGroup(tmp_path / "redis", sentinel_password="s3ntinel") as group, anyio.fail_after(30):
        async with connect_redis(group.url, timeout_s=2, sentinel_password="s3ntinel") as broker:
            ids = await broker.log.publish([make_reading(1.0)])
            read = await broker.log.read("acme", ["w1"], None, 0)
        assert ids
        assert "w1" in read.wells
        async with connect_redis(group.url, timeout_s=2) as broker:
            with pytest.raises(BrokerError):  # the sentinels refuse to name the primary
                await broker.log.publish([make_reading(2.0)])
