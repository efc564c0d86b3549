"""The broker seams: what each consumer needs from the shared store, and nothing more.

One backend (the embedded memory broker, or Redis) provides all the stores; each consumer
takes only the one it uses:

- `StreamLog` (history, latest values, live feed): the ingest publisher writes it, the
  gateway's hub and streams read it;
- `WellRegistry` (which wells a tenant has): the guard checks it, the worker and the
  gateway fill it;
- `TicketStore` (single-use stream tickets), `SessionStore` (dashboard sessions) and
  `RevocationStore` (revoked tokens and sessions): the guard, and the revocation watcher;
- `LeaseStore` (streams counted across gateways): admission control.

Each seam has a memory and a Redis implementation side by side, and one conformance suite
(tests/streams/) runs on both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Literal, Protocol

from app.models import History, Origin, Reading, StreamEvent, StreamId, TenantRead, Topic

Deliver = Callable[[str, StreamEvent], None]
"""Called for every live event of a subscribed tenant (with the tenant), in id order, on the event loop.

It must not block or raise: the hub's fan-out is the only intended implementation.
"""


class LiveFeed(Protocol):
    """One upstream subscription set shared by a whole process (one Redis Pub/Sub connection),
    open for as long as the `async with StreamLog.live_feed(...)` around it.

    `on_gap`, set by the hub, is called after the feed reconnected and resent its
    subscriptions: events published while it was down were never delivered.
    """

    on_gap: Callable[[], None] | None
    reconnects: int  # how often `on_gap` was due: each one a gap the hub fills from history

    @property
    def connected(self) -> bool:
        """Whether live events can arrive now."""

    async def confirmed(self, tenant: str) -> None:
        """Once the tenant's subscription is confirmed on the current connection; BrokerError if it drops."""

    async def subscribe(self, tenant: str) -> None:
        """Subscribe to every well of a tenant; returns once its live events are guaranteed to be delivered."""

    async def unsubscribe(self, tenant: str) -> None:
        """Stop delivery for a tenant."""

    def heard(self, tenant: str) -> StreamId | None:
        """The newest id of a tenant's message that arrived but was skipped as malformed (None: none):
        it was not lost, though the hub never saw it."""

    async def restart(self, why: str) -> None:
        """Start over on a new connection: resubscribe every tenant, then `on_gap` (the feed was
        found to have lost events while connected)."""


class StreamLog(Protocol):
    """Stores readings per well and announces them.

    Contract shared by every implementation:
    - `publish` gives each reading an id `<ms>-<seq>` from its tenant's one clock, so ids are
      strictly increasing per tenant (across all its wells), and makes it visible in history,
      in latest, and to live feeds atomically per batch: no feed sees an event that a read
      cannot return, none is announced twice, and live events of a tenant arrive in id order.
      Publishing registers the reading's well in the tenant's registry too.
    - history is capped per well by length and by age; a read after an id says `truncated`
      for a well when an entry of it newer than the id was trimmed, and for every well when the
      id is newer than anything the tenant's clock ever issued.
    """

    rejected: int  # readings the store refused for good (logged, counted, never retried)

    @property
    def malformed(self) -> Mapping[str, int]:
        """Stored values that were no reading of their key (another producer wrote them), skipped
        by reads, by where they were found: `latest`, `log`, `live` or `wells` (app/streams/codec.py)."""

    async def publish(self, readings: Sequence[Reading], origin: Origin | None = None) -> list[StreamId]:
        """Store and announce a batch; returns the ids in input order.

        With an `origin`, readings whose seq the producer already had applied are skipped
        (they get no id): publishing the same batch twice stores it once.
        """

    async def read(self, tenant: str, wells: Sequence[str] | None, after: StreamId | None, count: int) -> TenantRead:
        """Several wells in one atomic step, at the tenant's current clock.

        `wells` None: every well registered for the tenant at that moment. `after` None: a
        snapshot (each well's latest values, no events); else up to `count` entries of each
        well after `after`, and the latest values of the wells found truncated.
        """

    async def clocks(self, tenants: Sequence[str]) -> dict[str, StreamId]:
        """Each tenant's newest id issued (0-0 for none yet): every id up to it has been announced.
        A tenant whose clock holds no id (another producer wrote it) is left out."""

    async def range(self, topic: Topic, after: StreamId, upto: StreamId, limit: int) -> History:
        """Up to `limit` entries of one well with `after` < id <= `upto`, oldest first (a follow-up
        to `read`); `truncated` when entries after `after` were trimmed meanwhile."""

    def live_feed(self, deliver: Deliver) -> AbstractAsyncContextManager[LiveFeed]:
        """The process's live feed, open inside `async with`; `deliver` gets every event of every subscribed topic."""


