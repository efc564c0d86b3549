"""Admission limits: concurrent streams per subject, per tenant and per process, and token
buckets on connection attempts per client address and per subject.

Streams per tenant and per subject are counted in the shared lease store, so the caps hold across every
gateway: each open stream is a lease its gateway renews; a gateway that dies stops renewing
and its streams stop counting within LEASE_TTL_S. Streams per process and the attempt
buckets are this gateway's own business and stay in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from app.auth.revocation import subject_hash
from app.cancellation import pause, raise_if_cancelled
from app.errors import LimitError, ServiceError
from app.models import Principal
from app.settings import LimitSettings
from app.streams.seams import LeaseStore

logger = logging.getLogger(__name__)

MAX_BUCKETS = 100_000
LEASE_TTL_S = 60.0
RENEW_EVERY_S = LEASE_TTL_S / 3


class TokenBuckets:
    """One token bucket per key, the least recently used dropped beyond MAX_BUCKETS."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def wait(self, key: str, now: float | None = None) -> float:
        """Seconds until `key` has a token (0: it has one now); takes nothing."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        return 0.0 if tokens >= 1 else (1 - tokens) / self._rate

    def take(self, key: str, now: float | None = None) -> float:
        """Take one token; returns 0 if granted, else the seconds until one is available."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self._rate
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > MAX_BUCKETS:
            self._buckets.popitem(last=False)
        return wait


class FailureThrottle:
    """Failed authentications per client address, on every route: past the burst an address is
    refused (429) before its credentials are even looked at, so guessing and log flooding stay slow."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self._buckets = TokenBuckets(rate_per_s, burst)

    def check(self, address: str) -> None:
        wait = self._buckets.wait(address)
        if wait:
            raise LimitError("too many failed authentications from this address", 429, max(1, round(wait)))

    def record(self, address: str) -> None:
        self._buckets.take(address)


@dataclass
class Lease:
    """A stream's place in the counts; `release` when the stream ends (twice is harmless)."""

    limits: StreamLimits
    member: str
    counters: tuple[str, ...]
    released: bool = False

    async def release(self) -> None:
        if not self.released:
            self.released = True
            await self.limits._release(self)


class StreamLimits:
    """Admission control for streams; `async with StreamLimits(...) as limits:` runs its renew and release tasks."""

    def __init__(self, settings: LimitSettings, leases: LeaseStore) -> None:
        self._settings = settings
        self._store = leases
        self._gateway = secrets.token_hex(6)
        self._sequence = itertools.count()
        self._leases: dict[str, Lease] = {}
        self._renewer: asyncio.Task[None] | None = None
        # Releases are batched: when thousands of streams end at once (a drain, a proxy restart)
        # they share a few pipelines instead of queueing for the connection pool one by one.
        self._releasing: list[Lease] = []
        self._released: asyncio.Future[None] | None = None  # resolves when `_releasing` is flushed
        self._release_due = asyncio.Event()
        self._releaser: asyncio.Task[None] | None = None
        self._uncounting = 0  # ended streams whose release has not reached the broker yet
        self._attempts_by_address = TokenBuckets(settings.connects_per_s, settings.connect_burst)
        self._attempts_by_subject = TokenBuckets(settings.connects_per_s, settings.connect_burst)

    @property
    def open(self) -> int:
        """Streams of this gateway still in the shared counts: a stream that ended counts until
        its release has reached the broker, so a caller at its cap who sees 0 may open again."""
        return len(self._leases) + self._uncounting

    async def __aenter__(self) -> StreamLimits:
        self._renewer = asyncio.create_task(self._renew_forever(), name="lease-renewer")
        self._releaser = asyncio.create_task(self._release_forever(), name="lease-releaser")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._released is not None:  # the last streams' releases go out before we stop
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._released), 5)
        for task in (self._renewer, self._releaser):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def check_attempt(self, address: str) -> None:
        """Before auth: a client address hammering the gateway is turned away cheaply."""
        wait = self._attempts_by_address.take(address)
        if wait:
            raise LimitError("too many connection attempts from this address", 429, max(1, round(wait)))

    def check_subject(self, principal: Principal) -> None:
        """After auth: one subject opening streams, tickets or sessions too fast is turned away."""
        wait = self._attempts_by_subject.take(f"{principal.tenant}/{subject_hash(principal.subject)}")
        if wait:
            raise LimitError("too many connection attempts for this subject", 429, max(1, round(wait)))

    async def admit(self, principal: Principal) -> Lease:
        """Raises LimitError; on success the caller must release the lease when the stream ends."""
        limits = self._settings
        if len(self._leases) >= limits.streams_per_process:
            raise LimitError("this gateway is full", 503, 5)
        self.check_subject(principal)
        subject = subject_hash(principal.subject)
        tenant_key, subject_key = f"{{{principal.tenant}}}:tenant", f"{{{principal.tenant}}}:sub:{subject}"
        member = f"{self._gateway}:{next(self._sequence)}"
        counters = [(tenant_key, limits.streams_per_tenant), (subject_key, limits.streams_per_subject)]
        full = await self._store.acquire(counters, member, LEASE_TTL_S)
        if full == 0:
            raise LimitError("too many open streams for this tenant", 429, 10)
        if full == 1:
            raise LimitError("too many open streams for this subject", 429, 10)
        lease = Lease(self, member, (tenant_key, subject_key))
        self._leases[member] = lease
        return lease

    async def _release(self, lease: Lease) -> None:
        """Returns once the lease is uncounted (or failed to be, and will expire by itself)."""
        self._leases.pop(lease.member, None)
        self._uncounting += 1
        if self._releaser is None or self._releaser.done():  # not started (or stopped): do it here
            try:
                await self._flush([lease])
            finally:
                self._uncounting -= 1
            return
        self._releasing.append(lease)
        if self._released is None:
            self._released = asyncio.get_running_loop().create_future()
            self._release_due.set()
        # Shielded: a stream cancelled while it waits (a server's shutdown) does not cancel the
        # batch the other streams are in.
        await asyncio.shield(self._released)

    async def _release_forever(self) -> None:
        while True:
            raise_if_cancelled()
            await self._release_due.wait()
            self._release_due.clear()
            batch, self._releasing = self._releasing, []
            done, self._released = self._released, None
            try:
                await self._flush(batch)
            finally:
                self._uncounting -= len(batch)
                if done is not None and not done.done():
                    done.set_result(None)

    async def _flush(self, leases: list[Lease]) -> None:
        try:
            await self._store.release([(key, lease.member) for lease in leases for key in lease.counters])
        except Exception as exc:  # they then expire by themselves within LEASE_TTL_S
            logger.warning("could not release %d stream counts: %s", len(leases), exc)

    async def _renew_forever(self) -> None:
        while True:
            await pause(RENEW_EVERY_S)
            pairs = [(key, lease.member) for lease in list(self._leases.values()) for key in lease.counters]
            try:
                await self._store.renew(pairs, LEASE_TTL_S)
            except ServiceError as exc:
                logger.warning("could not renew %d stream counts: %s", len(pairs), exc)
