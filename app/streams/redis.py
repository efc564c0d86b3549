"""The Redis broker: the layout of DESIGN.md, written by one server-side script per batch.

Per (tenant, well), keys share the hash tag `{tenant/well}` so they sit on one Cluster slot:
- `scada:{t/w}:log`    Stream, one entry per reading (field `r` = reading JSON), capped by
                        MAXLEN ~ and by age (MINID ~);
- `scada:{t/w}:latest` Hash, tag -> latest reading JSON;
- `scada:{t}:wells`    Set of the tenant's wells (configured, and what ingestion saw);
- `scada:ticket:<sha256 of a ticket>`  single-use stream ticket, with a TTL;
- `scada:producer:<id>`  highest reading seq applied for an ingest worker run (see Origin),
                        so a batch sent twice lands once; expires 30 days after its last batch;
- channel `scada:readings:<t>:<w>`, message `<stream id> <reading JSON>`.
XADD, HSET, SADD and PUBLISH happen in the same script, so history and live never disagree.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import RedisError

from app.backoff import Backoff
from app.errors import BrokerError
from app.models import History, Origin, Reading, Snapshot, StreamEvent, StreamId, Topic
from app.streams.broker import Deliver, LiveFeed, decode_event

logger = logging.getLogger(__name__)

# ARGV: maxlen, age_ms, producer ('' = no dedupe), then per reading: well, tag, channel, json, seq.
# KEYS: per reading log, latest, wells; then the producer's key when there is a producer.
_PUBLISH = """
local maxlen, age_ms = ARGV[1], tonumber(ARGV[2])
local minid = nil
if age_ms > 0 then
  local t = redis.call('TIME')
  minid = (tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - age_ms) .. '-0'
end
local n = #KEYS
local producer, applied = nil, -1
if ARGV[3] ~= '' then
  producer = KEYS[n]
  n = n - 1
  applied = tonumber(redis.call('GET', producer) or '-1')
