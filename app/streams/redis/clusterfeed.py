"""The live feed on Redis Cluster: one sharded Pub/Sub connection per primary that serves a tenant.

A tenant's channel `scada:{t}:live` is in the tenant's slot, so its messages come from the
primary that owns that slot, published by the same script that wrote the history. The feed
keeps one RedisFeed (one connection, its own reconnects) per such primary and knows which
tenant lives where.

When a slot moves (the node sends `sunsubscribe` for it, or refuses a command with MOVED) or a
primary is lost (its connection drops and does not come back, while a replica is promoted),
the feed refreshes the slot map and moves each tenant whose slot is now elsewhere: it forgets
the tenant on the old connection, tells the hub a gap is due (`on_gap`, before the new
subscription can deliver anything, so the hub holds live events back in order), subscribes on
the new owner, and `confirmed(tenant)` returns once that subscription is confirmed. The hub
then fills the gap from history, as after a Redis outage: what was published on either node
meanwhile is delivered once, in order. redis-py's own ClusterPubSub is not used: it follows a
moved slot only when something else refreshes the map, and its subscribe returns before Redis
confirms it (../shared/research and tests/streams/test_cluster_facts.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection
from redis.exceptions import RedisClusterException, RedisError

from app.backoff import Backoff
from app.cancellation import pause
from app.errors import BrokerError
from app.models import StreamId
from app.streams.codec import MalformedValues
from app.streams.redis.client import redis_errors
from app.streams.redis.feed import RedisFeed, TenantMoved
from app.streams.redis.keys import channel_name
from app.streams.seams import Deliver

logger = logging.getLogger(__name__)


def _connector(node: ClusterNode) -> Callable[[], Connection]:
    def connect() -> Connection:
        return node.connection_class(**node.connection_kwargs)

    return connect


class ClusterFeed:
    """The LiveFeed of app/streams/seams.py on a Redis Cluster. See the module docstring."""

    def __init__(
        self,
        client: RedisCluster,
        deliver: Deliver,
        on_close: Callable[[ClusterFeed], None],
        malformed: MalformedValues,
        ping_interval_s: float = 5.0,
    ) -> None:
        self._client = client
        self._deliver = deliver
        self._on_close = on_close
        self._malformed = malformed
        self._ping_interval_s = ping_interval_s
        self.on_gap: Callable[[], None] | None = None
        self.reconnects = 0  # gaps reported: a shard's own reconnects and every move
        self._shards: dict[str, RedisFeed] = {}  # by node name
        self._opening: dict[str, asyncio.Task[RedisFeed]] = {}
        self._home: dict[str, str] = {}  # tenant -> node name
        self._moving: dict[str, asyncio.Future[None]] = {}  # tenant -> subscribed on its new node
        self._rehoming: asyncio.Task[None] | None = None
        self._again = False
        self._closing = False

    @property
    def connected(self) -> bool:
        """Every node that serves a subscribed tenant is connected, and no tenant is moving."""
        if self._moving:
            return False
        return all(name in self._shards and self._shards[name].connected for name in set(self._home.values()))

    async def start(self) -> None:
        with redis_errors("connect cluster"):
            await self._client.initialize()

    async def subscribe(self, tenant: str) -> None:
        try:
            while True:
                node = self._owner(tenant)
                self._home[tenant] = node.name
                shard = await self._shard(node)
                try:
                    await shard.subscribe(tenant)
                except TenantMoved:
                    continue  # the slot map changed while we waited: where it lives now
                await self._unless_left(tenant, node, shard)
                return
        except BaseException:
            self._home.pop(tenant, None)  # a tenant we never subscribed must not count against `connected`
            raise

    async def unsubscribe(self, tenant: str) -> None:
        name = self._home.pop(tenant, None)
        moving = self._moving.pop(tenant, None)
        if moving is not None and not moving.done():
            moving.cancel()
        shard = self._shards.get(name) if name is not None else None
        if shard is not None:
            await shard.unsubscribe(tenant)

    async def confirmed(self, tenant: str) -> None:
        moving = self._moving.get(tenant)
        if moving is not None:
            try:
                await asyncio.shield(moving)
            except asyncio.CancelledError:
                if moving.cancelled():  # its last stream left meanwhile: nothing to confirm
                    return
                raise
        name = self._home.get(tenant)
        shard = self._shards.get(name) if name is not None else None
        if shard is not None:
            await shard.confirmed(tenant)

    def heard(self, tenant: str) -> StreamId | None:
        found = [heard for shard in self._shards.values() if (heard := shard.heard(tenant)) is not None]
        return max(found, default=None)

    async def restart(self, why: str) -> None:
        self._rehome()  # a stale slot map is one way a subscription goes quiet
        for shard in list(self._shards.values()):
            await shard.restart(why)

    def _owner(self, tenant: str) -> ClusterNode:
        with redis_errors("find the node of a tenant"):
            node = self._client.get_node_from_key(channel_name(tenant))
        if node is None:
            raise BrokerError("subscribe", f"no node serves the slot of {tenant}")
        return node

    async def _shard(self, node: ClusterNode) -> RedisFeed:
        shard = self._shards.get(node.name)
        if shard is not None:
            return shard
        opening = self._opening.get(node.name)
        if opening is None:
            opening = self._opening[node.name] = asyncio.create_task(self._open(node), name=f"feed {node.name}")
        try:
            return await asyncio.shield(opening)
        finally:
            if opening.done() and self._opening.get(node.name) is opening:
                del self._opening[node.name]

    async def _open(self, node: ClusterNode) -> RedisFeed:
        shard = RedisFeed(
            _connector(node),
            self._deliver,
            on_close=lambda _: None,
            malformed=self._malformed,
            on_gap=self._gap,
            ping_interval_s=self._ping_interval_s,
            on_moved=lambda _tenant: self._rehome(),
            on_lost=self._rehome,
        )
        await shard.start()
        self._shards[node.name] = shard
        return shard

    def _gap(self) -> None:
        self.reconnects += 1
        if self.on_gap is not None:
            self.on_gap()

    def _rehome(self) -> None:
        """Check where every tenant lives (coalesced: one check at a time, and one more after it)."""
        if self._closing:
            return
        if self._rehoming is None or self._rehoming.done():
            self._rehoming = asyncio.create_task(self._rehome_until_settled(), name="cluster-feed-rehome")
        else:
            self._again = True

    async def _rehome_until_settled(self) -> None:
        backoff = Backoff(first_s=0.1, cap_s=2.0)
        while True:
            self._again = False
            try:
                await self._move_tenants()
            except (RedisError, RedisClusterException, OSError, BrokerError, TenantMoved) as exc:
                # The cluster is still changing (a failover under way, a slot moving again): look again soon.
                logger.warning("cluster live feed: slot map not settled: %s", exc)
                self._again = True
                await pause(backoff.next())
            if not self._again:
                return

    async def _move_tenants(self) -> None:
        await self._client.nodes_manager.initialize()
        # A tenant still moving is tried again even where its home already names the new node:
        # the last attempt may have failed to open that node's connection.
        owners = {tenant: self._owner(tenant) for tenant in list(self._home)}
        moves = {
            tenant: node
            for tenant, node in owners.items()
            if node.name != self._home.get(tenant) or tenant in self._moving
        }
        if moves:
            loop = asyncio.get_running_loop()
            for tenant in moves:
                old = self._shards.get(self._home[tenant])
                if old is not None:
                    old.drop(tenant)
                if tenant not in self._moving:
                    self._moving[tenant] = loop.create_future()
            logger.warning("cluster live feed: %d tenants moved to other nodes, filling the gap", len(moves))
            self._gap()  # before the new subscriptions can deliver: the hub holds live events from here
            await asyncio.gather(*(self._settle(tenant, node) for tenant, node in moves.items()))
        await self._close_dead_shards()

    async def _settle(self, tenant: str, node: ClusterNode) -> None:
        if self._home.get(tenant) is None:  # its last stream left while the map was refreshed
            return
        self._home[tenant] = node.name
        shard = await self._shard(node)
        await shard.subscribe(tenant)
        await self._unless_left(tenant, node, shard)
        moving = self._moving.pop(tenant, None)
        if moving is not None and not moving.done():
            moving.set_result(None)

    async def _unless_left(self, tenant: str, node: ClusterNode, shard: RedisFeed) -> None:
        """Undo a subscription whose tenant was unsubscribed (its last stream left) while the
        node's connection was opening: nothing would ever unsubscribe it, and it would keep that
        connection from closing."""
        if self._home.get(tenant) != node.name:
            await shard.unsubscribe(tenant)

    async def _close_dead_shards(self) -> None:
        # A shard no tenant lives on and that lost its node (a failed primary) only retries for ever.
        for name, shard in list(self._shards.items()):
            if shard.topics == 0 and not shard.connected:
                del self._shards[name]
                await shard.aclose()

    async def aclose(self) -> None:
        self._closing = True
        if self._rehoming is not None:
            self._rehoming.cancel()
            # Whatever it ended with (cancelled, or a failure of its own), the shards still close.
            await asyncio.gather(self._rehoming, return_exceptions=True)
        for opening in self._opening.values():
            opening.cancel()
        for shard in list(self._shards.values()):
            await shard.aclose()
        self._shards.clear()
        for moving in self._moving.values():
            moving.cancel()
        self._moving.clear()
        self._on_close(self)
