"""The ASGI response for one SSE connection: catch up (snapshot or replay), then live.

Why not sse-starlette's EventSourceResponse here: it runs a four-task group per connection
and a timer per ping; the benchmark's sse-starlette baseline holds 82 KiB per stream where
this holds 16-27 KiB (docs/performance.md). This writes pre-built frame bytes straight to
ASGI `send`: one writer task per stream does it, one watcher task waits for the client to
go away, the request's own task only waits for the first of the two to finish, and the hub's
one sweeper provides heartbeats and send timeouts.

Ordering guarantee (no gap, no duplicate): the hub subscription is confirmed *before*
history or the snapshot is read, so every event newer than what the catch-up sent is in the
queue; queued frames with ids at or below the catch-up cursor are skipped.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from starlette.types import Receive, Scope, Send

from app.auth.admission import Lease
from app.auth.audit import audit
from app.auth.revocation import RevocationWatcher
from app.errors import BrokerError
from app.gateway.hub import Hub
from app.gateway.replay import HistoryMerge
from app.gateway.sse import (
    HEARTBEAT_EVENT,
    auth_expired_frame,
    goodbye_frame,
    heartbeat_frame,
    reading_frame,
    reset_frame,
    retry_frame,
    snapshot_frame,
)
from app.gateway.subscriber import Frame, Subscriber
from app.models import Principal, Selection, Snapshot, StreamId, Topic
from app.settings import HistorySettings, StreamSettings
from app.streams.seams import StreamLog

logger = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT_S = 5.0
GOODBYES = {
    "drain": "server shutting down",
    "stalled": "stream stalled, resume (on any gateway)",
    "silent": "stream stalled, resume (on any gateway)",
    "upstream-gap": "live feed interrupted, resume from history",
    "max-age": "stream reached its maximum age, resume (on any gateway)",
}

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


@dataclass(eq=False)
class EventStream:
    """One stream of a selection of wells. Create per request, after auth and validation have passed.

    It owns its two tasks: the writer (subscribe, catch up, live, goodbye) and the watcher
    (the client's disconnect). Whichever ends first ends the other, as in a task group; the
    only other way a send is broken off is the subscriber's `interrupt`, which is the
    writer's own cancel, handed to the hub for a stream stuck on a peer that stopped reading.
    """

    hub: Hub
    log: StreamLog
    selection: Selection
    last_id: StreamId | None
    stream: StreamSettings
    history: HistorySettings
    principal: Principal | None = None
    lease: Lease | None = None
    revocations: RevocationWatcher | None = None
    events_sent: int = field(default=0, init=False)
    end_reason: str = field(default="client-closed", init=False)
    _started: bool = field(default=False, init=False)
    _sub: Subscriber | None = field(default=None, init=False)
    _writer: asyncio.Task[None] | None = field(default=None, init=False)

    @property
    def _heartbeat(self) -> bytes:
        # A stream of many wells says it is alive in an event a browser can see: its page tells a
        # quiet field from a dead connection by it. Per-well streams keep the comment they always had.
        wells = self.selection.wells
        return heartbeat_frame() if wells is not None and len(wells) == 1 else HEARTBEAT_EVENT

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        opened = time.monotonic()
        # The writer is a task of its own: its wake-ups then resume a few coroutine frames
        # instead of the dozen of the server and Starlette that this request task sits under,
        # which is most of the per-event cost at 100,000 events/s (docs/performance.md).
        writer = self._writer = asyncio.create_task(self._write(send), name=f"sse {self.selection}")
        watcher = asyncio.create_task(self._watch(receive), name=f"sse-watch {self.selection}")
        try:
            await asyncio.wait((writer, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:  # the client went away, the stream ended, or the server cancels this request
            watcher.cancel()
            writer.cancel()  # a no-op once it finished
            await asyncio.gather(writer, watcher, return_exceptions=True)
            if not writer.cancelled() and (failure := writer.exception()) is not None:
                logger.error("stream on %s failed", self.selection, exc_info=failure)
                self.end_reason = "error"
            await self._closed(opened)

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if self._sub is not None:
            self._sub.end("client-closed")

    async def _closed(self, opened: float) -> None:
        sub = self._sub
        if sub is not None and sub.end_reason is not None and self.end_reason == "client-closed":
            self.end_reason = sub.end_reason
        if self._started:
            self.hub.stats.streams_closed[self.end_reason] += 1
        if self.lease is not None:
            await self.lease.release()
        principal = self.principal
        audit(
            "disconnect",
            sub=principal.subject if principal else None,
            **audit_fields(self.selection),
            reason=self.end_reason,
            duration_s=round(time.monotonic() - opened, 3),
            events_sent=self.events_sent,
        )

    async def _write(self, send: Send) -> None:
        untrack: Callable[[], None] = _nothing
        try:
            try:
                async with asyncio.timeout(SUBSCRIBE_TIMEOUT_S):
                    expires_at = self.principal.expires_at if self.principal else None
                    selection = self.selection
                    held_back_s = 1 / selection.max_rate if selection.max_rate is not None else 0.0
                    self._sub = await self.hub.subscribe(
                        selection.tenant, selection.wells, selection.tags, expires_at, self._interrupt, held_back_s
                    )
            except TimeoutError:
                raise BrokerError("subscribe", f"no confirmation within {SUBSCRIBE_TIMEOUT_S} s") from None
            if self.revocations is not None and self.principal is not None:
                untrack = self.revocations.track(self.principal, self._sub.end)
            await self._run(self._sub, send)
        except BrokerError as exc:
            logger.warning("stream on %s failed: %s", self.selection, exc)
            self.end_reason = "broker-error"
            await self._fail(send)
        finally:
            untrack()
            if self._sub is not None:
                await self.hub.unsubscribe(self._sub)

    def _interrupt(self) -> None:
        if self._writer is not None:
            self._writer.cancel()

    async def _fail(self, send: Send) -> None:
        if self._started:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        body = b'{"error":"broker unavailable"}'
        headers = [(b"content-type", b"application/json"), (b"retry-after", b"2"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _run(self, sub: Subscriber, send: Send) -> None:
        async for chunk in self._catch_up(sub):
            await self._send(sub, send, await self._start(send, chunk))
        if first := await self._start(send, b""):  # catch-up ended before it sent anything
            await self._send(sub, send, first)
        if self.selection.max_rate is None:
            await self._live(sub, send)
        else:
            await self._live_conflated(sub, send, 1 / self.selection.max_rate)
        await self._goodbye(sub, send)

    async def _start(self, send: Send, chunk: bytes) -> bytes:
        """Sends the response head once; the first chunk then gets the retry: line in front."""
        if self._started:
            return chunk
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        self._started = True
        self.hub.stats.streams_opened += 1
        return retry_frame(self.stream.retry_ms) + chunk

    async def _catch_up(self, sub: Subscriber) -> AsyncIterator[bytes]:
        sub.catching_up()
        stats = self.hub.stats
        selection = self.selection
        wells = sorted(selection.wells) if selection.wells is not None else None
        # A conflated stream never resumes: it starts over from the newest values (the contract).
        if self.last_id is None or selection.max_rate is not None:
            stats.snapshots += 1
            read = await self.log.read(selection.tenant, wells, None, 0)
            sub.caught_up(read.clock)
            yield self._snapshots(read.clock, {well: state.latest or {} for well, state in read.wells.items()})
            return
        stats.replays += 1
        merge = HistoryMerge(self.log, selection.tenant, wells, self.last_id, self.history.replay_page)
        async for events in merge.pages():
            sub.caught_up(merge.clock)  # everything up to the clock comes from history, above it live
            frames = [reading_frame(e) for e in events if selection.tags is None or e.tag in selection.tags]
            self.events_sent += len(frames)
            yield b"".join(frames)
            sub.catching_up()  # the next page's read: what queues meanwhile waits on it, not on a send
        sub.caught_up(merge.clock)
        if merge.interrupted:  # a slow replay overtaken by trimming: start over from the last id sent
            sub.end("upstream-gap")
        elif merge.truncated:
            stats.resets += 1
            resets = b"".join(
                reset_frame(Topic(selection.tenant, well), self.last_id) for well in sorted(merge.truncated)
            )
            yield resets + self._snapshots(merge.clock, merge.truncated)

    def _snapshots(self, clock: StreamId, latest: dict[str, dict[str, bytes]]) -> bytes:
        """One snapshot event per well, each with the tenant's clock as its id: the point in the
        tenant's order after which everything comes as readings."""
        tags = self.selection.tags
        frames = []
        for well in sorted(latest):
            readings = latest[well] if tags is None else {t: v for t, v in latest[well].items() if t in tags}
            frames.append(snapshot_frame(Snapshot(Topic(self.selection.tenant, well), clock, readings)))
        return b"".join(frames)

    async def _live(self, sub: Subscriber, send: Send) -> None:
        # The per-connection hot loop: _send is written out inline to save a coroutine frame per chunk.
        loop = asyncio.get_running_loop()
        stats = self.hub.stats
        latency = stats.latency
        while not sub.end_reason:
            await sub.wait()
            if sub.end_reason:
                break
            # The oldest frame's device time: one latency sample per send, not per event.
            chunks, device_ts, heartbeat = sub.take()
            self.events_sent += len(chunks)
            stats.events_sent += len(chunks)
            if heartbeat and not chunks:
                chunks = [self._heartbeat]
            if chunks:
                body = b"".join(chunks)
                stats.bytes_sent += len(body)
                now = loop.time()
                sub.sending(now)
                await send({"type": "http.response.body", "body": body, "more_body": True})
                sub.sent(now)
                if device_ts:
                    latency.observe(time.time() - device_ts)

    async def _live_conflated(self, sub: Subscriber, send: Send, interval_s: float) -> None:
        """The newest value per well and tag, at most once per `interval_s` each; the last value
        of a burst is held back until its turn, never dropped (Lightstreamer's MERGE mode)."""
        loop = asyncio.get_running_loop()
        stats = self.hub.stats
        pending: dict[tuple[str, str], Frame] = {}
        sent_at: dict[tuple[str, str], float] = {}
        while not sub.end_reason:
            now = loop.time()
            next_due = min((sent_at[key] + interval_s for key in pending), default=None)
            await sub.wait(None if next_due is None else max(0.0, next_due - now))
            if sub.end_reason:
                break
            frames, heartbeat = sub.take_frames()
            for frame in frames:
                pending[(frame.well, frame.tag)] = frame  # ids only grow: the newest wins
            now = loop.time()
            due = [key for key in pending if now - sent_at.get(key, -math.inf) >= interval_s]
            chunks = [_without_id(pending.pop(key).data) for key in due]
            sent_at.update(dict.fromkeys(due, now))
            stats.events_sent += len(chunks)
            self.events_sent += len(chunks)
            if heartbeat and not chunks:
                chunks = [self._heartbeat]
            if chunks:
                await self._send(sub, send, b"".join(chunks))

    async def _goodbye(self, sub: Subscriber, send: Send) -> None:
        reason = self.end_reason = sub.end_reason or "ended"
        if reason == "client-closed":
            return
        if reason == "auth-expired":
            # The dashboard fetches a fresh ticket and resumes from the id it has.
            await self._send(sub, send, auth_expired_frame(self.selection))
        if reason in GOODBYES:
            # Many streams end at once here: spread their returns so they do not come back as one storm.
            retry = self.stream.retry_ms + random.randint(0, self.stream.shutdown_retry_spread_ms)
            await self._send(sub, send, goodbye_frame(retry, GOODBYES[reason]))
        await self._send(sub, send, b"", more_body=False)

    async def _send(self, sub: Subscriber, send: Send, data: bytes, more_body: bool = True) -> None:
        # Reported to the subscriber, so the hub's sweeper can interrupt a send to a peer that stopped reading.
        loop = asyncio.get_running_loop()
        sub.sending(loop.time())
        await send({"type": "http.response.body", "body": data, "more_body": more_body})
        sub.sent(loop.time())


def audit_fields(selection: Selection) -> dict[str, object]:
    """For audit lines: the tenant, and the `well` of a per-well stream or how many `wells` ("*": all)."""
    wells = selection.wells
    if wells is not None and len(wells) == 1:
        return {"tenant": selection.tenant, "well": next(iter(wells))}
    return {"tenant": selection.tenant, "wells": "*" if wells is None else len(wells)}


def _without_id(frame: bytes) -> bytes:
    """A reading frame without its `id:` line: a conflated stream's position is not resumable."""
    return frame.partition(b"\n")[2]


def _nothing() -> None:
    pass
