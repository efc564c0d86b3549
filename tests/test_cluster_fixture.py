"""The Redis Cluster test helpers (tests/cluster.py) do what they say: six healthy nodes, a slot
moved with its keys, a killed primary replaced by its replica."""

from __future__ import annotations

import time

import pytest
import redis
from redis.crc import key_slot

from tests.cluster import LocalCluster


def test_the_cluster_has_three_primaries_each_with_a_synced_replica(redis_cluster: LocalCluster) -> None:
    views = redis_cluster.view()
    primaries = [view for view in views if view.is_primary and view.slots]
    assert len(views) == 6
    assert len(primaries) == 3
    assert sum(last - first + 1 for view in primaries for first, last in view.slots) == 16384
    for primary in primaries:
        assert len(redis_cluster.replicas_of(primary)) == 1
    assert all(port < 55536 - 10_000 for port in redis_cluster.ports), "the bus port (port + 10000) must exist"


def test_a_migrated_slot_is_served_with_its_keys_by_the_new_primary(redis_cluster: LocalCluster) -> None:
    key = "scada:{acme}:clock"
    source = redis_cluster.owner_of(key)
    with redis_cluster.node(source.port).client() as client:
        client.set(key, "1-0")

    moved_from, moved_to = redis_cluster.migrate_slot(key)

    assert moved_from == source.port
    assert moved_to != source.port
    for port in redis_cluster.ports:  # every node, replicas too, names the new owner
        assert redis_cluster.owner(key_slot(key.encode()), port).port == moved_to
    with redis_cluster.node(moved_to).client() as client:
        assert client.get(key) == "1-0"
    with redis_cluster.node(moved_from).client() as client, pytest.raises(redis.exceptions.MovedError) as moved:
        client.get(key)
    assert (moved.value.slot_id, moved.value.port) == (key_slot(key.encode()), moved_to)


def test_a_killed_primary_is_replaced_by_its_replica_within_10_s(redis_cluster: LocalCluster) -> None:
    key = "scada:{acme}:clock"
    primary = redis_cluster.owner_of(key)
    (replica,) = redis_cluster.replicas_of(primary)
    with redis_cluster.node(primary.port).client() as client:
        client.set(key, "1-0")
        assert client.wait(1, 2000) == 1, "the replica has the key before the primary dies"

    began = time.monotonic()
    promoted = redis_cluster.kill_primary(primary.port)
    took_s = time.monotonic() - began

    assert promoted == replica.port
    assert took_s < 10, f"promotion took {took_s:.1f} s"  # node timeout 2 s, then the replica's election
    assert not redis_cluster.node(primary.port).alive
    assert redis_cluster.owner_of(key).port == replica.port
    with redis_cluster.node(replica.port).client() as client:
        assert client.get(key) == "1-0"
        assert "cluster_state:ok" in str(client.execute_command("CLUSTER", "INFO"))