end
local top = applied
local ids, problems = {}, {}
for i = 0, (n / 3) - 1 do
  local seq = tonumber(ARGV[5 * i + 8])
  if producer == nil or seq > applied then
    local log, latest, wells = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
    local well, tag, channel, json = ARGV[5 * i + 4], ARGV[5 * i + 5], ARGV[5 * i + 6], ARGV[5 * i + 7]
    -- pcall: a key of the wrong type (written by something else) must not abort the script
    -- half-way, which would leave the batch half-applied and make every retry repeat that half.
    local id = redis.pcall('XADD', log, 'MAXLEN', '~', maxlen, '*', 'r', json)
    if type(id) == 'table' then
      problems[#problems + 1] = 'rejected ' .. log .. ': ' .. id.err
    else
      if minid then redis.pcall('XTRIM', log, 'MINID', '~', minid) end
      local ok = redis.pcall('HSET', latest, tag, json)
      if type(ok) == 'table' then problems[#problems + 1] = 'latest not kept ' .. latest .. ': ' .. ok.err end
      ok = redis.pcall('SADD', wells, well)
      if type(ok) == 'table' then problems[#problems + 1] = 'not registered ' .. wells .. ': ' .. ok.err end
      redis.call('PUBLISH', channel, id .. ' ' .. json)
      ids[#ids + 1] = id
    end
    if seq > top then top = seq end
  end
end
if producer and top > applied then redis.call('SET', producer, top, 'EX', 2592000) end
return {ids, problems}
"""

# Counts a stream in shared counters (sorted sets scored by lease expiry, server time).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) >= tonumber(ARGV[2 + i]) then return i end
end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + ttl, ARGV[1])
  redis.call('PEXPIRE', key, ttl * 2)
end
return 0
"""

_RENEW = """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', expiry, ARGV[i + 1])
  redis.call('PEXPIRE', key, tonumber(ARGV[1]) * 2)
end
return 0
"""

# Reads the stream's bookkeeping and a page of entries in one atomic step. Trimming does not
# update max-deleted-entry-id, so truncation is inferred from entries-added vs length.
_STREAM_STATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'0-0', '0-0', 0, 0, {}, {}} end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local state = {}
for i = 1, #info, 2 do state[info[i]] = info[i + 1] end
local first = '0-0'
if state['first-entry'] then first = state['first-entry'][1] end
local entries = {}
if ARGV[1] ~= '' then entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2]) end
local latest = {}
if KEYS[2] then latest = redis.call('HGETALL', KEYS[2]) end
return {state['last-generated-id'], first, state['length'], state['entries-added'], entries, latest}
"""


def log_key(topic: Topic) -> str:
    return f"scada:{{{topic.tenant}/{topic.well}}}:log"


def latest_key(topic: Topic) -> str:
    return f"scada:{{{topic.tenant}/{topic.well}}}:latest"


def wells_key(tenant: str) -> str:
    return f"scada:{{{tenant}}}:wells"


def lease_key(key: str) -> str:
    return f"scada:lease:{key}"


def producer_key(producer: str) -> str:
    """The highest seq applied for an ingest producer (expires 30 days after its last batch)."""
    return f"scada:producer:{producer}"


def ticket_key(key: str) -> str:
    return f"scada:ticket:{key}"


def channel_name(topic: Topic) -> str:
    return f"scada:readings:{topic.tenant}:{topic.well}"


@contextlib.contextmanager
def _redis_errors(action: str) -> Iterator[None]:
    try:
        yield
    except (RedisError, OSError) as exc:
        raise BrokerError(action, str(exc)) from exc


def _next_id(after: StreamId) -> StreamId | None:
    if after.seq < 2**64 - 1:
        return StreamId(after.ms, after.seq + 1)
    if after.ms < 2**64 - 1:
        return StreamId(after.ms + 1, 0)
    return None


class RedisBroker:
    """Broker on one standalone Redis.

    Each well's keys share one hash slot, but a batch spans wells and the tenant's wells set,
    so Redis Cluster would need batches grouped by slot first (not done).
    """

    def __init__(
        self, client: aioredis.Redis, max_len: int = 10_000, max_age_s: float = 0, ping_interval_s: float = 5.0
    ) -> None:
        self._client = client
        self._ping_interval_s = ping_interval_s
        self._max_len = max_len
        self._max_age_ms = int(max_age_s * 1000)
        self._publish_script = client.register_script(_PUBLISH)
        self._state_script = client.register_script(_STREAM_STATE)
        self._acquire_script = client.register_script(_ACQUIRE)
        self._renew_script = client.register_script(_RENEW)
        self._feeds: set[RedisFeed] = set()
        self.rejected = 0  # readings Redis refused for good (a key of the wrong type)

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        url: str,
        max_len: int = 10_000,
        max_age_s: float = 0,
        max_connections: int = 32,
        timeout_s: float = 5.0,
        ping_interval_s: float = 5.0,
    ) -> AsyncIterator[RedisBroker]:
        """`async with RedisBroker.connect(url) as broker:` the usual way to get one.

        `timeout_s` bounds every command and connect, so a frozen Redis (SIGSTOP, a dead host
        without a RST) turns into a BrokerError instead of a request that hangs for ever;
        `ping_interval_s` is the live feed's health check (three missed pongs: reconnect).
        """
        # A blocking pool: a burst of stream opens waits for one of a bounded set of connections
        # instead of failing with "Too many connections".
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=10,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )
        client = aioredis.Redis(connection_pool=pool, decode_responses=False, health_check_interval=10)
        broker = cls(client, max_len, max_age_s, ping_interval_s)
        try:
            yield broker
        finally:
            await broker.aclose()

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
            keys += [log_key(topic), latest_key(topic), wells_key(topic.tenant)]
            args += [reading.well_id, reading.tag_name, channel_name(topic), reading.to_json(), seq]
        if origin is not None:
            keys.append(producer_key(origin.producer))
        with _redis_errors("publish"):
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

    async def _state(self, topic: Topic, start: StreamId | None, limit: int, latest: bool) -> list[Any]:
        keys = [log_key(topic)] + ([latest_key(topic)] if latest else [])
        with _redis_errors("read stream"):
            result: list[Any] = await self._state_script(keys=keys, args=[str(start) if start else "", limit])
        return result

    async def snapshot(self, topic: Topic) -> Snapshot:
        last, _first, _length, _added, _entries, flat = await self._state(topic, None, 0, latest=True)
        readings = {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}
        return Snapshot(topic, StreamId.parse(last.decode()), readings)

    async def history(self, topic: Topic, after: StreamId, limit: int) -> History:
        start = _next_id(after)
        last_raw, first_raw, length, added, entries, _ = await self._state(topic, start, limit, latest=False)
        last, first = StreamId.parse(last_raw.decode()), StreamId.parse(first_raw.decode())
        trimmed = int(added) > int(length)
        truncated = after > last or (trimmed and (after < first or int(length) == 0) and after < last)
        events = [event for raw_id, fields in entries if (event := self._event(topic, raw_id, fields)) is not None]
        cursor = StreamId.parse(entries[-1][0].decode()) if entries else after
        return History(events, truncated, cursor, more=len(entries) >= limit)

    @staticmethod
    def _event(topic: Topic, raw_id: bytes, fields: list[bytes]) -> StreamEvent | None:
        # Another producer may have written something else: skip it rather than break every resume.
        try:
            named = dict(zip(fields[::2], fields[1::2], strict=True))
            return decode_event(raw_id, named[b"r"])
        except (ValueError, KeyError, TypeError):
            logger.warning("skipped malformed entry %s in the log of %s", raw_id, topic)
            return None

    async def wells(self, tenant: str) -> list[str]:
        with _redis_errors("list wells"):
            members = await self._client.smembers(wells_key(tenant))
        return sorted(m.decode() if isinstance(m, bytes) else m for m in members)

    async def has_well(self, tenant: str, well: str) -> bool:
        with _redis_errors("check well"):
            return bool(await self._client.sismember(wells_key(tenant), well))

    async def register_wells(self, tenant: str, wells: Sequence[str]) -> None:
        if wells:
            with _redis_errors("register wells"):
                await self._client.sadd(wells_key(tenant), *wells)

    async def put_ticket(self, key: str, payload: bytes, ttl_s: int) -> None:
        with _redis_errors("store ticket"):
            await self._client.set(ticket_key(key), payload, ex=ttl_s)

    async def take_ticket(self, key: str) -> bytes | None:
        with _redis_errors("redeem ticket"):
            payload = await self._client.getdel(ticket_key(key))
        return payload.encode() if isinstance(payload, str) else payload

    async def acquire_lease(self, counters: Sequence[tuple[str, int]], member: str, ttl_s: float) -> int | None:
        keys = [lease_key(key) for key, _ in counters]
        with _redis_errors("count stream"):
            full = await self._acquire_script(keys=keys, args=[member, int(ttl_s * 1000), *(n for _, n in counters)])
        return int(full) - 1 if int(full) else None

    async def release_leases(self, leases: Sequence[tuple[str, str]]) -> None:
        for start in range(0, len(leases), 1000):
            with _redis_errors("uncount streams"):
                async with self._client.pipeline(transaction=False) as pipe:
                    for key, member in leases[start : start + 1000]:
                        pipe.zrem(lease_key(key), member)
                    await pipe.execute()

    async def renew_leases(self, leases: Sequence[tuple[str, str]], ttl_s: float) -> None:
        for start in range(0, len(leases), 500):
            chunk = leases[start : start + 500]
            with _redis_errors("renew stream counts"):
                await self._renew_script(
                    keys=[lease_key(key) for key, _ in chunk], args=[int(ttl_s * 1000), *(m for _, m in chunk)]
                )

    async def open_feed(self, deliver: Deliver) -> LiveFeed:
        feed = RedisFeed(self._client, deliver, on_close=self._feeds.discard, ping_interval_s=self._ping_interval_s)
        self._feeds.add(feed)
        await feed.start()
        return feed

    async def ready(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self._client.ping(), timeout=2))
        except (RedisError, OSError, TimeoutError):
            return False

    async def aclose(self) -> None:
        for feed in list(self._feeds):
            await feed.aclose()
        await self._client.aclose(close_connection_pool=True)


def _release(waiters: deque[asyncio.Future[None]], _: asyncio.Future[None]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)


class RedisFeed:
    """The process's one Pub/Sub connection: one reader task, one writer task.

    Request tasks never write to the connection: they queue SUBSCRIBE/UNSUBSCRIBE for the
    writer, so a client that disconnects mid-subscribe cannot interrupt a half-written
    command or cancel someone else's confirmation. Every SUBSCRIBE gets exactly one reply, and
    replies are matched to waiters per channel in order; a waiter whose caller went away stays
    in line (done) so the next reply goes to the right one.

    A subscribe returns only after Redis confirmed it, which is what lets a stream read history
    after subscribing and know that no live event fell in between. When the connection drops
    (or stops answering pings), the feed reconnects with jittered backoff and resubscribes;
    events published meanwhile were not on the wire, so `on_gap` tells the hub, which awaits
    `confirmed(topic)` and then fills the gap from history.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        deliver: Deliver,
        on_close: Callable[[RedisFeed], None],
        on_gap: Callable[[], None] | None = None,
        ping_interval_s: float = 5.0,
    ) -> None:
        self._client = client
        self._deliver = deliver
        self._on_close = on_close
        self.on_gap = on_gap
        self._ping_interval_s = ping_interval_s
        self._topics: dict[bytes, Topic] = {}
        self._pending: dict[bytes, deque[asyncio.Future[None]]] = {}
        self._commands: asyncio.Queue[tuple[int, bytes, bytes]] = asyncio.Queue()  # (generation, command, arg)
        self._generation = 0  # one per connection
        self._conn: Connection | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._connected = asyncio.Event()
        self._confirmations: dict[bytes, asyncio.Future[None]] = {}
        self._closing = False
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def start(self) -> None:
        await self._connect()
        self._tasks = [
            asyncio.create_task(self._read_forever(), name="redis-feed-reader"),
            asyncio.create_task(self._write_forever(), name="redis-feed-writer"),
        ]

    async def _connect(self) -> None:
        conn: Connection = self._client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            with _redis_errors("connect pubsub"):
                await conn.connect()  # type: ignore[no-untyped-call]
                # Commands queued for the old connection are covered by this resubscribe (or,
                # for UNSUBSCRIBE, by not resubscribing): the writer drops them, so no stray
                # reply can confirm a later subscriber early.
                self._generation += 1
                self._realign_waiters()  # also with no topics: stale waiters must not stay in line
                if self._topics:
                    await conn.send_command("SUBSCRIBE", *self._topics)
        except BaseException:
            await conn.disconnect()
            raise
        self._conn = conn
        self._connected.set()

    def _realign_waiters(self) -> None:
        # Commands sent before the drop will never be answered: one resubscribe reply per
        # channel now stands for all of them, and for the hub's gap fill (`confirmed`).
        loop = asyncio.get_running_loop()
        for channel in list(self._pending):
            if channel not in self._topics:
                for waiter in self._pending.pop(channel):
                    if not waiter.done():
                        waiter.set_result(None)
        self._confirmations = {}
        for channel in self._topics:
            joined: asyncio.Future[None] = loop.create_future()
            confirmation: asyncio.Future[None] = loop.create_future()
            waiters = self._pending.pop(channel, deque())
            waiters.append(confirmation)
            joined.add_done_callback(functools.partial(_release, waiters))
            self._pending[channel] = deque([joined])
            self._confirmations[channel] = confirmation

    async def confirmed(self, topic: Topic) -> None:
        """Returns once the topic's subscription is confirmed on the current connection.

        Raises BrokerError if the connection drops first (the next gap fill starts over).
        """
        future = self._confirmations.get(channel_name(topic).encode())
        if future is not None:
            await asyncio.shield(future)

    async def subscribe(self, topic: Topic) -> None:
        channel = channel_name(topic).encode()
        self._topics[channel] = topic
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(channel, deque()).append(waiter)
        self._commands.put_nowait((self._generation, b"SUBSCRIBE", channel))
        await waiter

    async def unsubscribe(self, topic: Topic) -> None:
        channel = channel_name(topic).encode()
        if self._topics.pop(channel, None) is not None:
            self._commands.put_nowait((self._generation, b"UNSUBSCRIBE", channel))

    async def _write_forever(self) -> None:
        while not self._closing:  # redis-py may swallow our cancel inside send_command
            generation, *command = await self._commands.get()
            await self._connected.wait()
            if generation != self._generation:
                continue  # queued for a connection that is gone: the reconnect covered it
            assert self._conn is not None
            try:
                await self._conn.send_command(*[part for part in command if part])
            except Exception as exc:  # redis-py raises AttributeError, not ConnectionError, on a closed socket
                # The reader notices the broken connection; reconnecting resubscribes what is wanted.
                logger.debug("pubsub command %s not sent: %s", command[0], exc)

    async def _read_forever(self) -> None:
        # Jittered: a fleet of gateways must not hit a restarted Redis in step.
        backoff = Backoff(first_s=0.1, cap_s=5.0)
        while not self._closing:
            try:
                await self._read_until_broken()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closing:  # redis-py may turn our cancel into a connection error
                    return
                logger.warning("redis pubsub connection lost: %s", exc)
            self._connected.clear()
            self._fail_confirmations()
            if self._conn is not None:
                await self._conn.disconnect()
            backoff.reset()
            while True:
                await asyncio.sleep(backoff.next())
                try:
                    await self._connect()
                    break
                except (BrokerError, TimeoutError) as exc:
                    logger.warning("redis pubsub reconnect failed: %s", exc or "timed out")
            self.reconnects += 1
            logger.info("redis pubsub reconnected, %d channels resubscribed", len(self._topics))
            if self.on_gap is not None:
                self.on_gap()

    def _fail_confirmations(self) -> None:
        for future in self._confirmations.values():
            if not future.done():
                future.set_exception(BrokerError("resubscribe", "connection lost again"))
                future.exception()  # retrieved here: nobody may be waiting on it
        self._confirmations = {}

    async def _read_until_broken(self) -> None:
        conn = self._conn
        assert conn is not None
        pinger = asyncio.create_task(self._ping())
        try:
            while True:
                # Pongs arrive every ping interval, so silence for three of them means a frozen peer.
                response = await conn.read_response(timeout=self._ping_interval_s * 3, push_request=True)
                if response is None:  # redis-py's answer to a timeout we asked for
                    raise TimeoutError(f"no answer to pings for {self._ping_interval_s * 3:.1f} s")
                self._handle(response)
        finally:
            pinger.cancel()

    async def _ping(self) -> None:
        while True:
            await asyncio.sleep(self._ping_interval_s)
            self._commands.put_nowait((self._generation, b"PING", b""))

    def _handle(self, response: Any) -> None:
        kind = response[0]
        if kind == b"message":
            topic = self._topics.get(response[1])
            if topic is None:
                return
            raw_id, _, data = response[2].partition(b" ")
            try:
                event = decode_event(raw_id, data)
            except (ValueError, KeyError, TypeError):
                logger.warning("malformed message on %s dropped", response[1])
                return
            self._deliver(topic, event)
        elif kind == b"subscribe":
            waiters = self._pending.get(response[1])
            if not waiters:
                return
            waiter = waiters.popleft()
            if not waiters:
                del self._pending[response[1]]
            if not waiter.done():
                waiter.set_result(None)

    async def aclose(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._conn is not None:
            await self._conn.disconnect()
        for waiters in self._pending.values():
            for waiter in waiters:
                waiter.cancel()
        self._pending.clear()
        self._fail_confirmations()
        self._topics.clear()
        self._on_close(self)
