"""The stream log on Redis: one server-side script per published batch, one per read.

XADD, HSET, SADD and PUBLISH happen in the same script (publish.lua), so history and live
never disagree; reads take the stream's bookkeeping and a page in one step (stream_state.lua).
Whatever a read finds that is not a reading of its key (another producer may write anything)
is skipped and noted (`malformed`), never raised: one bad value must not fail a well's reads.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from redis.asyncio.client import Redis

from app.models import History, Origin, Reading, StreamEvent, StreamId, TenantRead, Topic, WellRead
from app.streams.codec import MalformedValues, decode_event, decode_latest, shown
from app.streams.redis.client import redis_errors, script
from app.streams.redis.feed import RedisFeed
from app.streams.redis.keys import channel_name, clock_key, latest_key, log_key, producer_key, tenant_prefix, wells_key
from app.streams.redis.stores import well_member
from app.streams.seams import Deliver, LiveFeed

logger = logging.getLogger(__name__)


class RedisStreamLog:
    """The stream log on one standalone Redis.

    A tenant's keys share one hash slot, but a batch may span tenants (and the producer's key),
    so Redis Cluster would need batches grouped by slot first (not done).
    """

    def __init__(
        self,
        client: Redis,
        max_len: int = 10_000,
        max_age_s: float = 0,
        ping_interval_s: float = 5.0,
        malformed: MalformedValues | None = None,
    ):
        self._client = client
        self._max_len = max_len
        self._max_age_ms = int(max_age_s * 1000)
        self._ping_interval_s = ping_interval_s
        self._publish_script = script(client, "publish", after=("clock",))
        self._read_script = script(client, "read")
        self._range_script = script(client, "stream_state")
        self.feeds: set[RedisFeed] = set()
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
        keys: list[str] = []
        args: list[str | bytes | int] = [self._max_len, self._max_age_ms, origin.producer if origin else ""]
        for reading, seq in zip(readings, seqs, strict=True):
            topic = Topic(reading.tenant_id, reading.well_id)
            keys += [log_key(topic), latest_key(topic), wells_key(topic.tenant), clock_key(topic.tenant)]
            args += [reading.well_id, reading.tag_name, channel_name(topic.tenant), reading.to_json(), seq]
        if origin is not None:
            keys.append(producer_key(origin.producer))
        with redis_errors("publish"):
            ids, problems = await self._publish_script(keys=keys, args=args)
        if problems:
            # Not retryable (the same keys would refuse again): said loudly, counted, never repeated.
            self.rejected += sum(1 for p in problems if p.startswith(b"rejected"))
            logger.error(
                "publish: %d problems in a batch of %d readings, first: %s",
                len(problems),
                len(readings),
                problems[0].decode(errors="replace"),
            )
        return [StreamId.parse(raw.decode()) for raw in ids]

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
            raw = await self._client.mget([clock_key(tenant) for tenant in tenants])
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
        on_close: Callable[[RedisFeed], None] = self.feeds.discard
        feed = RedisFeed(
            self._client, deliver, on_close=on_close, malformed=self._malformed, ping_interval_s=self._ping_interval_s
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
