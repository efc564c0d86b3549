"""The embedded broker: history, latest values, live fan-out, tickets and leases in one process.

It is a real implementation, not a test double: the demo runs on it, and it passes the same
conformance suites as the Redis broker, ids and trimming semantics included. Every clock is
injectable, so trimming by age and expiring tickets and leases are tested without sleeping.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from app.models import ZERO_ID, History, Origin, Reading, StreamEvent, StreamId, TenantRead, Topic, WellRead
from app.streams.codec import epoch_s
from app.streams.seams import Broker, Deliver, LiveFeed, Revocation

Clock = Callable[[], float]


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class _Log:
    entries: deque[StreamEvent] = field(default_factory=deque)
    latest: dict[str, bytes] = field(default_factory=dict)
    last_id: StreamId = ZERO_ID
    max_deleted: StreamId = ZERO_ID

    def trimmed_past(self, after: StreamId) -> bool:
        """Whether an entry newer than `after` was trimmed."""
        return after < self.max_deleted

    def after(self, after: StreamId, upto: StreamId, limit: int) -> list[StreamEvent]:
        found: list[StreamEvent] = []
        for event in self.entries:
            if after < event.id <= upto:
                found.append(event)
                if len(found) >= limit:
                    break
        return found


class _MemoryFeed:
    def __init__(self, deliver: Deliver) -> None:
        self.deliver = deliver
        self.tenants: set[str] = set()
        self.on_gap: Callable[[], None] | None = None  # an in-process feed never has a gap
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        return True

    async def confirmed(self, tenant: str) -> None:
        return None

    async def subscribe(self, tenant: str) -> None:
        self.tenants.add(tenant)

    async def unsubscribe(self, tenant: str) -> None:
        self.tenants.discard(tenant)

    def heard(self, tenant: str) -> StreamId | None:
        return None  # it delivers only readings it stored itself: nothing is ever skipped

    async def restart(self, why: str) -> None:
        # Nothing in process can be lost, but the hub's repair path is the same: a gap to fill.
        self.reconnects += 1
        if self.on_gap is not None:
            self.on_gap()


class MemoryRegistry:
    def __init__(self) -> None:
        self._wells: dict[str, set[str]] = defaultdict(set)

    async def wells(self, tenant: str) -> list[str]:
        return sorted(self._wells.get(tenant, ()))

    async def has_well(self, tenant: str, well: str) -> bool:
        return well in self._wells.get(tenant, ())

    async def register(self, tenant: str, wells: Sequence[str]) -> None:
        self._wells[tenant].update(wells)

    def add(self, tenant: str, well: str) -> None:
        """Register one well now, from within a publish."""
        self._wells[tenant].add(well)


class MemoryStreamLog:
    """Per-well bounded history (by length and age), latest per tag, one id clock per tenant, live fan-out.

    Args:
        registry: where publishing registers each reading's well.
        max_len: entries kept per well.
        max_age_s: entries older than this are trimmed on the next publish to that well; 0 keeps all.
        clock: milliseconds since the epoch, for ids and trimming by age.
    """

    def __init__(
        self, registry: MemoryRegistry, max_len: int = 10_000, max_age_s: float = 0, clock: Callable[[], int] = wall_ms
    ) -> None:
        self._registry = registry
        self._max_len = max_len
        self._max_age_ms = int(max_age_s * 1000)
        self._clock = clock
        self._logs: dict[Topic, _Log] = defaultdict(_Log)
        self._clocks: dict[str, StreamId] = {}  # tenant -> the last id issued
        self._applied: dict[str, int] = {}  # producer -> highest seq applied (see Origin)
        self.rejected = 0  # nothing here can hold a key of the wrong type
        self.malformed: dict[str, int] = {}  # nor anything but validated readings
        self.feeds: set[_MemoryFeed] = set()

    async def publish(self, readings: Sequence[Reading], origin: Origin | None = None) -> list[StreamId]:
        if origin is not None:
            if len(origin.seqs) != len(readings):
                raise ValueError("an origin needs one seq per reading")
            applied = self._applied.get(origin.producer, -1)
            readings = [r for r, seq in zip(readings, origin.seqs, strict=True) if seq > applied]
            self._applied[origin.producer] = max((applied, *origin.seqs))
        stored = [self._append(reading) for reading in readings]
        for tenant, event in stored:
            for feed in self.feeds:
                if tenant in feed.tenants:
                    feed.deliver(tenant, event)
        return [event.id for _, event in stored]

    def _next_id(self, tenant: str, now: int) -> StreamId:
        last = self._clocks.get(tenant, ZERO_ID)
        stream_id = StreamId(now, 0) if now > last.ms else StreamId(last.ms, last.seq + 1)
        self._clocks[tenant] = stream_id
        return stream_id

    def _append(self, reading: Reading) -> tuple[str, StreamEvent]:
        tenant, well = reading.tenant_id, reading.well_id
        log = self._logs[Topic(tenant, well)]
        now = self._clock()
        stream_id = self._next_id(tenant, now)
        event = StreamEvent(stream_id, well, reading.tag_name, reading.to_json(), epoch_s(reading.timestamp))
        log.entries.append(event)
        log.latest[reading.tag_name] = event.data
        log.last_id = stream_id
        self._registry.add(tenant, well)
        self._trim(log, now)
        return tenant, event

    def _trim(self, log: _Log, now: int) -> None:
        horizon = now - self._max_age_ms if self._max_age_ms else None
        entries = log.entries
        while entries and (len(entries) > self._max_len or (horizon is not None and entries[0].id.ms < horizon)):
            log.max_deleted = entries.popleft().id

    async def read(self, tenant: str, wells: Sequence[str] | None, after: StreamId | None, count: int) -> TenantRead:
        clock = self._clocks.get(tenant, ZERO_ID)
        names = await self._registry.wells(tenant) if wells is None else wells
        reads = {}
        for well in names:
            log = self._logs.get(Topic(tenant, well)) or _Log()
            if after is None:
                reads[well] = WellRead([], True, False, dict(log.latest))
                continue
            truncated = after > clock or log.trimmed_past(after)
            events = [] if truncated else log.after(after, clock, count)
            complete = len(events) < count
            reads[well] = WellRead(events, complete, truncated, dict(log.latest) if truncated else None)
        return TenantRead(clock, reads)

    async def clocks(self, tenants: Sequence[str]) -> dict[str, StreamId]:
        return {tenant: self._clocks.get(tenant, ZERO_ID) for tenant in tenants}

    def latest(self, topic: Topic) -> dict[str, bytes]:
        """Tag -> the latest reading's JSON, for the worker leases' stale verdict."""
        log = self._logs.get(topic)
        return dict(log.latest) if log is not None else {}

    async def range(self, topic: Topic, after: StreamId, upto: StreamId, limit: int) -> History:
        log = self._logs.get(topic) or _Log()
        events = log.after(after, upto, limit)
        cursor = events[-1].id if events else after
        return History(events, log.trimmed_past(after), cursor, more=len(events) >= limit)

    @contextlib.asynccontextmanager
    async def live_feed(self, deliver: Deliver) -> AsyncIterator[LiveFeed]:
        feed = _MemoryFeed(deliver)
        self.feeds.add(feed)
        try:
            yield feed
        finally:
            feed.tenants.clear()
            self.feeds.discard(feed)


class MemoryTickets:
    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._tickets: dict[str, tuple[bytes, float]] = {}

    async def put(self, key: str, payload: bytes, ttl_s: float) -> None:
        now = self._clock()
        # Expired tickets are dropped as new ones arrive, so the dict stays as small as the live set.
        for stale in [k for k, (_, expiry) in self._tickets.items() if expiry <= now]:
            del self._tickets[stale]
        self._tickets[key] = (payload, now + ttl_s)

    async def take(self, key: str) -> bytes | None:
        entry = self._tickets.pop(key, None)
        if entry is None or entry[1] <= self._clock():
            return None
        return entry[0]


class MemoryLeases:
    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._leases: dict[str, dict[str, float]] = defaultdict(dict)

    async def acquire(self, counters: Sequence[tuple[str, int]], member: str, ttl_s: float) -> int | None:
        now = self._clock()
        for index, (key, limit) in enumerate(counters):
            members = self._leases[key]
            if len(members) >= limit:  # only then can expired leases matter: not a walk per admission
                for stale in [m for m, expiry in members.items() if expiry <= now]:
                    del members[stale]
                if len(members) >= limit:
                    return index
        for key, _ in counters:
            self._leases[key][member] = now + ttl_s
        return None

    async def release(self, leases: Sequence[tuple[str, str]]) -> None:
        for key, member in leases:
            self._leases[key].pop(member, None)
            if not self._leases[key]:
                del self._leases[key]

    async def renew(self, leases: Sequence[tuple[str, str]], ttl_s: float) -> None:
        expiry = self._clock() + ttl_s
        for key, member in leases:
            if member in self._leases.get(key, {}):
                self._leases[key][member] = expiry


class MemoryWorkerLeases:
    """Worker leases in this process; the stale verdict is published into `log` like any reading."""

    def __init__(self, log: MemoryStreamLog, clock: Clock = time.monotonic) -> None:
        self._log = log
        self._clock = clock
        self._expiry: dict[str, dict[str, float]] = defaultdict(dict)  # tenant -> worker -> expiry
        self._tags: dict[tuple[str, str], set[tuple[str, str]]] = {}  # (tenant, worker) -> its tags

    async def beat(self, worker: str, tenant: str, ttl_s: float, tags: Sequence[tuple[str, str]] = ()) -> bool:
        new = worker not in self._expiry[tenant]
        self._expiry[tenant][worker] = self._clock() + ttl_s
        if tags:
            claimed = set(tags)
            for other in self._expiry[tenant]:
                if other != worker:
                    self._tags.get((tenant, other), set()).difference_update(claimed)
            self._tags[(tenant, worker)] = claimed
        return new

    async def sweep(self, tenant: str) -> int:
        now = self._clock()
        expired = [worker for worker, expiry in self._expiry[tenant].items() if expiry <= now]
        stale: list[Reading] = []
        for worker in expired:
            del self._expiry[tenant][worker]
            for well, tag in sorted(self._tags.pop((tenant, worker), set())):
                latest = self._log.latest(Topic(tenant, well)).get(tag)
                if latest is None:
                    continue
                reading = Reading.from_json(latest)
                if reading.quality != "BAD" and reading.reason != "stale":
                    update = {"quality": "UNCERTAIN", "reason": "stale", "status_code": None}
                    stale.append(reading.model_copy(update=update))
        await self._log.publish(stale)
        return len(stale)


class MemorySessions:
    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._sessions: dict[str, tuple[bytes, float]] = {}

    async def put(self, key: str, payload: bytes, ttl_s: float) -> None:
        now = self._clock()
        for stale in [k for k, (_, expiry) in self._sessions.items() if expiry <= now]:
            del self._sessions[stale]
        self._sessions[key] = (payload, now + ttl_s)

    async def get(self, key: str) -> bytes | None:
        entry = self._sessions.get(key)
        return entry[0] if entry is not None and entry[1] > self._clock() else None

    async def delete(self, key: str) -> None:
        self._sessions.pop(key, None)


class MemoryRevocations:
    """Revocations in this process; the announcements are numbered from the first one made."""

    KEPT = 10_000

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._tokens: dict[tuple[str, str], float] = {}  # (tenant, jti) -> until (monotonic)
        self._subjects: dict[tuple[str, str], tuple[float, float]] = {}  # (tenant, subject key) -> (before, until)
        self._announced: deque[Revocation] = deque(maxlen=self.KEPT)
        self._made = 0

    async def revoke(self, revocation: Revocation, ttl_s: float) -> None:
        until = self._clock() + ttl_s
        if ttl_s > 0 and revocation.kind == "token":
            self._tokens[(revocation.tenant, revocation.key)] = until
        elif ttl_s > 0 and revocation.kind == "subject":
            self._subjects[(revocation.tenant, revocation.key)] = (revocation.before, until)
        self._announced.append(revocation)
        self._made += 1

    async def is_revoked(self, tenant: str, token_id: str | None, subject_key: str, issued_at: float | None) -> bool:
        now = self._clock()
        if token_id and self._tokens.get((tenant, token_id), now) > now:
            return True
        before, until = self._subjects.get((tenant, subject_key), (0.0, now))
        return until > now and (issued_at is None or issued_at < before)

    async def since(self, cursor: str | None) -> tuple[list[Revocation], str]:
        start = self._made if cursor is None else int(cursor)
        first_kept = self._made - len(self._announced)
        return list(self._announced)[max(0, start - first_kept) :], str(self._made)


class _AlwaysReady:
    async def ready(self) -> bool:
        return True


def memory_broker(
    max_len: int = 10_000, max_age_s: float = 0, clock: Callable[[], int] = wall_ms, monotonic: Clock = time.monotonic
) -> Broker:
    """Every store in this process. `clock` (epoch ms) dates entries; `monotonic` expires tickets and leases."""
    registry = MemoryRegistry()
    log = MemoryStreamLog(registry, max_len, max_age_s, clock)
    return Broker(
        log=log,
        registry=registry,
        tickets=MemoryTickets(monotonic),
        sessions=MemorySessions(monotonic),
        revocations=MemoryRevocations(monotonic),
        leases=MemoryLeases(monotonic),
        workers=MemoryWorkerLeases(log, monotonic),
        health=_AlwaysReady(),
    )
