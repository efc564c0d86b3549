"""The ASGI response for one SSE connection: catch up (snapshot or replay), then live.

Why not sse-starlette's EventSourceResponse here: it runs a four-task group per connection
and a timer per ping; the benchmark's sse-starlette baseline holds 82 KiB per stream where
this holds 16-27 KiB (docs/performance.md). This writes pre-built frame bytes straight to
ASGI `send`: the request's task only watches for the disconnect, one writer task per stream
does the rest, and the hub's one sweeper provides heartbeats and send timeouts.

Ordering guarantee (no gap, no duplicate): the hub subscription is confirmed *before*
history or the snapshot is read, so every event newer than what the catch-up sent is in the
queue; queued frames with ids at or below the catch-up cursor are skipped.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator

from starlette.types import Message, Receive, Scope, Send

from app.auth.admission import Lease
from app.auth.audit import audit
from app.errors import BrokerError
from app.gateway.hub import Hub, Subscriber
from app.gateway.sse import (
    auth_expired_frame,
    goodbye_frame,
    heartbeat_frame,
    reading_frame,
    reset_frame,
    retry_frame,
    snapshot_frame,
)
from app.models import Principal, Snapshot, StreamId, Topic
from app.settings import HistorySettings, StreamSettings
from app.streams.seams import StreamLog

logger = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT_S = 5.0
GOODBYES = {
    "drain": "server shutting down",
    "upstream-gap": "live feed interrupted, resume from history",
    "max-age": "stream reached its maximum age, resume (on any gateway)",
}

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class EventStream:
    """One stream of one well. Create per request, after auth and validation have passed."""

    def __init__(
        self,
        hub: Hub,
        log: StreamLog,
        topic: Topic,
        last_id: StreamId | None,
        tags: frozenset[str] | None,
        stream: StreamSettings,
        history: HistorySettings,
        principal: Principal | None = None,
        lease: Lease | None = None,
    ) -> None:
        self.principal = principal
        self.lease = lease
        self.hub = hub
        self.log = log
        self.topic = topic
        self.last_id = last_id
        self.tags = tags
        self.stream = stream
        self.history = history
        self.events_sent = 0
        self.end_reason = "client-closed"
        self._disconnected = False
        self._started = False
        self._sub: Subscriber | None = None
        self._watching = False
        self._abandoned = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The request's own task only watches for the disconnect; the stream is written by a
        # task of its own. Its wake-ups then resume four coroutine frames instead of the dozen
        # of the server, Starlette's middleware and routing that this task sits under, which
        # is most of the per-event cost at 100,000 events/s (docs/performance.md).
        task = asyncio.current_task()
        assert task is not None
        opened = time.monotonic()
        writer = asyncio.create_task(self._write(send), name=f"sse {self.topic}")
        writer.add_done_callback(lambda _: task.cancel() if self._watching else None)
        self._watching = True
        try:
            while not writer.done():
                message: Message = await receive()
                if message["type"] == "http.disconnect":
                    self._disconnected = True
                    if self._sub is not None:
                        self._sub.end("client-closed")
                    writer.cancel()
                    break
        except asyncio.CancelledError:
            if not writer.done():  # the server cancels this request: take the writer along
                self._abandoned = True
                writer.cancel()
                raise
            task.uncancel()  # the writer finished and woke us from receive()
        finally:
            self._watching = False
        try:
            await writer
        finally:
            if self._started:
                self.hub.stats.streams_closed[self.end_reason] += 1
            if self.lease is not None:
                await self.lease.release()
            principal = self.principal
            audit(
                "disconnect",
                sub=principal.subject if principal else None,
                tenant=self.topic.tenant,
                well=self.topic.well,
                reason=self.end_reason,
                duration_s=round(time.monotonic() - opened, 3),
                events_sent=self.events_sent,
            )

    async def _write(self, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            try:
                async with asyncio.timeout(SUBSCRIBE_TIMEOUT_S):
                    expires_at = self.principal.expires_at if self.principal else None
                    self._sub = await self.hub.subscribe(self.topic, self.tags, expires_at)
            except TimeoutError:
                raise BrokerError("subscribe", f"no confirmation within {SUBSCRIBE_TIMEOUT_S} s") from None
            if self._disconnected:
                self._sub.end("client-closed")  # a cancel may have been swallowed on the way
            await self._run(self._sub, send)
        except BrokerError as exc:
            logger.warning("stream on %s failed: %s", self.topic, exc)
            self.end_reason = "broker-error"
            await self._fail(send)
        except asyncio.CancelledError:
            sub = self._sub
            # Only a cancel for a reason we know (client gone, stuck send, request abandoned) is quiet.
            if not (self._disconnected or self._abandoned or (sub is not None and sub.cancelled)):
                raise
            task.uncancel()
            self.end_reason = sub.end_reason if sub is not None and sub.end_reason else "client-closed"
        finally:
            if self._sub is not None:
                await self.hub.unsubscribe(self._sub)

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
        await self._live(sub, send)

    async def _start(self, send: Send, chunk: bytes) -> bytes:
        """Sends the response head once; the first chunk then gets the retry: line in front."""
        if self._started:
            return chunk
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        self._started = True
        self.hub.stats.streams_opened += 1
        return retry_frame(self.stream.retry_ms) + chunk

    async def _catch_up(self, sub: Subscriber) -> AsyncIterator[bytes]:
        stats = self.hub.stats
        if self.last_id is None:
            stats.snapshots += 1
            yield await self._snapshot(sub)
            return
        stats.replays += 1
        cursor = self.last_id
        while not sub.end_reason:
            found = await self.log.history(self.topic, cursor, self.history.replay_page)
            if found.truncated:  # on any page: a slow replay can be overtaken by trimming
                stats.resets += 1
                yield reset_frame(self.topic, cursor) + await self._snapshot(sub)
                return
            cursor = found.cursor
            frames = [reading_frame(e) for e in found.events if self.tags is None or e.tag in self.tags]
            self.events_sent += len(frames)
            sub.skip_through = cursor
            yield b"".join(frames)
            if not found.more:
                return

    async def _snapshot(self, sub: Subscriber) -> bytes:
        snapshot = await self.log.snapshot(self.topic)
        if self.tags is not None:
            kept = {tag: data for tag, data in snapshot.readings.items() if tag in self.tags}
            snapshot = Snapshot(snapshot.topic, snapshot.last_id, kept)
        sub.skip_through = snapshot.last_id
        return snapshot_frame(snapshot)

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
            device_ts = sub.frames[0][2] if sub.frames else 0.0
            chunks = sub.take()
            self.events_sent += len(chunks)
            stats.events_sent += len(chunks)
            if sub.heartbeat_due:
                sub.heartbeat_due = False
                if not chunks:
                    chunks = [heartbeat_frame()]
            if chunks:
                body = b"".join(chunks)
                stats.bytes_sent += len(body)
                sub.sending_since = now = loop.time()
                await send({"type": "http.response.body", "body": body, "more_body": True})
                sub.sending_since = 0.0
                sub.last_send = now
                if device_ts:
                    latency.observe(time.time() - device_ts)
        self.end_reason = sub.end_reason or "ended"
        if sub.end_reason == "client-closed":
            return
        if sub.end_reason == "auth-expired":
            # The dashboard fetches a fresh ticket and resumes from the id it has.
            await self._send(sub, send, auth_expired_frame(self.topic))
        if sub.end_reason in GOODBYES:
            # Many streams end at once here: spread their returns so they do not come back as one storm.
            spread = self.stream.shutdown_retry_spread_ms
            retry = self.stream.retry_ms + random.randint(0, spread)
            await self._send(sub, send, goodbye_frame(retry, GOODBYES[sub.end_reason]))
        await self._send(sub, send, b"", more_body=False)

    async def _send(self, sub: Subscriber, send: Send, data: bytes, more_body: bool = True) -> None:
        # sending_since lets the hub's sweeper interrupt a send to a peer that stopped reading.
        loop = asyncio.get_running_loop()
        sub.sending_since = loop.time()
        await send({"type": "http.response.body", "body": data, "more_body": more_body})
        sub.sending_since = 0.0
        sub.last_send = loop.time()
