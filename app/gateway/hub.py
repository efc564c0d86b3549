"""The hub: one live feed per gateway process, fanned out to every open stream.

The hub holds one live subscription per tenant (every well of the tenant on one channel). Per
live event it does O(1) work plus one list append per subscriber that wants the event's well:
the frame bytes are built once and the same `Frame` goes to each of them. A subscriber
never blocks the hub: when its queue is full it is ended (and counted), and its client
resumes from history by Last-Event-ID.

Timers are not per connection: one sweeper marks heartbeats due and ends streams whose send
has been stuck longer than the send timeout, whose token expired, that reached their age, or
that are open but silent: a reading of their wells waited unsent, or was fanned out and never
reached them (see Subscriber). The hop before the hub, Redis to this process, is checked by
the feed audit (app/gateway/feedaudit.py).

When the live feed drops and comes back, open streams stay open (heartbeats go on) and the
hub fills the gap in place (app/gateway/gapfill.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from types import TracebackType

from app.cancellation import pause
from app.errors import BrokerError
from app.gateway.feedaudit import FeedAudit
from app.gateway.gapfill import GapFill
from app.gateway.sse import reading_frame
from app.gateway.stats import HubStats
from app.gateway.subscriber import Frame, Subscriber
from app.models import StreamEvent, StreamId
from app.streams.seams import LiveFeed, StreamLog

logger = logging.getLogger(__name__)

MAX_QUEUE_WELLS = 64


def _retrieve(task: asyncio.Task[None]) -> None:
    # Every subscriber may have left before the upstream subscribe failed: nobody else reads it.
    if not task.cancelled():
        task.exception()


class Channel:
    """One tenant's subscribers on this gateway (its live feed subscription) and where its live events stand.

    Subscribers are indexed by the wells they asked for, so an event costs one dict lookup and
    then only the streams that want its well: a per-well stream, a stream of a list of wells
    (under each of them), and the streams of every well (`everything`, which also see wells
    registered after they opened).
    """

    __slots__ = (
        "by_well",
        "everything",
        "floor",
        "held",
        "last_id",
        "last_published",
        "members",
        "published",
        "ready",
        "stats",
        "tenant",
    )

    def __init__(self, tenant: str, stats: HubStats) -> None:
        self.tenant = tenant
        self.stats = stats
        self.members: set[Subscriber] = set()
        self.by_well: dict[str, set[Subscriber]] = {}
        self.everything: set[Subscriber] = set()
        self.ready: asyncio.Task[None] | None = None  # the upstream subscription, shared by all who wait
        self.last_id: StreamId | None = None  # the newest event fanned out: where a gap fill starts
        self.held: list[StreamEvent] | None = None  # live events held back while a gap is filled
        # After a fill, live messages already sent from history may still be in flight on the
        # Pub/Sub connection (history answered first): they are dropped up to here.
        self.floor: StreamId | None = None
        # time.monotonic() each well last had a reading fanned out (and any well): what the sweeper holds
        # each stream's sends against, so a stream the fan-out never reached is noticed too.
        self.published: dict[str, float] = {}
        self.last_published = 0.0

    def add(self, sub: Subscriber) -> None:
        self.members.add(sub)
        if sub.wells is None:
            self.everything.add(sub)
            return
        for well in sub.wells:
            self.by_well.setdefault(well, set()).add(sub)

    def remove(self, sub: Subscriber) -> None:
        self.members.discard(sub)
        if sub.wells is None:
            self.everything.discard(sub)
            return
        for well in sub.wells:
            subs = self.by_well.get(well)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self.by_well[well]

    def wanted(self) -> list[str] | None:
        """The wells a gap fill must read: None when some stream wants every well."""
        return None if self.everything else sorted(self.by_well)

    def published_for(self, sub: Subscriber) -> float:
        """When a reading this stream wants was last fanned out; 0 for a stream of some tags only."""
        if sub.tags is not None:
            return 0.0
        if sub.wells is None:
            return self.last_published
        published = self.published
        return max([published.get(well, 0.0) for well in sub.wells], default=0.0)

    def subscribers_of(self, wells: set[str]) -> set[Subscriber]:
        found = set(self.everything)
        for well in wells:
            found |= self.by_well.get(well, set())
        return found

    def deliver(self, event: StreamEvent, max_held: int) -> None:
        held = self.held
        if held is not None:
            held.append(event)
            if len(held) > max_held:  # a fill this far behind would only end them as slow
                self.reset("held events overflowed")
            return
        floor = self.floor
        if floor is not None:
            if event.id <= floor:
                return
            self.floor = None  # one passed: ids only grow, so all later ones do
        self.fan_out(event)

    def fan_out(self, event: StreamEvent) -> None:
        self.last_id = event.id
        now = time.monotonic()
        self.published[event.well] = self.last_published = now
        frame = Frame(event.id, reading_frame(event), event.ts, now, event.well, event.tag)
        subs = self.by_well.get(event.well)
        if subs:
            self._offer(subs, frame, event.tag)
        if self.everything:
            self._offer(self.everything, frame, event.tag)

    def _offer(self, subs: set[Subscriber], frame: Frame, tag: str) -> None:
        # The hot loop: once per event per subscriber, so the queue append is written out inline
        # (the queue is the one structure the hub and a stream's writer share; see Subscriber).
        for sub in subs:
            if sub.end_reason is not None or (sub.tags is not None and tag not in sub.tags):
                continue
            frames = sub.frames
            if len(frames) >= sub.max_queued:
                self.stats.slow_disconnects += 1
                logger.warning("stream on %s ended: queue of %d frames full", self.tenant, sub.max_queued)
                sub.end("slow")
                continue
            frames.append(frame)
            waiter = sub.waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def reset(self, why: str, subs: set[Subscriber] | None = None) -> None:
        """End streams of the tenant (all of them, or `subs`): they resume by Last-Event-ID, with a
        reset and a snapshot for the wells whose history is gone."""
        logger.warning("streams on %s ended: %s", self.tenant, why)
        if subs is None:
            self.held = None
            self.floor = None
        for sub in self.members if subs is None else subs:
            sub.end("upstream-gap")


class Hub:
    """Reference-counted tenant subscriptions on one shared live feed; `async with Hub(...) as hub:`.

    Args:
        log: the stream log the live feed and gap fills come from.
        queue_size: frames a subscriber may have queued before it is ended as slow.
        heartbeat_s: a stream that sent nothing for this long gets a heartbeat.
        send_timeout_s: a send stuck this long ends the stream (a peer that stopped reading).
        stall_s: a reading queued this long without being sent ends the stream (see Subscriber.sweep);
            also the round of the feed audit (app/gateway/feedaudit.py).
        replay_page: history entries read per round trip when a gap is filled.
        max_age_s: streams end (with a goodbye and retry) after 75-100 % of this, so clients
            rebalance onto gateways added since; None keeps streams open for as long as they last.
    """

    def __init__(
        self,
        log: StreamLog,
        queue_size: int = 1024,
        heartbeat_s: float = 15,
        send_timeout_s: float = 10,
        replay_page: int = 500,
        max_age_s: float | None = None,
        stall_s: float = 5,
    ):
        self._log = log
        self.max_age_s = max_age_s
        self.queue_size = queue_size
        self.heartbeat_s = heartbeat_s
        self.send_timeout_s = send_timeout_s
        self.stall_s = stall_s
        self._channels: dict[str, Channel] = {}  # by tenant
        self._feed: LiveFeed | None = None
        self._stack = contextlib.AsyncExitStack()
        self._sweeper: asyncio.Task[None] | None = None
        self._gap_fill: GapFill | None = None
        self._replay_page = replay_page
        self.stats = HubStats()
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    async def __aenter__(self) -> Hub:
        self._feed = await self._stack.enter_async_context(self._log.live_feed(self._deliver))
        self._gap_fill = GapFill(self._log, self._feed, self._channels, self._replay_page, self.stats)
        self._feed.on_gap = self._gap_fill.start
        self._stack.push_async_callback(self._gap_fill.aclose)
        fill = self._gap_fill
        audit = FeedAudit(self._log, self._feed, self._channels, self.stats, lambda: fill.running, self.stall_s)
        audit.start()
        self._stack.push_async_callback(audit.aclose)
        self._sweeper = asyncio.create_task(self._sweep(), name="hub-sweeper")
        self._stack.push_async_callback(self._stop_sweeper)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    async def _stop_sweeper(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    @property
    def live(self) -> bool:
        """The live feed is connected and no gap is being filled: new readings flow now."""
        feed, fill = self._feed, self._gap_fill
        return feed is not None and feed.connected and (fill is None or not fill.running)

    @property
    def open_streams(self) -> int:
        return sum(len(channel.members) for channel in self._channels.values())

    @property
    def tenants(self) -> int:
        """Tenants this gateway holds a live subscription for."""
        return len(self._channels)

    def tenant_names(self) -> list[str]:
        """Tenants this gateway holds a live subscription for."""
        return list(self._channels)

    def streams_by_tenant(self) -> dict[str, int]:
        """For /metrics."""
        return {tenant: len(channel.members) for tenant, channel in self._channels.items()}

    @property
    def malformed(self) -> Mapping[str, int]:
        """Values of other producers the log's reads and the live feed skipped, by source."""
        return self._log.malformed

    @property
    def feed_reconnects(self) -> int:
        return self._feed.reconnects if self._feed is not None else 0

    async def subscribe(
        self,
        tenant: str,
        wells: frozenset[str] | None,
        tags: frozenset[str] | None = None,
        expires_at: float | None = None,
        interrupt: Callable[[], object] | None = None,
        grace_s: float = 0.0,
    ) -> Subscriber:
        """A new subscriber; returns once live delivery is guaranteed.

        `expires_at` (epoch seconds): the stream is ended with reason "auth-expired" then.
        `interrupt`: how to break off the stream's send when it must end while the send is stuck.
        `grace_s`: how long the stream holds a reading back on purpose (a conflated stream's interval).

        Raises BrokerError when the upstream subscription fails. The upstream subscribe runs in
        a task owned by the hub: one caller going away cannot fail the others waiting on it.
        """
        assert self._feed is not None, "hub not started"
        now = asyncio.get_running_loop().time()
        # Jittered so streams opened together (after a restart) do not all retire together.
        retire_at = now + self.max_age_s * random.uniform(0.75, 1.0) if self.max_age_s else math.inf
        sub = Subscriber(tenant, wells, tags, self.queue_for(wells), now, expires_at, retire_at, interrupt, grace_s)
        self._idle.clear()
        channel = self._channels.get(tenant)
        if channel is None:
            channel = self._channels[tenant] = Channel(tenant, self.stats)
            channel.ready = asyncio.create_task(self._upstream(channel), name=f"subscribe {tenant}")
            channel.ready.add_done_callback(_retrieve)
        channel.add(sub)
        try:
            assert channel.ready is not None
            await asyncio.shield(channel.ready)
        except BaseException:
            await self.unsubscribe(sub)
            raise
        return sub

    def queue_for(self, wells: frozenset[str] | None) -> int:
        """Frames a stream may have queued: `queue_size` per well it carries, up to 64 wells' worth.

        A burst across a whole field (every well's readings in one batch) is not a slow client;
        the queue holds references to shared frames, so a longer one costs 8 bytes a frame.
        """
        return self.queue_size * min(MAX_QUEUE_WELLS, len(wells) if wells is not None else MAX_QUEUE_WELLS)

    async def _upstream(self, channel: Channel) -> None:
        assert self._feed is not None
        try:
            await self._feed.subscribe(channel.tenant)
        except BaseException as exc:
            if self._channels.get(channel.tenant) is channel:  # nobody else may join a failed subscription
                del self._channels[channel.tenant]
                self._update_idle()
            if isinstance(exc, BrokerError | asyncio.CancelledError):
                raise
            raise BrokerError("subscribe", repr(exc)) from exc

    async def unsubscribe(self, sub: Subscriber) -> None:
        """Remove a subscriber; the tenant's last subscriber also drops the upstream subscription."""
        sub.frames.clear()
        channel = self._channels.get(sub.tenant)
        if channel is None or sub not in channel.members:
            self._update_idle()
            return
        channel.remove(sub)
        if not channel.members:
            del self._channels[sub.tenant]
            self._update_idle()
            if self._feed is not None:
                await self._feed.unsubscribe(sub.tenant)

    def _update_idle(self) -> None:
        if not self._channels:
            self._idle.set()

    def _deliver(self, tenant: str, event: StreamEvent) -> None:
        channel = self._channels.get(tenant)
        if channel is not None:
            channel.deliver(event, 4 * self.queue_size)

    def drain(self) -> None:
        """Tell every stream to say goodbye (with a retry hint) and end."""
        self.draining = True
        self._end_all("drain")

    def abort(self) -> None:
        """End every stream now, interrupting sends that are stuck (the end of a shutdown grace)."""
        self._end_all("shutdown")

    def _end_all(self, reason: str) -> None:
        for channel in self._channels.values():
            for sub in channel.members:
                sub.end(reason)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no stream is open; False if some are still open after `timeout_s`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        return self._idle.is_set()

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        interval = min(1.0, self.heartbeat_s / 2)
        while True:
            await pause(interval)
            now, wall = loop.time(), time.time()
            for channel in list(self._channels.values()):
                for sub in list(channel.members):
                    published_at = channel.published_for(sub)
                    reason = sub.sweep(now, wall, self.heartbeat_s, self.send_timeout_s, self.stall_s, published_at)
                    if reason == "send-timeout":
                        self.stats.send_timeouts += 1
                        logger.warning("stream on %s ended: send stuck for %.1f s", sub.tenant, sub.stuck_for(now))
                    elif reason == "stalled":
                        self.stats.stalled += 1
                        logger.error(
                            "stream on %s ended: a reading waited %.1f s unsent (a silent stream; it resumes)",
                            sub.tenant,
                            sub.waiting_for(now),
                        )
                    elif reason == "silent":
                        self.stats.silent += 1
                        logger.error(
                            "stream on %s ended: its wells published %.1f s ago and nothing reached it"
                            " (an open but silent stream; it resumes)",
                            sub.tenant,
                            sub.silent_for(now),
                        )
                    if reason is not None:
                        sub.end(reason, now)
