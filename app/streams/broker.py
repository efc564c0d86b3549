"""The broker seam: where readings are stored (history, latest) and announced (live).

Two implementations sit side by side and pass one conformance suite
(tests/streams/test_broker.py): `MemoryBroker` (embedded, one process) and `RedisBroker`
(many gateways and ingestion workers on one Redis).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol

import orjson

from app.models import History, Origin, Reading, Snapshot, StreamEvent, StreamId, Topic
from app.streams.sse import single_line_json

Deliver = Callable[[Topic, StreamEvent], None]
"""Called for every live event of a subscribed topic, in stream order, on the event loop.

It must not block or raise: the hub's fan-out is the only intended implementation.
"""


def decode_event(raw_id: bytes, data: bytes) -> StreamEvent:
    """An event from stored bytes; raises ValueError (or KeyError/TypeError) if it is not a reading."""
    data = single_line_json(data)
    parsed = orjson.loads(data)
    tag = parsed["tagName"]
    if not isinstance(tag, str):
        raise TypeError("tagName must be a string")
    return StreamEvent(StreamId.parse(raw_id.decode()), tag, data, epoch_s(parsed.get("timestamp")))


def epoch_s(timestamp: object) -> float:
    """A reading's ISO 8601 UTC timestamp as epoch seconds; 0.0 when it is not one."""
    if not isinstance(timestamp, str):
        return 0.0
    try:
        return datetime.fromisoformat(timestamp).timestamp()
    except ValueError:
        return 0.0


class LiveFeed(Protocol):
    """One upstream subscription set shared by a whole process (one Redis Pub/Sub connection).

    `on_gap`, set by the hub, is called after the feed reconnected and resent its
    subscriptions: events published while it was down were never delivered.
    """

    on_gap: Callable[[], None] | None
    reconnects: int  # how often `on_gap` was due: each one a gap the hub fills from history

    @property
    def connected(self) -> bool:
        """Whether live events can arrive now."""

    async def confirmed(self, topic: Topic) -> None:
        """Once the topic's subscription is confirmed on the current connection; BrokerError if it drops."""

    async def subscribe(self, topic: Topic) -> None:
        """Subscribe to a topic; returns once live events for it are guaranteed to be delivered."""

    async def unsubscribe(self, topic: Topic) -> None:
        """Stop delivery for a topic."""

    async def aclose(self) -> None:
        """Drop every subscription and the connection behind them."""


class Broker(Protocol):
    """Stores readings per well and announces them.

    Contract shared by every implementation:
    - `publish` gives each reading an id `<ms>-<seq>`, strictly increasing per topic, and makes
      it visible in history, in latest, and to live feeds atomically per batch: no feed sees an
      event that `history` cannot return, and none is announced twice.
    - history is capped by length and by age; `history(after=id)` says `truncated` when an
      entry newer than `id` was trimmed, or when `id` is newer than anything ever written.
    """

    rejected: int  # readings the store refused for good (logged, counted, never retried)

    async def publish(self, readings: Sequence[Reading], origin: Origin | None = None) -> list[StreamId]:
        """Store and announce a batch; returns the ids in input order.

        With an `origin`, readings whose seq the producer already had applied are skipped
        (they get no id): publishing the same batch twice stores it once.
        """

    async def snapshot(self, topic: Topic) -> Snapshot:
        """Latest reading per tag, consistent with the id of the newest entry."""

    async def history(self, topic: Topic, after: StreamId, limit: int) -> History:
        """Up to `limit` entries with id > `after`, oldest first."""

    async def wells(self, tenant: str) -> list[str]:
        """The tenant's registered wells (configured, or seen by ingestion), sorted."""

    async def has_well(self, tenant: str, well: str) -> bool:
        """Whether the well is registered for the tenant."""

    async def register_wells(self, tenant: str, wells: Sequence[str]) -> None:
        """Add wells to the tenant's registry (publishing registers its wells too)."""

    async def put_ticket(self, key: str, payload: bytes, ttl_s: int) -> None:
        """Store a stream ticket under `key` (a hash of the ticket) for `ttl_s` seconds."""

    async def take_ticket(self, key: str) -> bytes | None:
        """Fetch and delete a ticket in one step: a ticket redeems at most once, on any gateway."""

    async def acquire_lease(self, counters: Sequence[tuple[str, int]], member: str, ttl_s: float) -> int | None:
        """Count `member` in every counter, unless one already holds its limit.

        Counters are shared by every gateway on the broker; a member not renewed within `ttl_s`
        stops counting (a gateway that died). Returns the index of the full counter, or None.
        """

    async def release_leases(self, leases: Sequence[tuple[str, str]]) -> None:
        """Stop counting these (counter, member) pairs; one round trip for many streams."""

    async def renew_leases(self, leases: Sequence[tuple[str, str]], ttl_s: float) -> None:
        """Keep (counter, member) pairs counting for another `ttl_s`."""

    async def open_feed(self, deliver: Deliver) -> LiveFeed:
        """Open the process's live feed; `deliver` gets every event of every subscribed topic."""

    async def ready(self) -> bool:
        """True when the backing store answers."""

    async def aclose(self) -> None:
        """Release connections."""
