"""The live feed held against the log's clock: a subscription that went quiet is noticed and repaired.

The sweeper checks every hop after the hub, stream by stream (app/gateway/subscriber.py). This
checks the hop before it, Redis Pub/Sub to this process, which no stream can see: a
subscription can vanish while its connection stays up (on Redis Cluster a slot that moves
sends `sunsubscribe`; a bookkeeping bug could drop one), and every stream of that tenant would
then stay open, heartbeating, and silent.

Each round reads the clocks of the tenants this gateway is subscribed to (one MGET): a tenant's
clock is its newest id, set by the same script that PUBLISHed it. An id the clock had issued
one round ago that the hub has still not fanned out was lost on the way, so the feed starts
over on a new connection, which resubscribes and fills the gap from history exactly as after a
Redis outage: the open streams get every reading, in order, once.

A round is `interval_s` (the stream stall bound), so a lost subscription is repaired within two
of them of the first reading it missed, and a feed that is merely behind is given a whole round
to catch up before it counts as lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.cancellation import pause
from app.errors import BrokerError
from app.gateway.stats import HubStats
from app.models import StreamId
from app.streams.seams import LiveFeed, StreamLog

if TYPE_CHECKING:
    from app.gateway.hub import Channel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Mark:
    channel: Channel  # the one it was read for: a tenant whose last stream left and came back starts over
    base: StreamId  # the clock when the audit first saw the channel: older ids may predate its subscription
    expected: StreamId  # the clock one round ago: by now the hub must have fanned out up to here


@dataclass(eq=False)
class FeedAudit:
    """Owns its task and its marks; reads the hub's channels (the hub owns them)."""

    _log: StreamLog
    _feed: LiveFeed
    _channels: dict[str, Channel]
    _stats: HubStats
    _filling: Callable[[], bool]
    interval_s: float
    _marks: dict[str, _Mark] = field(default_factory=dict, init=False)
    _reconnects: int = field(default=0, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="hub-feed-audit")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await pause(self.interval_s)
            try:
                await self.round()
            except BrokerError as exc:  # Redis is away: the feed's own reconnect covers that
                logger.debug("feed audit skipped: %s", exc)
                self._marks.clear()
            except Exception:  # a bug here must not end the audit for good
                logger.exception("feed audit round failed")
                self._marks.clear()

    async def round(self) -> None:
        """One look: compare last round's clocks with what the hub fanned out, then read them anew."""
        if not self._steady():
            self._marks.clear()
            return
        channels = {tenant: channel for tenant, channel in self._channels.items() if _subscribed(channel)}
        clocks = await self._log.clocks(list(channels))
        if not self._steady():  # the feed dropped while we read: its reconnect fills the gap
            self._marks.clear()
            return
        lost: list[tuple[str, StreamId, StreamId | None]] = []
        marks = {}
        for tenant, clock in clocks.items():
            channel = channels[tenant]
            if self._channels.get(tenant) is not channel:
                continue
            mark = self._marks.get(tenant)
            if mark is None or mark.channel is not channel:
                marks[tenant] = _Mark(channel, clock, clock)
                continue
            # What arrived: fanned out, or skipped as malformed (another producer's message).
            arrived = [i for i in (channel.last_id, self._feed.heard(tenant)) if i is not None]
            seen = max([mark.base, *arrived])
            if seen < mark.expected and channel.held is None:
                lost.append((tenant, mark.expected, channel.last_id))
            marks[tenant] = _Mark(channel, mark.base, clock)
        self._marks = marks
        if lost:
            self._stats.feed_silences += 1
            for tenant, expected, seen_id in lost:
                logger.error(
                    "live feed silent for %s: Redis issued %s a round ago, this gateway's newest is %s;"
                    " reconnecting the feed (the gap is filled from history)",
                    tenant,
                    expected,
                    seen_id or "none",
                )
            self._marks.clear()  # the fill that follows is judged afresh
            await self._feed.restart(f"{len(lost)} tenants lost live events while connected")

    def _steady(self) -> bool:
        """Connected, no gap being filled, and no reconnect since the last look (each has its own fill)."""
        reconnects, before = self._feed.reconnects, self._reconnects
        self._reconnects = reconnects
        return self._feed.connected and not self._filling() and reconnects == before


def _subscribed(channel: Channel) -> bool:
    ready = channel.ready
    return ready is not None and ready.done() and not ready.cancelled() and ready.exception() is None
