"""What Redis Cluster (7.0) and redis-py (8.2, asyncio) do, established on a real six-node cluster:
the facts a sharded live feed and slot-grouped publishing are built on. Each test states one; if
an upgrade changes it, the test says so before production does.

A tenant's keys and its live channel `scada:{t}:live` share the hash tag {t}, so one slot.
"""

from __future__ import annotations

import asyncio

import anyio
import pytest
import redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection
from redis.crc import key_slot

from app.streams.redis.keys import channel_name, clock_key
from tests.cluster import HOST, LocalCluster, pushes, ssubscribed

pytestmark = pytest.mark.anyio

SPUBLISH = "redis.call('INCR', KEYS[1]); return redis.call('SPUBLISH', ARGV[1], ARGV[2])"


def tenant_where(cluster: LocalCluster, *, on: int | None = None, off: int | None = None, not_slot: int = -1) -> str:
    """A tenant id whose slot's primary is `on` (or is not `off`), in another slot than `not_slot`."""
    for n in range(10_000):
        tenant = f"t{n}"
        slot = key_slot(f"{{{tenant}}}".encode())
        port = cluster.owner(slot).port
        if slot != not_slot and (on is None or port == on) and (off is None or port != off):
            return tenant
    raise AssertionError("no such tenant")


async def close(*conns: Connection) -> None:
    for conn in conns:
        await conn.disconnect()


async def test_a_scripts_spublish_in_its_keys_slot_reaches_subscribers_on_the_primary_and_its_replica(
    redis_cluster: LocalCluster,
) -> None:
    channel = channel_name("acme")
    primary = redis_cluster.owner_of(channel)
    (replica,) = redis_cluster.replicas_of(primary)
    with anyio.fail_after(10):
        # Both protocols: redis-py 8 speaks RESP3 by default, the feed may choose either.
        subscribers = [
            await ssubscribed(port, channel, protocol) for port in (primary.port, replica.port) for protocol in (2, 3)
        ]
        with redis_cluster.node(primary.port).client() as client:
            assert client.eval(SPUBLISH, 1, clock_key("acme"), channel, "by-eval") == 2  # the primary's own subscribers
            assert client.evalsha(client.script_load(SPUBLISH), 1, clock_key("acme"), channel, "by-evalsha") == 2
            library = "#!lua name=facts\nredis.register_function('sp', function(keys, args)\n"
            library += "  return redis.call('SPUBLISH', args[1], args[2])\nend)"
            client.execute_command("FUNCTION", "LOAD", "REPLACE", library)
            assert client.execute_command("FCALL", "sp", 1, clock_key("acme"), channel, "by-fcall") == 2
        expected = [[b"smessage", channel.encode(), data] for data in (b"by-eval", b"by-evalsha", b"by-fcall")]
        # The replica's subscribers get them over the cluster bus.
        assert await asyncio.gather(*map(pushes, subscribers)) == [expected] * len(subscribers)
        await close(*subscribers)


async def test_a_scripts_spublish_to_a_slot_on_another_node_fails_the_script_after_its_earlier_writes(
    redis_cluster: LocalCluster,
) -> None:
    primary = redis_cluster.owner_of(clock_key("acme"))
    elsewhere = tenant_where(redis_cluster, off=primary.port)
    with redis_cluster.node(primary.port).client() as client:
        with pytest.raises(redis.ResponseError, match="Script attempted to access a non local key in a cluster node"):
            client.eval(SPUBLISH, 1, clock_key("acme"), channel_name(elsewhere), "lost")
        assert client.get(clock_key("acme")) == "1", "no rollback: the INCR before the failed call stays"
        caught = "local ok = redis.pcall('SPUBLISH', ARGV[1], 'x'); return ok.err"
        assert client.eval(caught, 1, clock_key("acme"), channel_name(elsewhere)) == (
            "ERR Script attempted to access a non local key in a cluster node"
        )


async def test_a_scripts_spublish_to_another_slot_on_the_same_node_is_not_refused(redis_cluster: LocalCluster) -> None:
    """A trap, not a feature: it works only while both slots share a node, so a script must never rely on it."""
    primary = redis_cluster.owner_of(clock_key("acme"))
    neighbour = tenant_where(redis_cluster, on=primary.port, not_slot=key_slot(clock_key("acme").encode()))
    with anyio.fail_after(10):
        subscriber = await ssubscribed(primary.port, channel_name(neighbour))
        with redis_cluster.node(primary.port).client() as client:
            assert client.eval(SPUBLISH, 1, clock_key("acme"), channel_name(neighbour), "cross-slot") == 1
        assert await pushes(subscriber) == [[b"smessage", channel_name(neighbour).encode(), b"cross-slot"]]
        await close(subscriber)


