"""Filling the gap after the live feed reconnected: nothing published meanwhile is lost.

The feed calls `start()` right after it reconnected and resent its subscriptions, before it
reads again: from then on each topic's live events are held back. Per topic, once its
subscription is confirmed on the new connection, history after the last id the hub fanned out
is fanned out, then the held events newer than that, and the topic is live again. Browsers that
stayed connected see every reading, in order, once. A topic whose history no longer reaches
back (or that keeps failing) is reset instead: its streams end and resume by Last-Event-ID.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.backoff import Backoff
from app.errors import BrokerError
from app.gateway.stats import HubStats
from app.models import StreamId, Topic
from app.streams.seams import LiveFeed, StreamLog

if TYPE_CHECKING:
    from app.gateway.hub import Channel

logger = logging.getLogger(__name__)

PARALLEL_TOPICS = 32  # topics filled at once: one slow or failing well holds back no other
GIVE_UP_AFTER = 5  # failed attempts before a topic's streams are reset instead


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


@dataclass(eq=False)
class GapFill:
    """Owns the fill task; reads the hub's channels (the hub owns them) and fans out through them."""

    _log: StreamLog
    _feed: LiveFeed
    _channels: dict[Topic, Channel]
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
        logger.info("live feed back: filling the gap of %d topics from history", len(channels))
        slots = asyncio.Semaphore(PARALLEL_TOPICS)
        await asyncio.gather(*(self._fill(channel, slots) for channel in channels))
        self._stats.gap_fills += 1
        logger.info("gap filled: streams are live again")

    async def _fill(self, channel: Channel, slots: asyncio.Semaphore) -> None:
        backoff = Backoff(first_s=0.1, cap_s=2.0)
        while self._current(channel) and channel.held is not None:
            try:
                await self._feed.confirmed(channel.topic)  # after this, history covers everything not held
                async with slots:
                    await self._replay(channel)
                return
            except BrokerError as exc:
                if not self._feed.connected:
                    return  # the next reconnect starts a new fill
                delay = backoff.next()
                if backoff.failures >= GIVE_UP_AFTER:  # Redis answers, but not for this well
                    channel.reset(f"gap fill failed {backoff.failures} times: {exc}")
                    return
                logger.warning("gap fill of %s failed, retrying: %s", channel.topic, exc)
                await asyncio.sleep(delay)
            except Exception:  # a bug must not leave the topic held for ever: its streams resume instead
                logger.exception("gap fill of %s failed", channel.topic)
                channel.reset("gap fill failed")
                return

    def _current(self, channel: Channel) -> bool:
        """Whether the channel is still the hub's one for its topic (its last stream may have left)."""
        return self._channels.get(channel.topic) is channel

    async def _replay(self, channel: Channel) -> None:
        cursor = channel.last_id
        if cursor is None:  # nothing went live on this topic yet: start where its streams' catch-up ended
            positions = [sub.caught_up_to for sub in channel.subscribers if sub.caught_up_to is not None]
            cursor = min(positions, default=None)
        while cursor is not None and channel.held is not None:
            found = await self._log.history(channel.topic, cursor, self._replay_page)
            if channel.held is None or not self._current(channel):
                return
            if found.truncated:
                channel.reset("history no longer covers the gap")
                return
            for event in found.events:
                channel.fan_out(event)
            self._stats.gap_events += len(found.events)
            cursor = found.cursor
            if not found.more:
                break
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
