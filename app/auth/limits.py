"""Admission limits: concurrent streams per subject, per tenant and per process, and token
buckets on connection attempts per client address and per subject.

Counts are kept in this process. Behind a load balancer that spreads a tenant over N
gateways, the per-tenant and per-subject caps are per gateway; sharing them through Redis is
left for later (see the issue notes).
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from dataclasses import dataclass

from app.errors import ServiceError
from app.models import Principal
from app.settings import LimitSettings

MAX_BUCKETS = 100_000


class LimitError(ServiceError):
    """`status` 429 (this caller is over a limit) or 503 (this gateway is full: try another)."""

    def __init__(self, reason: str, status: int, retry_after_s: int) -> None:
        super().__init__(reason, status, retry_after_s)
        self.reason = reason
        self.status = status
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return f"{self.status}: {self.reason}"


class TokenBuckets:
    """One token bucket per key, the least recently used dropped beyond MAX_BUCKETS."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

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


@dataclass
class Lease:
    """A stream's place in the counts; `release` exactly once, when the stream ends."""

    limits: StreamLimits
    subject: str
    tenant: str
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.limits._release(self)


class StreamLimits:
    def __init__(self, settings: LimitSettings) -> None:
        self._settings = settings
        self._by_subject: Counter[str] = Counter()
        self._by_tenant: Counter[str] = Counter()
        self.open = 0
        self._attempts_by_address = TokenBuckets(settings.connects_per_s, settings.connect_burst)
        self._attempts_by_subject = TokenBuckets(settings.connects_per_s, settings.connect_burst)

    def check_attempt(self, address: str) -> None:
        """Before auth: a client address hammering the gateway is turned away cheaply."""
        wait = self._attempts_by_address.take(address)
        if wait:
            raise LimitError("too many connection attempts from this address", 429, max(1, round(wait)))

    def admit(self, principal: Principal) -> Lease:
        """Raises LimitError; on success the caller must release the lease when the stream ends."""
        limits = self._settings
        if self.open >= limits.streams_per_process:
            raise LimitError("this gateway is full", 503, 5)
        wait = self._attempts_by_subject.take(f"{principal.tenant}/{principal.subject}")
        if wait:
            raise LimitError("too many connection attempts for this subject", 429, max(1, round(wait)))
        subject = f"{principal.tenant}/{principal.subject}"
        if self._by_subject[subject] >= limits.streams_per_subject:
            raise LimitError("too many open streams for this subject", 429, 10)
        if self._by_tenant[principal.tenant] >= limits.streams_per_tenant:
            raise LimitError("too many open streams for this tenant", 429, 10)
        self._by_subject[subject] += 1
        self._by_tenant[principal.tenant] += 1
        self.open += 1
        return Lease(self, subject, principal.tenant)

    def _release(self, lease: Lease) -> None:
        self.open -= 1
        for counter, key in ((self._by_subject, lease.subject), (self._by_tenant, lease.tenant)):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]