async def test_a_scripts_plain_publish_reaches_subscribers_on_every_node(redis_cluster: LocalCluster) -> None:
    channel = channel_name("acme")
    primary = redis_cluster.owner_of(channel)
    with anyio.fail_after(10):
        subscribers = []
        for port in redis_cluster.ports:
            conn = Connection(host=HOST, port=port, socket_timeout=5)
            await conn.connect()  # type: ignore[no-untyped-call]
            await conn.send_command("SUBSCRIBE", channel)
            assert await conn.read_response(push_request=True) == [b"subscribe", channel.encode(), 1]
            subscribers.append(conn)
        with redis_cluster.node(primary.port).client() as client:
            script = "return redis.call('PUBLISH', ARGV[1], ARGV[2])"
            assert client.eval(script, 1, clock_key("acme"), channel, "everywhere") == 1, (
                "counts local subscribers only"
            )
        everywhere = [[b"message", channel.encode(), b"everywhere"]]  # broadcast over the bus to all six nodes
        assert await asyncio.gather(*map(pushes, subscribers)) == [everywhere] * len(subscribers)
        await close(*subscribers)


async def test_a_migrated_slot_unsubscribes_its_channels_on_the_old_primary_and_its_replica(
    redis_cluster: LocalCluster,
) -> None:
    channel = channel_name("acme")
    source = redis_cluster.owner_of(channel)
    (replica,) = redis_cluster.replicas_of(source)
    with anyio.fail_after(15):
        subscribers = [
            await ssubscribed(port, channel, protocol) for port in (source.port, replica.port) for protocol in (2, 3)
        ]
        # The old owner pushes it as soon as it learns (over the bus) that the target took the
        # slot, in both protocols: the same three fields as a confirmed SUNSUBSCRIBE, count 0.
        _, target = redis_cluster.migrate_slot(channel)
        for conn in subscribers:
            assert await pushes(conn) == [[b"sunsubscribe", channel.encode(), 0]]
            assert conn.is_connected, "the connection stays open, with nothing subscribed"
            await conn.send_command("SSUBSCRIBE", channel)
            with pytest.raises(redis.exceptions.MovedError) as moved:
                await conn.read_response(push_request=True)
            assert (moved.value.slot_id, moved.value.port) == (key_slot(channel.encode()), target)
        await close(*subscribers)

        moved_here = await ssubscribed(target, channel)
        with redis_cluster.node(target).client() as client:
            client.eval(SPUBLISH, 1, clock_key("acme"), channel, "after")
        assert await pushes(moved_here) == [[b"smessage", channel.encode(), b"after"]]
        await close(moved_here)


async def test_during_a_migration_a_script_sent_to_the_target_publishes_only_to_the_targets_subscribers(
    redis_cluster: LocalCluster,
) -> None:
    """Why a feed must fill the gap after a slot moved: until the slot is the target's, a publish whose
    keys already moved (ASK) runs there, and the old owner's subscribers never see it."""
    channel, slot = channel_name("acme"), key_slot(channel_name("acme").encode())
    source = redis_cluster.owner(slot)
    target = next(view for view in redis_cluster.primaries() if view.port != source.port)
    with anyio.fail_after(15):
        on_source = await ssubscribed(source.port, channel)
        with redis_cluster.node(source.port).client() as src, redis_cluster.node(target.port).client() as dst:
            src.set(clock_key("acme"), "0")
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
            src.execute_command("MIGRATE", HOST, target.port, "", 0, 5000, "KEYS", clock_key("acme"))
            with pytest.raises(redis.exceptions.AskError):
                src.eval(SPUBLISH, 1, clock_key("acme"), channel, "asked")
            with dst.pipeline(transaction=False) as pipe:
                pipe.execute_command("ASKING")
                pipe.eval(SPUBLISH, 1, clock_key("acme"), channel, "asked")
                assert pipe.execute() == [True, 0], "ran on the target, where nobody listens yet"
            assert await pushes(on_source) == []
            dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
        assert await pushes(on_source) == [[b"sunsubscribe", channel.encode(), 0]]
        await close(on_source)


async def test_a_failover_drops_the_old_primarys_subscribers_and_keeps_the_promoted_replicas(
    redis_cluster: LocalCluster,
) -> None:
    channel = channel_name("acme")
    primary = redis_cluster.owner_of(channel)
    (replica,) = redis_cluster.replicas_of(primary)
    with anyio.fail_after(20):
        on_primary = await ssubscribed(primary.port, channel)
        on_replica = await ssubscribed(replica.port, channel)
        promoted = await asyncio.to_thread(redis_cluster.kill_primary, primary.port)
        assert promoted == replica.port
        with pytest.raises(redis.ConnectionError):
            await on_primary.read_response(push_request=True)
        # No push at all on the replica: the slot never left its shard, so the subscription holds.
        with redis_cluster.node(promoted).client() as client:
            client.eval(SPUBLISH, 1, clock_key("acme"), channel, "after-failover")
        assert await pushes(on_replica) == [[b"smessage", channel.encode(), b"after-failover"]]
        await close(on_primary, on_replica)