class WellRegistry(Protocol):
    """The wells each tenant has: configured ones, and every well a reading was published for."""

    async def wells(self, tenant: str) -> list[str]:
        """The tenant's registered wells, sorted."""

    async def has_well(self, tenant: str, well: str) -> bool:
        """Whether the well is registered for the tenant."""

    async def register(self, tenant: str, wells: Sequence[str]) -> None:
        """Add wells to the tenant's registry."""


class TicketStore(Protocol):
    """Single-use stream tickets, shared by every gateway."""

    async def put(self, key: str, payload: bytes, ttl_s: float) -> None:
        """Store a ticket under `key` (a hash of the ticket) for `ttl_s` seconds."""

    async def take(self, key: str) -> bytes | None:
        """Fetch and delete a ticket in one step: a ticket redeems at most once, on any gateway."""


class SessionStore(Protocol):
    """Dashboard sessions, shared by every gateway. The cookie holds a random id; the store knows
    only its SHA-256, so the store never holds a usable cookie."""

    async def put(self, key: str, payload: bytes, ttl_s: float) -> None:
        """Store a session (its Principal as JSON) under `key` for `ttl_s` seconds."""

    async def get(self, key: str) -> bytes | None:
        """The session's payload, or None if it never was, expired or was deleted."""

    async def delete(self, key: str) -> None:
        """End the session on every gateway (its live streams: see RevocationStore)."""


Kind = Literal["token", "subject", "session"]


@dataclass(frozen=True, slots=True)
class Revocation:
    """What was revoked: a token by `jti`, every token of a subject issued before `before`
    (epoch seconds), or a session; `tenant` scopes the first two, `key` is the jti, the
    subject's hash or the session's hash."""

    kind: Kind
    tenant: str
    key: str
    before: float = 0.0


class RevocationStore(Protocol):
    """Revoked tokens and sessions, shared by every gateway."""

    async def revoke(self, revocation: Revocation, ttl_s: float) -> None:
        """Remember it for `ttl_s` (as long as a token it covers may live; 0: nothing to
        remember, as for a deleted session) and announce it to every gateway's live streams."""

    async def is_revoked(self, tenant: str, token_id: str | None, subject_key: str, issued_at: float | None) -> bool:
        """Whether the token (by `jti`) or every token of its subject issued before a time is revoked."""

    async def since(self, cursor: str | None) -> tuple[list[Revocation], str]:
        """Revocations announced after `cursor`, and the cursor to ask with next; None: from now on."""


class LeaseStore(Protocol):
    """Counters of open streams shared by every gateway; a gateway that dies stops counting."""

    async def acquire(self, counters: Sequence[tuple[str, int]], member: str, ttl_s: float) -> int | None:
        """Count `member` in every counter, unless one already holds its limit.

        A member not renewed within `ttl_s` stops counting. Returns the index of the full
        counter, or None.
        """

    async def release(self, leases: Sequence[tuple[str, str]]) -> None:
        """Stop counting these (counter, member) pairs; one round trip for many streams."""

    async def renew(self, leases: Sequence[tuple[str, str]], ttl_s: float) -> None:
        """Keep (counter, member) pairs counting for another `ttl_s`."""


class WorkerLeases(Protocol):
    """Ingest workers' leases per tenant, and the verdict on the tags of a worker that stopped.

    A worker beats for each tenant it feeds, well within `ttl_s`; its first beat claims the
    (well, tag) pairs it feeds, taking them from any other worker. `sweep` finds a tenant's
    workers whose lease ran out and reports each of their tags whose latest reading is neither
    BAD nor already stale as UNCERTAIN, reason `stale` (last value and timestamp kept), in the
    log like any reading; then forgets those workers, so it happens once, whoever sweeps.
    """

    async def beat(self, worker: str, tenant: str, ttl_s: float, tags: Sequence[tuple[str, str]] = ()) -> bool:
        """Renew `worker`'s lease on `tenant` for `ttl_s` (0 ends it now); with `tags`, claim them.

        True when the lease was not held before this beat (the first one, or it ran out and
        may have been swept): the worker then claims its tags again and republishes what it knows.
        """

    async def sweep(self, tenant: str) -> int:
        """Mark the tags of the tenant's expired workers stale; how many were marked."""


class Health(Protocol):
    async def ready(self) -> bool:
        """True when the backing store answers."""


@dataclass(frozen=True, slots=True)
class Broker:
    """The stores of one backend, opened and closed together (app/streams/connect.py)."""

    log: StreamLog
    registry: WellRegistry
    tickets: TicketStore
    sessions: SessionStore
    revocations: RevocationStore
    leases: LeaseStore
    workers: WorkerLeases
    health: Health
