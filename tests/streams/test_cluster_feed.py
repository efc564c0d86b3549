"""The cluster live feed when opening the new owner's connection fails during a move: a real cluster."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import anyio
import pytest
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import Connection

from app.models import StreamId
from app.streams.redis import clusterfeed, connect_redis
from app.streams.redis.clusterfeed import ClusterFeed
from app.streams.redis.keys import clock_key
from tests.cluster import LocalCluster
from tests.conftest import wait_until
from tests.factories import make_reading

pytestmark = pytest.mark.anyio


async def test_a_tenant_whose_new_node_refused_the_first_connection_is_moved_on_the_next_try(
    redis_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = redis_cluster.owner_of(clock_key("acme")).port
    refused: list[str] = []
    real = clusterfeed._connector

    def first_to_the_new_owner_refused(node: ClusterNode) -> Callable[[], Connection]:
        make = real(node)

        def connect() -> Connection:
            conn = make()
            if not refused and node.port != source:
                refused.append(node.name)
                conn.port = 1  # nothing listens there: refused, as a node at maxclients or mid-restart
            return conn

        return connect

    got: list[StreamId] = []
    with anyio.fail_after(30):
        async with connect_redis(redis_cluster.startup_url, cluster=True) as broker:
            async with broker.log.live_feed(lambda tenant, event: got.append(event.id)) as feed:
                assert isinstance(feed, ClusterFeed)
                gaps: list[int] = []
                feed.on_gap = lambda: gaps.append(1)
                await feed.subscribe("acme")
                monkeypatch.setattr(clusterfeed, "_connector", first_to_the_new_owner_refused)
                await asyncio.to_thread(redis_cluster.migrate_slot, clock_key("acme"))
                await wait_until(lambda: bool(refused) and feed.connected)
                await feed.confirmed("acme")
                published = await broker.log.publish([make_reading(float(v), tenant="acme") for v in range(5)])
                await wait_until(lambda: got[-5:] == published)
                assert gaps, "the move was reported as a gap to fill"