async def test_the_cluster_client_routes_evalsha_by_its_first_key_and_reloads_a_missing_script(
    redis_cluster: LocalCluster,
) -> None:
    tenants = [tenant_where(redis_cluster, on=view.port) for view in redis_cluster.primaries()]
    client = RedisCluster(host=HOST, port=redis_cluster.ports[0])
    try:
        with anyio.fail_after(10):
            script = client.register_script(SPUBLISH)
            calls = {view.port: evalsha_calls(redis_cluster, view.port) for view in redis_cluster.primaries()}
            for tenant in tenants:
                assert await script(keys=[clock_key(tenant)], args=[channel_name(tenant), "x"]) == 0
            for tenant in tenants:  # now loaded everywhere: one EVALSHA per tenant, on its slot's primary only
                port = redis_cluster.owner_of(clock_key(tenant)).port
                before = evalsha_calls(redis_cluster, port)
                await script(keys=[clock_key(tenant)], args=[channel_name(tenant), "x"])
                assert evalsha_calls(redis_cluster, port) == before + 1
            assert all(evalsha_calls(redis_cluster, port) > calls[port] for port in calls)

            # The NOSCRIPT reload (SCRIPT LOAD) reached every primary and no replica; SCRIPT LOAD is
            # not replicated, so a promoted replica starts without it...
            for view in redis_cluster.view():
                with redis_cluster.node(view.port).client() as node:
                    assert node.script_exists(script.sha) == [view.is_primary], view
            # ...which AsyncScript survives: on NOSCRIPT it loads the script again and retries.
            owner = redis_cluster.owner_of(clock_key("acme")).port
            with redis_cluster.node(owner).client() as node:
                node.script_flush()
            assert await script(keys=[clock_key("acme")], args=[channel_name("acme"), "x"]) == 0
            assert await client.get(clock_key("acme")) == b"1"

            with pytest.raises(redis.exceptions.RedisClusterException, match="all keys must map to the same key slot"):
                await script(keys=[clock_key(tenants[0]), clock_key(tenants[1])], args=["c", "x"])
    finally:
        await client.aclose()


def evalsha_calls(cluster: LocalCluster, port: int) -> int:
    with cluster.node(port).client() as node:
        return int(node.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


async def test_the_cluster_clients_slot_map_follows_a_migration_only_when_refreshed(
    redis_cluster: LocalCluster,
) -> None:
    channel = channel_name("acme")
    client = RedisCluster(host=HOST, port=redis_cluster.ports[0])
    try:
        with anyio.fail_after(10):
            await client.initialize()
            node = client.get_node_from_key(channel)
            assert node is not None
            source, target = redis_cluster.migrate_slot(channel)
            assert node.port == source
            stale = client.get_node_from_key(channel)
            assert stale is not None
            assert stale.port == source, "nothing told the client yet"
            await client.nodes_manager.initialize()  # CLUSTER SLOTS again: the way to force a refresh
            fresh = client.get_node_from_key(channel)
            assert fresh is not None
            assert fresh.port == target
    finally:
        await client.aclose()


@pytest.mark.parametrize("protocol", [2, 3])
async def test_a_sharded_subscription_connection_takes_one_slot_per_command(
    redis_cluster: LocalCluster, protocol: int
) -> None:
    """One SSUBSCRIBE per slot, a MOVED error (not a push) for a channel of a slot the node lost or
    never had, and the connection goes on after it: a feed pairs errors with commands too."""
    owner = redis_cluster.owner_of(channel_name("acme")).port
    neighbour = tenant_where(redis_cluster, on=owner, not_slot=key_slot(channel_name("acme").encode()))
    away = tenant_where(redis_cluster, off=owner)
    with anyio.fail_after(10):
        conn = await ssubscribed(owner, channel_name("acme"), protocol)
        await conn.send_command("SSUBSCRIBE", channel_name(neighbour), "scada:{acme}:other")
        with pytest.raises(redis.exceptions.ClusterCrossSlotError):
            await conn.read_response(push_request=True)
        await conn.send_command("SSUBSCRIBE", channel_name(neighbour))
        assert await conn.read_response(push_request=True) == [b"ssubscribe", channel_name(neighbour).encode(), 2]
        await conn.send_command("SUNSUBSCRIBE", channel_name(away))
        with pytest.raises(redis.exceptions.MovedError):
            await conn.read_response(push_request=True)
        await conn.send_command("PING")  # a health check on a subscribed connection, as RedisFeed sends
        assert await conn.read_response(push_request=True) == ([b"pong", b""] if protocol == 2 else b"PONG")
        await close(conn)
