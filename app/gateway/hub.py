"""The hub: one live feed per gateway process, fanned out to every open stream.

Per live event the hub does O(1) work plus one list append per subscriber: the frame bytes
are built once and the same `Frame` tuple goes to every subscriber of the topic. A subscriber
never blocks the hub: when its queue is full it is ended (and counted), and its client
resumes from history by Last-Event-ID.

Timers are not per connection: one sweeper marks heartbeats due and ends streams whose send
has been stuck longer than the send timeout.

When the live feed drops and comes back, open streams stay open (heartbeats go on) and the
hub fills the gap in place: per topic, live events are held back, history after the last
delivered id is fanned out, then the held events newer than that, and the topic is live
again. Browsers that stayed connected see every reading, in order, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field

from app.backoff import Backoff
from app.errors import BrokerError
from app.gateway.sse import reading_frame
from app.gateway.stats import HubStats
from app.models import StreamEvent, StreamId, Topic
from app.streams.seams import LiveFeed, StreamLog

logger = logging.getLogger(__name__)

# Ends that let a send in progress finish, so the goodbye with its retry hint still goes out.
GENTLE = frozenset({"drain", "max-age"})

Frame = tuple[StreamId, bytes, float]  # id, SSE bytes, device time (epoch s) for the latency histogram


def _retrieve(task: asyncio.Task[None]) -> None:
    # Every subscriber may have left before the upstream subscribe failed: nobody else reads it.
    if not task.cancelled():
        task.exception()


class Subscriber:
    """One open stream's queue and signals. Only the hub and the stream's own task touch it."""

    __slots__ = (
        "cancelled",
        "end_reason",
        "expires_at",
        "frames",
        "heartbeat_due",
        "last_send",
        "max_queued",
        "retire_at",
        "sending_since",
        "skip_through",
        "tags",
        "task",
        "topic",
        "waiter",
    )

    def __init__(
        self,
        topic: Topic,
        tags: frozenset[str] | None,
        max_queued: int,
        now: float,
        expires_at: float | None,
        retire_at: float = math.inf,
    ) -> None:
        self.topic = topic
        self.expires_at = expires_at
        self.retire_at = retire_at
        self.tags = tags
        self.max_queued = max_queued
        self.frames: list[Frame] = []  # a list, not a deque: an empty deque costs 600 bytes a stream
        self.task: asyncio.Task[object] | None = asyncio.current_task()
        self.end_reason: str | None = None
        self.skip_through: StreamId | None = None
        self.heartbeat_due = False
        self.last_send = now
        self.sending_since = 0.0
        self.cancelled = False
        self.waiter: asyncio.Future[None] | None = None

    def take(self) -> list[bytes]:
        """Everything queued, minus frames already sent by a replay."""
        frames = self.frames
        self.frames = []
        skip = self.skip_through
        if skip is None:
            return [data for _, data, _ in frames]
        out = [data for stream_id, data, _ in frames if stream_id > skip]
        if out:
            self.skip_through = None  # ids only grow: once one passes, all later ones do
        return out

    async def wait(self) -> None:
        """Until something is queued, a heartbeat is due, or the stream must end."""
        if self.frames or self.heartbeat_due or self.end_reason:
            return
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def end(self, reason: str) -> None:
        """Ask the stream to end. 'drain' and 'max-age' end it cleanly, after the send in progress;
        anything else also interrupts a stuck send."""
        if self.end_reason is None:
            self.end_reason = reason
        if reason not in GENTLE and self.sending_since and self.task is not None and not self.cancelled:
            self.cancelled = True
            self.task.cancel()
        self.wake()

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


@dataclass
class _TopicState:
    subscribers: set[Subscriber] = field(default_factory=set)
    ready: asyncio.Task[None] | None = None
    last_id: StreamId | None = None  # the newest event fanned out: where a gap fill starts
    held: list[StreamEvent] | None = None  # live events held back while a gap is filled
    # After a fill, live messages already sent from history may still be in flight on the
    # Pub/Sub connection (history answered first): they are dropped up to here.
    floor: StreamId | None = None


class Hub:
    """Reference-counted topic subscriptions on one shared live feed.

    Args:
        log: the stream log the live feed and gap fills come from.
        queue_size: frames a subscriber may have queued before it is ended as slow.
        heartbeat_s: a stream that sent nothing for this long gets a heartbeat.
        send_timeout_s: a send stuck this long ends the stream (a peer that stopped reading).
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
    ):
        self._log = log
        self.max_age_s = max_age_s
        self.queue_size = queue_size
        self.heartbeat_s = heartbeat_s
        self.send_timeout_s = send_timeout_s
        self.replay_page = replay_page
        self._topics: dict[Topic, _TopicState] = {}
        self._feed: LiveFeed | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._filler: asyncio.Task[None] | None = None
        self.stats = HubStats()
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self) -> None:
        self._feed = await self._log.open_feed(self._deliver)
        self._feed.on_gap = self._on_gap
        self._sweeper = asyncio.create_task(self._sweep(), name="hub-sweeper")

    async def aclose(self) -> None:
        for task in (self._sweeper, self._filler):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._feed is not None:
            await self._feed.aclose()

    @property
    def live(self) -> bool:
        """The live feed is connected and no gap is being filled: new readings flow now."""
        return self._feed is not None and self._feed.connected and (self._filler is None or self._filler.done())

    @property
    def open_streams(self) -> int:
        return sum(len(state.subscribers) for state in self._topics.values())

    @property
    def topics(self) -> int:
        return len(self._topics)

    def streams_by_tenant(self) -> dict[str, int]:
        """For /metrics: walks every topic, so not for the hot path."""
        counts: dict[str, int] = {}
        for topic, state in self._topics.items():
            counts[topic.tenant] = counts.get(topic.tenant, 0) + len(state.subscribers)
        return counts

    @property
    def feed_reconnects(self) -> int:
        return self._feed.reconnects if self._feed is not None else 0

    async def subscribe(
        self, topic: Topic, tags: frozenset[str] | None = None, expires_at: float | None = None
    ) -> Subscriber:
        """Register the current task as a subscriber; returns once live delivery is guaranteed.

        `expires_at` (epoch seconds): the stream is ended with reason "auth-expired" then.

        Raises BrokerError when the upstream subscription fails. The upstream subscribe runs in
        a task owned by the hub: one caller going away cannot fail the others waiting on it.
        """
        assert self._feed is not None, "hub not started"
        now = asyncio.get_running_loop().time()
        # Jittered so streams opened together (after a restart) do not all retire together.
        retire_at = now + self.max_age_s * random.uniform(0.75, 1.0) if self.max_age_s else math.inf
        sub = Subscriber(topic, tags, self.queue_size, now, expires_at, retire_at)
        self._idle.clear()
        state = self._topics.get(topic)
        if state is None:
            state = self._topics[topic] = _TopicState()
            state.ready = asyncio.create_task(self._upstream(topic, state), name=f"subscribe {topic}")
            state.ready.add_done_callback(_retrieve)
        state.subscribers.add(sub)
        try:
            assert state.ready is not None
            await asyncio.shield(state.ready)
        except BaseException:
            await self.unsubscribe(sub)
            raise
        return sub

    async def _upstream(self, topic: Topic, state: _TopicState) -> None:
        assert self._feed is not None
        try:
            await self._feed.subscribe(topic)
        except BaseException as exc:
            if self._topics.get(topic) is state:  # nobody else may join a failed subscription
                del self._topics[topic]
                self._update_idle()
            if isinstance(exc, BrokerError | asyncio.CancelledError):
                raise
            raise BrokerError("subscribe", repr(exc)) from exc

    async def unsubscribe(self, sub: Subscriber) -> None:
        """Remove a subscriber; the topic's last subscriber also drops the upstream subscription."""
        sub.frames.clear()
        state = self._topics.get(sub.topic)
        if state is None or sub not in state.subscribers:
            self._update_idle()
            return
        state.subscribers.discard(sub)
        if not state.subscribers:
            del self._topics[sub.topic]
            self._update_idle()
            if self._feed is not None:
                await self._feed.unsubscribe(sub.topic)

    def _update_idle(self) -> None:
        if not self._topics:
            self._idle.set()

    def _deliver(self, topic: Topic, event: StreamEvent) -> None:
        state = self._topics.get(topic)
        if state is None:
            return
        held = state.held
        if held is not None:
            held.append(event)
            if len(held) > 4 * self.queue_size:  # a fill this far behind would only end them as slow
                self._reset(topic, state, "held events overflowed")
            return
        floor = state.floor
        if floor is not None:
            if event.id <= floor:
                return
            state.floor = None  # one passed: ids only grow, so all later ones do
        self._fan_out(topic, state, event)

    def _fan_out(self, topic: Topic, state: _TopicState, event: StreamEvent) -> None:
        # The hot loop: once per event per subscriber, so it is written out inline.
        state.last_id = event.id
        frame: Frame = (event.id, reading_frame(event), event.ts)
        tag = event.tag
        for sub in state.subscribers:
            if sub.end_reason is not None or (sub.tags is not None and tag not in sub.tags):
                continue
            frames = sub.frames
            if len(frames) >= sub.max_queued:
                self.stats.slow_disconnects += 1
                logger.warning("stream on %s ended: queue of %d frames full", topic, sub.max_queued)
                sub.end("slow")
                continue
            frames.append(frame)
            waiter = sub.waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _on_gap(self) -> None:
        # Called by the feed right after it reconnected and resent its subscriptions, before it
        # reads again: from here on, live events wait until history has filled the gap.
        for state in self._topics.values():
            if state.held is None:
                state.held = []
        if self._filler is not None:
            self._filler.cancel()  # it would start from the same last ids; this one waits for the new connection
        self._filler = asyncio.create_task(self._fill_all(), name="hub-gap-fill")
        self._filler.add_done_callback(_retrieve)

    async def _fill_all(self) -> None:
        topics = list(self._topics.items())
        logger.info("live feed back: filling the gap of %d topics from history", len(topics))
        # Each topic on its own (one slow or failing well holds back no other), 32 at a time.
        slots = asyncio.Semaphore(32)
        await asyncio.gather(*(self._fill(topic, state, slots) for topic, state in topics))
        logger.info("gap filled: streams are live again")

    async def _fill(self, topic: Topic, state: _TopicState, slots: asyncio.Semaphore) -> None:
        assert self._feed is not None
        backoff = Backoff(first_s=0.1, cap_s=2.0)
        while self._topics.get(topic) is state and state.held is not None:
            try:
                await self._feed.confirmed(topic)  # after this, history covers everything not held
                async with slots:
                    await self._replay_gap(topic, state)
                return
            except BrokerError as exc:
                if not self._feed.connected:
                    return  # the next reconnect starts a new fill
                delay = backoff.next()
                if backoff.failures >= 5:  # Redis answers, but not for this well: its streams resume instead
                    self._reset(topic, state, f"gap fill failed {backoff.failures} times: {exc}")
                    return
                logger.warning("gap fill of %s failed, retrying: %s", topic, exc)
                await asyncio.sleep(delay)
            except Exception:  # a bug must not leave the topic held for ever: its streams resume instead
                logger.exception("gap fill of %s failed", topic)
                self._reset(topic, state, "gap fill failed")
                return

    async def _replay_gap(self, topic: Topic, state: _TopicState) -> None:
        cursor = state.last_id
        if cursor is None:  # nothing went live on this topic yet: start where its streams' catch-up ended
            positions = [sub.skip_through for sub in state.subscribers if sub.skip_through is not None]
            cursor = min(positions, default=None)
        while cursor is not None and state.held is not None:
            found = await self._log.history(topic, cursor, self.replay_page)
            if state.held is None or self._topics.get(topic) is not state:
                return
            if found.truncated:
                self._reset(topic, state, "history no longer covers the gap")
                return
            for event in found.events:
                self._fan_out(topic, state, event)
            self.stats.gap_events += len(found.events)
            cursor = found.cursor
            if not found.more:
                break
        held, state.held = state.held or [], None
        newest = state.last_id
        for event in sorted(held, key=lambda e: e.id):
            if newest is None or event.id > newest:
                self._fan_out(topic, state, event)
                newest = event.id
        state.floor = newest

    def _reset(self, topic: Topic, state: _TopicState, why: str) -> None:
        # The streams resume by Last-Event-ID and get a reset + snapshot if history is gone.
        logger.warning("streams on %s ended: %s", topic, why)
        state.held = None
        state.floor = None
        for sub in state.subscribers:
            sub.end("upstream-gap")

    def drain(self) -> None:
        """Tell every stream to say goodbye (with a retry hint) and end."""
        self.draining = True
        self._end_all("drain")

    def abort(self) -> None:
        """End every stream now, interrupting sends that are stuck (the end of a shutdown grace)."""
        self._end_all("shutdown")

    def _end_all(self, reason: str) -> None:
        for state in self._topics.values():
            for sub in state.subscribers:
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
            await asyncio.sleep(interval)
            now, wall = loop.time(), time.time()
            for state in list(self._topics.values()):
                for sub in list(state.subscribers):
                    if sub.expires_at is not None and wall >= sub.expires_at:
                        sub.end("auth-expired")
                    elif now >= sub.retire_at:
                        sub.end("max-age")
                    self._check(sub, now)

    def _check(self, sub: Subscriber, now: float) -> None:
        if sub.sending_since and now - sub.sending_since > self.send_timeout_s:
            self.stats.send_timeouts += 1
            logger.warning("stream on %s ended: send stuck for %.1f s", sub.topic, now - sub.sending_since)
            sub.end("send-timeout")
        elif now - sub.last_send >= self.heartbeat_s and not sub.heartbeat_due:
            sub.heartbeat_due = True
            sub.wake()
