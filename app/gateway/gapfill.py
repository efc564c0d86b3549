"""Filling the gap after the live feed reconnected: nothing published meanwhile is lost.

The feed calls `start()` right after it reconnected and resent its subscriptions, before it
reads again: from then on each tenant's live events are held back. Per tenant, once its
subscription is confirmed on the new connection, the history of the wells its streams want
after the last id the hub fanned out is fanned out in id order (up to the tenant's clock at
that read), then the held events newer than that, and the tenant is live again. Browsers that
stayed connected see every reading, in order, once. The streams of a well whose history no
longer reaches back (or of a tenant whose fill keeps failing) are ended instead: they resume
by Last-Event-ID, with a reset and a snapshot for that well.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.backoff import Backoff
from app.cancellation import pause
from app.errors import BrokerError
from app.gateway.replay import HistoryMerge
from app.gateway.stats import HubStats
from app.models import StreamId
from app.streams.seams import LiveFeed, StreamLog

if TYPE_CHECKING:
    from app.gateway.hub import Channel

logger = logging.getLogger(__name__)

PARALLEL_TENANTS = 32  # tenants filled at once: one slow or failing tenant holds back no other
GIVE_UP_AFTER = 5  # failed attempts before a tenant's streams are reset instead


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


@dataclass(eq=False)
class GapFill:
    """Owns the fill task; reads the hub's channels (the hub owns them) and fans out through them."""

    _log: StreamLog
    _feed: LiveFeed
    _channels: dict[str, Channel]
    _replay_page: int
    _stats: HubStats
    _task: asyncio.Task[None] | None = field(default=None, init=False)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        for channel in self._channels.values():
            if channel.held is None:
                channel.held = []
        if self._task is not None:
            self._task.cancel()  # it would start from the same last ids; this one waits for the new connection
        self._task = asyncio.create_task(self._fill_all(), name="hub-gap-fill")
        self._task.add_done_callback(_retrieve)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _fill_all(self) -> None:
        channels = list(self._channels.values())
        logger.info("live feed back: filling the gap of %d tenants from history", len(channels))
        slots = asyncio.Semaphore(PARALLEL_TENANTS)
        await asyncio.gather(*(self._fill(channel, slots) for channel in channels))
        self._stats.gap_fills += 1
        logger.info("gap filled: streams are live again")

    async def _fill(self, channel: Channel, slots: asyncio.Semaphore) -> None:
        backoff = Backoff(first_s=0.1, cap_s=2.0)
        while self._current(channel) and channel.held is not None:
            try:
                await self._feed.confirmed(channel.tenant)  # after this, history covers everything not held
                async with slots:
                    await self._replay(channel)
                return
            except BrokerError as exc:
                if not self._feed.connected:
                    return  # the next reconnect starts a new fill
                delay = backoff.next()
                if backoff.failures >= GIVE_UP_AFTER:  # Redis answers, but not for this tenant
                    channel.reset(f"gap fill failed {backoff.failures} times: {exc}")
                    return
                logger.warning("gap fill of %s failed, retrying: %s", channel.tenant, exc)
                await pause(delay)
            except Exception:  # a bug must not leave the tenant held for ever: its streams resume instead
                logger.exception("gap fill of %s failed", channel.tenant)
                channel.reset("gap fill failed")
                return

    def _current(self, channel: Channel) -> bool:
        """Whether the channel is still the hub's one for its tenant (its last stream may have left)."""
        return self._channels.get(channel.tenant) is channel

    async def _replay(self, channel: Channel) -> None:
        cursor = channel.last_id
        if cursor is None:  # nothing went live for this tenant yet: start where its streams' catch-up ended
            positions = [sub.caught_up_to for sub in channel.members if sub.caught_up_to is not None]
            cursor = min(positions, default=None)
        if cursor is not None:
            merge = HistoryMerge(self._log, channel.tenant, channel.wanted(), cursor, self._replay_page)
            async for events in merge.pages():
                if channel.held is None or not self._current(channel):
                    return
                for event in events:
                    channel.fan_out(event)
                self._stats.gap_events += len(events)
            if merge.interrupted:
                channel.reset("history was trimmed while the gap was filled")
                return
            if merge.truncated:
                lost = channel.subscribers_of(set(merge.truncated))
                channel.reset(f"history no longer covers the gap of {len(merge.truncated)} wells", lost)
        self._release_held(channel)

    @staticmethod
    def _release_held(channel: Channel) -> None:
        held, channel.held = channel.held or [], None
        newest: StreamId | None = channel.last_id
        for event in sorted(held, key=lambda e: e.id):
            if newest is None or event.id > newest:
                channel.fan_out(event)
                newest = event.id
        channel.floor = newest
