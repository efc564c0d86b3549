"""The stream log on Redis: one server-side script per published batch, one per read.

XADD, HSET, SADD and PUBLISH happen in the same script (publish.lua), so history and live
never disagree; reads take the stream's bookkeeping and a page in one step (stream_state.lua).
Whatever a read finds that is not a reading of its key (another producer may write anything)
is skipped and noted (`malformed`), never raised: one bad value must not fail a well's reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection

from app.models import History, Origin, Reading, StreamEvent, StreamId, TenantRead, Topic, WellRead
from app.streams.codec import MalformedValues, decode_event, decode_latest, shown
from app.streams.redis.client import RedisClient, redis_errors, script
from app.streams.redis.clusterfeed import ClusterFeed
from app.streams.redis.feed import RedisFeed
from app.streams.redis.keys import channel_name, clock_key, latest_key, log_key, producer_key, tenant_prefix, wells_key
from app.streams.redis.replicas import ReplicatedPublish
from app.streams.redis.stores import well_member
from app.streams.seams import Deliver, LiveFeed

logger = logging.getLogger(__name__)


class RedisStreamLog:
    """The stream log on a standalone Redis or a Redis Cluster.

    Every call stays inside one tenant's hash slot (its keys, its producer key and its sharded
    channel share the tag `{tenant}`), so the same scripts run on both.
    """

    def __init__(
        self,
        client: RedisClient,
        max_len: int = 10_000,
        max_age_s: float = 0,
        ping_interval_s: float = 5.0,
        malformed: MalformedValues | None = None,
        min_replicas_ack: int | None = None,
        replica_timeout_s: float = 1.0,
    ):
        self._client = client
        self._replicated = ReplicatedPublish(client, min_replicas_ack, replica_timeout_s)
        self._max_len = max_len
        self._max_age_ms = int(max_age_s * 1000)
        self._ping_interval_s = ping_interval_s
        self._publish_script = script(client, "publish", after=("clock",))
        self._read_script = script(client, "read")
        self._range_script = script(client, "stream_state")
        self.feeds: set[RedisFeed | ClusterFeed] = set()
        self.rejected = 0  # readings Redis refused for good (a key of the wrong type)
        # Shared with the feeds and the registry: one count and one log budget per broker.
        self._malformed = malformed if malformed is not None else MalformedValues()

    @property
    def malformed(self) -> Mapping[str, int]:
        return self._malformed.counts

    async def publish(self, readings: Sequence[Reading], origin: Origin | None = None) -> list[StreamId]:
        if not readings:
            return []
        seqs = origin.seqs if origin is not None else (0,) * len(readings)
        if len(seqs) != len(readings):
            raise ValueError("an origin needs one seq per reading")
        by_tenant: dict[str, list[int]] = {}
        for index, reading in enumerate(readings):
            by_tenant.setdefault(reading.tenant_id, []).append(index)
        # One script call per tenant, each inside the tenant's slot (so it runs on Redis Cluster),
        # all of them at once: on a cluster they go to different primaries in parallel.
        parts = await asyncio.gather(
            *(
                self._publish_tenant(tenant, [(readings[i], seqs[i]) for i in at], origin)
                for tenant, at in by_tenant.items()
            )
        )
        ids: list[StreamId | None] = [None] * len(readings)
        for at, part in zip(by_tenant.values(), parts, strict=True):
            for index, stream_id in zip(at, part, strict=True):
                ids[index] = stream_id
        return [stream_id for stream_id in ids if stream_id is not None]

    async def _publish_tenant(
        self, tenant: str, batch: list[tuple[Reading, int]], origin: Origin | None
    ) -> list[StreamId | None]:
        keys: list[str] = []
        args: list[str | bytes | int] = [self._max_len, self._max_age_ms, origin.producer if origin else ""]
        wells, clock, channel = wells_key(tenant), clock_key(tenant), channel_name(tenant)
        for reading, seq in batch:
            topic = Topic(tenant, reading.well_id)
            keys += [log_key(topic), latest_key(topic), wells, clock]
            args += [reading.well_id, reading.tag_name, channel, reading.to_json(), seq]
        if origin is not None:
            keys.append(producer_key(origin.producer, tenant))
        with redis_errors("publish"):
            ids, problems = await self._replicated.run(self._publish_script, clock, keys, args)
        if problems:
            # Not retryable (the same keys would refuse again): said loudly, counted, never repeated.
            self.rejected += sum(1 for p in problems if p.startswith(b"rejected"))
            logger.error(
                "publish: %d problems in a batch of %d readings of %s, first: %s",
                len(problems),
                len(batch),
                tenant,
                problems[0].decode(errors="replace"),
            )
        return [StreamId.parse(raw.decode()) if raw else None for raw in ids]

    async def read(self, tenant: str, wells: Sequence[str] | None, after: StreamId | None, count: int) -> TenantRead:
        if wells is not None and not wells:  # the script takes "no wells" as "every well"
            return TenantRead(await self._clock(tenant), {})
        args: list[str | int] = [tenant_prefix(tenant), str(after) if after is not None else "", max(count, 1)]
        args += list(wells) if wells is not None else []
        with redis_errors("read streams"):
            result: list[Any] = await self._read_script(keys=[clock_key(tenant), wells_key(tenant)], args=args)
        clock_raw, *per_well = result
        reads = {}
        for raw_well, truncated, complete, entries, flat in per_well:
            well = well_member(tenant, raw_well, self._malformed)
            if well is None:
                continue
            topic = Topic(tenant, well)
            events = self._events(topic, entries)
            latest = self._latest(topic, flat) if after is None or truncated else None
            reads[topic.well] = WellRead(events, bool(complete), bool(truncated), latest)
        return TenantRead(StreamId.parse(clock_raw.decode()), reads)

    def _latest(self, topic: Topic, flat: list[bytes]) -> dict[str, bytes]:
        latest = {}
        for field, data in zip(flat[::2], flat[1::2], strict=True):
            try:
                tag, wire = decode_latest(field, data, topic)
            except ValueError as exc:
                self._malformed.skip("latest", f"{latest_key(topic)} field {shown(field)}", exc)
                continue
            latest[tag] = wire
        return latest

    async def _clock(self, tenant: str) -> StreamId:
        with redis_errors("read clock"):
            raw = await self._client.get(clock_key(tenant))
        text = raw.decode() if isinstance(raw, bytes) else raw
        return StreamId.parse(text) if text else StreamId(0, 0)

    async def clocks(self, tenants: Sequence[str]) -> dict[str, StreamId]:
        if not tenants:
            return {}
        with redis_errors("read clocks"):
            keys = [clock_key(tenant) for tenant in tenants]
            client = self._client
            # Tenants sit in different slots: a cluster splits the read per node (no atomicity needed).
            raw = await (client.mget_nonatomic(keys) if isinstance(client, RedisCluster) else client.mget(keys))
        clocks = {}
        for tenant, value in zip(tenants, raw, strict=True):
            try:
                text = value.decode() if isinstance(value, bytes) else value
                clocks[tenant] = StreamId.parse(text) if text else StreamId(0, 0)
            except (UnicodeDecodeError, ValueError):
                continue  # not an id (another producer wrote it): nothing to check that tenant against
        return clocks

    async def range(self, topic: Topic, after: StreamId, upto: StreamId, limit: int) -> History:
        if not after < upto:
            return History([], False, after, more=False)
        with redis_errors("read stream"):
            last_raw, first_raw, length, added, entries = await self._range_script(
                keys=[log_key(topic)], args=[str(after), str(upto), limit]
            )
        last, first = StreamId.parse(last_raw.decode()), StreamId.parse(first_raw.decode())
        trimmed = int(added) > int(length)
        truncated = trimmed and (after < first or int(length) == 0) and after < last
        events = self._events(topic, entries)
        cursor = StreamId.parse(entries[-1][0].decode()) if entries else after
        return History(events, truncated, cursor, more=len(entries) >= limit)

    def _events(self, topic: Topic, entries: list[Any]) -> list[StreamEvent]:
        return [event for raw_id, fields in entries if (event := self._event(topic, raw_id, fields)) is not None]

    def _event(self, topic: Topic, raw_id: bytes, fields: list[bytes]) -> StreamEvent | None:
        try:
            named = dict(zip(fields[::2], fields[1::2], strict=True))
            if b"r" not in named:
                raise ValueError("no field r")
            return decode_event(raw_id, named[b"r"], topic.tenant, topic.well)
        except ValueError as exc:
            self._malformed.skip("log", f"{log_key(topic)} entry {shown(raw_id)}", exc)
            return None

    @contextlib.asynccontextmanager
    async def live_feed(self, deliver: Deliver) -> AsyncIterator[LiveFeed]:
        client = self._client
        feed: RedisFeed | ClusterFeed
        if isinstance(client, RedisCluster):
            feed = ClusterFeed(client, deliver, self.feeds.discard, self._malformed, self._ping_interval_s)
        else:
            connect: Callable[[], Connection] = client.connection_pool.make_connection
            feed = RedisFeed(
                connect, deliver, self.feeds.discard, malformed=self._malformed, ping_interval_s=self._ping_interval_s
            )
        self.feeds.add(feed)
        try:
            await feed.start()
            yield feed
        finally:
            await feed.aclose()

    async def aclose(self) -> None:
        for feed in list(self.feeds):
            await feed.aclose()
        await self._replicated.aclose()
