"""One open stream as the hub sees it: its queue of frames and its send bookkeeping.

The queue has two parties: the hub appends frames (and wakes the waiter) on the hot path, the
stream's writer takes them. Every other field is written only by this class's methods: the
writer reports its sends (`sending`, `sent`) and its catch-up (`caught_up`), the hub's sweeper
asks `sweep()`, and anyone may `end()` the stream. Nothing here cancels a task on its own:
ending a stream whose send is stuck calls the `interrupt` its owner gave it.

Two checks keep a stream from being open and silent. One looks at the queue: a frame that
waited unsent past `stall_s` ("stalled"). The other does not trust the queue: the hub says
when the stream's wells last published, and a publish that no completed send has covered
within `stall_s` ends the stream ("silent"), whatever kept the frame from the queue.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import NamedTuple

from app.models import StreamId

# Ends that let a send in progress finish, so the goodbye with its retry hint still goes out.
GENTLE = frozenset({"drain", "max-age"})


class Frame(NamedTuple):
    """A live event as queued: built once, the same object for every subscriber it goes to."""

    id: StreamId
    data: bytes  # the SSE bytes
    device_ts: float  # the reading's device time, epoch seconds (0: unknown), for the latency histogram
    queued_at: float  # loop time it was fanned out: a frame that waits too long means a silent stream
    well: str
    tag: str


class Subscriber:
    """One open stream's queue and bookkeeping. See the module docstring for who writes what."""

    __slots__ = (
        "_ended_at",
        "_heartbeat_due",
        "_interrupt",
        "_last_send",
        "_live_from",
        "_sending_since",
        "_skip_through",
        "_taken_through",
        "_uncovered_since",
        "delivered_through",
        "end_reason",
        "expires_at",
        "frames",
        "grace_s",
        "max_queued",
        "retire_at",
        "tags",
        "tenant",
        "waiter",
        "wells",
    )

    def __init__(
        self,
        tenant: str,
        wells: frozenset[str] | None,
        tags: frozenset[str] | None,
        max_queued: int,
        now: float,
        expires_at: float | None = None,
        retire_at: float = math.inf,
        interrupt: Callable[[], object] | None = None,
        grace_s: float = 0.0,
    ) -> None:
        self.tenant = tenant
        self.wells = wells  # None: every well of the tenant, including wells registered later
        self.tags = tags
        self.max_queued = max_queued
        self.expires_at = expires_at  # epoch seconds: the token's expiry
        self.retire_at = retire_at  # loop time: the stream's maximum age
        self.frames: list[Frame] = []  # a list, not a deque: an empty deque costs 600 bytes a stream
        self.waiter: asyncio.Future[None] | None = None
        self.end_reason: str | None = None
        self._interrupt = interrupt
        self._skip_through: StreamId | None = None
        self._heartbeat_due = False
        self._last_send = now
        self._sending_since = 0.0
        self._ended_at = 0.0
        # Fan-out times (Frame.queued_at): every frame queued up to `delivered_through` has gone
        # out (or was covered by the catch-up); `_taken_through` is the newest taken, going out
        # with the send. time.monotonic(), the fan-out's clock, not the loop's: uvloop's loop time
        # is cut to the millisecond, and a stream opened just after a publish of its quiet well
        # would count that publish as never delivered.
        self.delivered_through = self._taken_through = time.monotonic()
        self._uncovered_since = 0.0  # a publish the sweeper saw after delivered_through, until covered
        # Monotonic time (Frame.queued_at's clock) from which the writer can send what is queued:
        # 0 for a stream that sends from the start, inf while a catch-up reads (see catching_up).
        self._live_from = 0.0
        self.grace_s = grace_s  # how long this stream may hold a reading back on purpose (conflation)

    # The writer's side.

    def take(self) -> tuple[list[bytes], float, bool]:
        """Everything queued (minus frames a catch-up already sent), the oldest one's device time,
        and whether a heartbeat fell due (sent only when nothing else goes out)."""
        frames, self.frames = self.frames, []
        heartbeat, self._heartbeat_due = self._heartbeat_due, False
        if not frames:
            return [], 0.0, heartbeat
        self._taken_through = frames[-1][3]
        skip = self._skip_through
        # Unpacked, not by field name: this runs once per event per stream.
        if skip is None:
            chunks = [frame[1] for frame in frames]
        else:
            chunks = [frame[1] for frame in frames if frame[0] > skip]
            if chunks:
                self._skip_through = None  # ids only grow: once one passes, all later ones do
            else:
                self.delivered_through = self._taken_through  # the catch-up sent them all
        return chunks, frames[0][2], heartbeat

    def take_frames(self) -> tuple[list[Frame], bool]:
        """Like `take`, but the frames themselves (a conflating writer keys them by well and tag)."""
        frames, self.frames = self.frames, []
        heartbeat, self._heartbeat_due = self._heartbeat_due, False
        if frames:
            self._taken_through = frames[-1].queued_at
        skip = self._skip_through
        if skip is not None:
            frames = [frame for frame in frames if frame.id > skip]
            if frames:
                self._skip_through = None
            else:
                self.delivered_through = self._taken_through  # the catch-up sent them all
        return frames, heartbeat

    async def wait(self, timeout_s: float | None = None) -> None:
        """Until something is queued, a heartbeat is due, the stream must end, or `timeout_s` passed."""
        if self.frames or self._heartbeat_due or self.end_reason:
            return
        loop = asyncio.get_running_loop()
        waiter = self.waiter = loop.create_future()
        timer = loop.call_later(timeout_s, _resolve, waiter) if timeout_s is not None else None
        try:
            await waiter
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()

    def catching_up(self) -> None:
        """A catch-up read (the snapshot, a page of replay) starts: until it answers, what queues
        or publishes meanwhile is not held against this stream.

        The writer cannot send before the read answers, and a stream's 200 goes out with its first
        chunk, so its client is not looking at an open, silent stream; each read is bounded by the
        broker's own timeouts (a 503 before the 200, else the stream ends). Counting that wait ended
        streams admitted under load, whose snapshot read waited past `stall_s` for a pooled Redis
        connection, as "stalled" right after their 200 and snapshot (docs/performance.md).
        """
        self._live_from = math.inf

    def caught_up(self, cursor: StreamId) -> None:
        """The catch-up sent everything up to `cursor`: queued frames up to it are not sent again."""
        self._skip_through = cursor
        self._live_from = time.monotonic()

    def sending(self, now: float) -> None:
        self._sending_since = now

    def sent(self, now: float) -> None:
        self._sending_since = 0.0
        self._ended_at = 0.0
        self._last_send = now
        self.delivered_through = self._taken_through

    @property
    def caught_up_to(self) -> StreamId | None:
        """Where the catch-up ended, until a live frame passed it (read by the gap fill)."""
        return self._skip_through

    # The hub's side.

    def sweep(
        self,
        now: float,
        wall: float,
        heartbeat_s: float,
        send_timeout_s: float,
        stall_s: float,
        published_at: float = 0.0,
    ) -> str | None:
        """The sweeper's look at this stream: the reason it must end now, if any; marks a heartbeat due.

        `published_at`: when the hub last fanned out a reading of this stream's wells (0: unknown,
        as for a stream of some tags only, which its wells' other tags would not reach).

        The invariant it keeps: an open stream delivers every reading of its wells, or it is
        ended (with a retry hint) within `stall_s` of the first reading it failed to send, and a
        stream asked to end that has not finished within `send_timeout_s` is broken off.
        """
        if self.end_reason is not None:
            if self._ended_at and now - self._ended_at > send_timeout_s:
                self._break_off()
            return None
        if self.expires_at is not None and wall >= self.expires_at:
            return "auth-expired"
        if now >= self.retire_at:
            return "max-age"
        if self._sending_since and now - self._sending_since > send_timeout_s:
            return "send-timeout"
        if self.waiting_for(now) > stall_s:
            return "stalled"
        if published_at > self.delivered_through:
            # The sweeper sees only each well's latest publish, so it keeps the first one it saw
            # uncovered: at most one sweep later than the publish that was really missed.
            if self._uncovered_since <= self.delivered_through:
                self._uncovered_since = published_at
            elif self.silent_for(now) > stall_s + self.grace_s:
                return "silent"
        if now - self._last_send >= heartbeat_s and not self._heartbeat_due:
            self._heartbeat_due = True
            self.wake()
        return None

    def stuck_for(self, now: float) -> float:
        return now - self._sending_since if self._sending_since else 0.0

    def silent_for(self, now: float) -> float:
        """How long since its wells published a reading that no completed send has covered (as the
        sweeper saw it), counted as `waiting_for` is."""
        since = self._uncovered_since
        return now - max(since, self._live_from) if since > self.delivered_through else 0.0

    def waiting_for(self, now: float) -> float:
        """How long the oldest reading queued for this stream has waited to be sent, counted from when
        the writer could send it: never more than since the catch-up answered (none while it reads)."""
        frames = self.frames
        return now - max(frames[0][3], self._live_from) if frames else 0.0

    def end(self, reason: str, now: float = 0.0) -> None:
        """Ask the stream to end. 'drain' and 'max-age' end it cleanly, after the send in progress;
        anything else also interrupts a stuck send."""
        if self.end_reason is None:
            self.end_reason = reason
            self._ended_at = now or time.monotonic()
        if reason not in GENTLE and self._sending_since:
            self._break_off()
        self.wake()

    def _break_off(self) -> None:
        if self._interrupt is not None:
            interrupt, self._interrupt = self._interrupt, None
            interrupt()

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
