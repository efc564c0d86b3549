"""The hub: one live feed per gateway process, fanned out to every open stream.

Per live event the hub does O(1) work plus one list append per subscriber: the frame bytes
are built once and the same `Frame` tuple goes to every subscriber of the topic. A subscriber
never blocks the hub: when its queue is full it is ended (and counted), and its client
resumes from history by Last-Event-ID.

Timers are not per connection: one sweeper marks heartbeats due and ends streams whose send
has been stuck longer than the send timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from app.errors import BrokerError
from app.models import StreamEvent, StreamId, Topic
from app.streams.broker import Broker, LiveFeed
from app.streams.sse import reading_frame

logger = logging.getLogger(__name__)

Frame = tuple[StreamId, bytes]


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
        "sending_since",
        "skip_through",
        "tags",
        "task",
        "topic",
        "waiter",
    )

    def __init__(
        self, topic: Topic, tags: frozenset[str] | None, max_queued: int, now: float, expires_at: float | None
    ) -> None:
        self.topic = topic
        self.expires_at = expires_at
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
            return [data for _, data in frames]
        out = [data for stream_id, data in frames if stream_id > skip]
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
        """Ask the stream to end. 'drain' ends it cleanly; anything else also interrupts a stuck send."""
        if self.end_reason is None:
            self.end_reason = reason
        if reason != "drain" and self.sending_since and self.task is not None and not self.cancelled:
            self.cancelled = True
            self.task.cancel()
        self.wake()

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


@dataclass
class HubStats:
    slow_disconnects: int = 0
    send_timeouts: int = 0


@dataclass
class _TopicState:
    subscribers: set[Subscriber] = field(default_factory=set)
    ready: asyncio.Task[None] | None = None


class Hub:
    """Reference-counted topic subscriptions on one shared live feed.

    Args:
        broker: where the live feed comes from.
        queue_size: frames a subscriber may have queued before it is ended as slow.
        heartbeat_s: a stream that sent nothing for this long gets a heartbeat.
        send_timeout_s: a send stuck this long ends the stream (a peer that stopped reading).
    """

    def __init__(self, broker: Broker, queue_size: int = 1024, heartbeat_s: float = 15, send_timeout_s: float = 10):
        self._broker = broker
        self.queue_size = queue_size
        self.heartbeat_s = heartbeat_s
        self.send_timeout_s = send_timeout_s
        self._topics: dict[Topic, _TopicState] = {}
        self._feed: LiveFeed | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.stats = HubStats()
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self) -> None:
        self._feed = await self._broker.open_feed(self._deliver)
        if hasattr(self._feed, "on_gap"):
            self._feed.on_gap = self._on_gap
        self._sweeper = asyncio.create_task(self._sweep(), name="hub-sweeper")

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._feed is not None:
            await self._feed.aclose()

    @property
    def open_streams(self) -> int:
        return sum(len(state.subscribers) for state in self._topics.values())

    @property
    def topics(self) -> int:
        return len(self._topics)

    async def subscribe(
        self, topic: Topic, tags: frozenset[str] | None = None, expires_at: float | None = None
    ) -> Subscriber:
        """Register the current task as a subscriber; returns once live delivery is guaranteed.

        `expires_at` (epoch seconds): the stream is ended with reason "auth-expired" then.

        Raises BrokerError when the upstream subscription fails. The upstream subscribe runs in
        a task owned by the hub: one caller going away cannot fail the others waiting on it.
        """
        assert self._feed is not None, "hub not started"
        sub = Subscriber(topic, tags, self.queue_size, asyncio.get_running_loop().time(), expires_at)
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
        # The hot loop: once per event per subscriber, so it is written out inline.
        state = self._topics.get(topic)
        if state is None:
            return
        frame: Frame = (event.id, reading_frame(event))
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
        # Live events were missed while the feed was down; every stream resumes from history.
        self._end_all("upstream-gap")

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
                    self._check(sub, now)

    def _check(self, sub: Subscriber, now: float) -> None:
        if sub.sending_since and now - sub.sending_since > self.send_timeout_s:
            self.stats.send_timeouts += 1
            logger.warning("stream on %s ended: send stuck for %.1f s", sub.topic, now - sub.sending_since)
            sub.end("send-timeout")
        elif now - sub.last_send >= self.heartbeat_s and not sub.heartbeat_due:
            sub.heartbeat_due = True
            sub.wake()
