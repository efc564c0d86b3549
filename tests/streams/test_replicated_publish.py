"""A published batch counts as stored only once a replica has it: a real primary and replica."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import redis

from app.errors import BrokerError
from app.models import Origin, Topic
from app.streams.redis import connect_redis
from app.streams.redis.keys import log_key
from tests.conftest import RedisServer
from tests.factories import make_reading

pytestmark = pytest.mark.anyio

KEY = log_key(Topic("acme", "w1"))


@pytest.fixture
def primary_and_replica(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    (tmp_path / "primary").mkdir()
    (tmp_path / "replica").mkdir()
    primary = RedisServer(tmp_path / "primary")
    primary.start()
    with redis.Redis(port=primary.port) as client:
        client.config_set("repl-diskless-sync-delay", 0)  # the first sync at once, not after 5 s
    replica = RedisServer(tmp_path / "replica", replica_of=primary.port)
    replica.start()
    try:
        deadline = time.monotonic() + 10
        with redis.Redis(port=primary.port) as client:
            while client.info("replication").get("slave0", {}).get("state") != "online":  # synced
                assert time.monotonic() < deadline, "the replica did not connect"
                time.sleep(0.02)
        yield primary, replica
    finally:
        replica.thaw()
        replica.stop()
        primary.stop()


def entries(server: RedisServer) -> int:
    with redis.Redis(port=server.port, socket_timeout=5) as client:
        return int(client.xlen(KEY))


async def test_a_batch_is_stored_only_once_a_replica_has_it(
    primary_and_replica: tuple[RedisServer, RedisServer],
) -> None:
    primary, replica = primary_and_replica
    batch, origin = [make_reading(float(i)) for i in range(3)], Origin("a1b2c3d4", (1, 2, 3))
    with anyio.fail_after(20):
        # The default: 1 replica where there are any. WAIT may take up to timeout_s / 2 (2.5 s): a
        # busy machine can need more than the 0.5 s that timeout_s=1 allowed for the first batch.
        async with connect_redis(primary.url, timeout_s=5) as broker:
            assert len(await broker.log.publish([make_reading(0.5)])) == 1
            assert entries(replica) == 1, "the answer came after the replica had it"
            replica.freeze()
            with pytest.raises(BrokerError, match="0 of 1 replicas"):
                await broker.log.publish(batch, origin)  # applied on the primary, but not stored yet
            replica.thaw()
            assert await broker.log.publish(batch, origin) == [], "the retry lands nothing twice"
            assert (entries(primary), entries(replica)) == (4, 4)


async def test_no_replicas_asked_for_publishes_without_waiting(
    primary_and_replica: tuple[RedisServer, RedisServer],
) -> None:
    primary, replica = primary_and_replica
    with anyio.fail_after(20):
        async with connect_redis(primary.url, timeout_s=1, min_replicas_ack=0) as broker:
            replica.freeze()
            assert len(await broker.log.publish([make_reading(1.0)])) == 1
    assert entries(primary) == 1
