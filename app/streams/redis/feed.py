"""The process's one Pub/Sub connection to Redis: the live feed behind the gateway's hub."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from redis.asyncio.client import Redis
from redis.asyncio.connection import Connection

from app.backoff import Backoff
from app.errors import BrokerError
from app.streams.codec import MalformedValues, decode_event, shown
from app.streams.redis.client import redis_errors
from app.streams.redis.keys import channel_name
from app.streams.seams import Deliver

logger = logging.getLogger(__name__)


def _release(waiters: deque[asyncio.Future[None]], _: asyncio.Future[None]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)


class RedisFeed:
    """The process's one Pub/Sub connection: one reader task, one writer task.

    Request tasks never write to the connection: they queue SUBSCRIBE/UNSUBSCRIBE for the
    writer, so a client that disconnects mid-subscribe cannot interrupt a half-written
    command or cancel someone else's confirmation. Every SUBSCRIBE gets exactly one reply, and
    replies are matched to waiters per channel in order; a waiter whose caller went away stays
    in line (done) so the next reply goes to the right one.

    A subscribe returns only after Redis confirmed it, which is what lets a stream read history
    after subscribing and know that no live event fell in between. When the connection drops
    (or stops answering pings), the feed reconnects with jittered backoff and resubscribes;
    events published meanwhile were not on the wire, so `on_gap` tells the hub, which awaits
    `confirmed(tenant)` and then fills the gap from history.
    """

    def __init__(
        self,
        client: Redis,
        deliver: Deliver,
        on_close: Callable[[RedisFeed], None],
        malformed: MalformedValues,
        on_gap: Callable[[], None] | None = None,
        ping_interval_s: float = 5.0,
    ) -> None:
        self._client = client
        self._deliver = deliver
        self._on_close = on_close
        self._malformed = malformed
        self.on_gap = on_gap
        self._ping_interval_s = ping_interval_s
        self._topics: dict[bytes, str] = {}  # channel -> tenant
        self._pending: dict[bytes, deque[asyncio.Future[None]]] = {}
        self._commands: asyncio.Queue[tuple[int, bytes, bytes]] = asyncio.Queue()  # (generation, command, arg)
        self._generation = 0  # one per connection
        self._conn: Connection | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._connected = asyncio.Event()
        self._confirmations: dict[bytes, asyncio.Future[None]] = {}
        self._closing = False
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def start(self) -> None:
        await self._connect()
        self._tasks = [
            asyncio.create_task(self._read_forever(), name="redis-feed-reader"),
            asyncio.create_task(self._write_forever(), name="redis-feed-writer"),
        ]

    async def _connect(self) -> None:
        conn: Connection = self._client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            with redis_errors("connect pubsub"):
                await conn.connect()  # type: ignore[no-untyped-call]
                # Commands queued for the old connection are covered by this resubscribe (or,
                # for UNSUBSCRIBE, by not resubscribing): the writer drops them, so no stray
                # reply can confirm a later subscriber early.
                self._generation += 1
                self._realign_waiters()  # also with no topics: stale waiters must not stay in line
                if self._topics:
                    await conn.send_command("SUBSCRIBE", *self._topics)
        except BaseException:
            await conn.disconnect()
            raise
        self._conn = conn
        self._connected.set()

    def _realign_waiters(self) -> None:
        # Commands sent before the drop will never be answered: one resubscribe reply per
        # channel now stands for all of them, and for the hub's gap fill (`confirmed`).
        loop = asyncio.get_running_loop()
        for channel in list(self._pending):
            if channel not in self._topics:
                for waiter in self._pending.pop(channel):
                    if not waiter.done():
                        waiter.set_result(None)
        self._confirmations = {}
        for channel in self._topics:
            joined: asyncio.Future[None] = loop.create_future()
            confirmation: asyncio.Future[None] = loop.create_future()
            waiters = self._pending.pop(channel, deque())
            waiters.append(confirmation)
            joined.add_done_callback(functools.partial(_release, waiters))
            self._pending[channel] = deque([joined])
            self._confirmations[channel] = confirmation

    async def confirmed(self, tenant: str) -> None:
        """Returns once the tenant's subscription is confirmed on the current connection.

        Raises BrokerError if the connection drops first (the next gap fill starts over).
        """
        future = self._confirmations.get(channel_name(tenant).encode())
        if future is not None:
            await asyncio.shield(future)

    async def subscribe(self, tenant: str) -> None:
        channel = channel_name(tenant).encode()
        self._topics[channel] = tenant
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(channel, deque()).append(waiter)
        self._commands.put_nowait((self._generation, b"SUBSCRIBE", channel))
        await waiter

    async def unsubscribe(self, tenant: str) -> None:
        channel = channel_name(tenant).encode()
        if self._topics.pop(channel, None) is not None:
            self._commands.put_nowait((self._generation, b"UNSUBSCRIBE", channel))

    async def restart(self, why: str) -> None:
        # Closing the socket under the reader breaks its read: it reconnects, resubscribes every
        # topic and calls on_gap, the same path as a connection Redis dropped.
        conn = self._conn
        if conn is not None and self._connected.is_set():
            logger.warning("redis pubsub connection restarted: %s", why)
            await conn.disconnect()

    async def _write_forever(self) -> None:
        while not self._closing:  # redis-py may swallow our cancel inside send_command
            generation, *command = await self._commands.get()
            await self._connected.wait()
            if generation != self._generation:
                continue  # queued for a connection that is gone: the reconnect covered it
            assert self._conn is not None
            try:
                await self._conn.send_command(*[part for part in command if part])
            except Exception as exc:  # redis-py raises AttributeError, not ConnectionError, on a closed socket
                # The reader notices the broken connection; reconnecting resubscribes what is wanted.
                logger.debug("pubsub command %s not sent: %s", command[0], exc)

    async def _read_forever(self) -> None:
        # Jittered: a fleet of gateways must not hit a restarted Redis in step.
        backoff = Backoff(first_s=0.1, cap_s=5.0)
        while not self._closing:
            try:
                await self._read_until_broken()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closing:  # redis-py may turn our cancel into a connection error
                    return
                logger.warning("redis pubsub connection lost: %s", exc)
            self._connected.clear()
            self._fail_confirmations()
            if self._conn is not None:
                await self._conn.disconnect()
            backoff.reset()
            while True:
                await asyncio.sleep(backoff.next())
                try:
                    await self._connect()
                    break
                except (BrokerError, TimeoutError) as exc:
                    logger.warning("redis pubsub reconnect failed: %s", exc or "timed out")
            self.reconnects += 1
            logger.info("redis pubsub reconnected, %d channels resubscribed", len(self._topics))
            if self.on_gap is not None:
                self.on_gap()

    def _fail_confirmations(self) -> None:
        for future in self._confirmations.values():
            if not future.done():
                future.set_exception(BrokerError("resubscribe", "connection lost again"))
                future.exception()  # retrieved here: nobody may be waiting on it
        self._confirmations = {}

    async def _read_until_broken(self) -> None:
        conn = self._conn
        assert conn is not None
        pinger = asyncio.create_task(self._ping())
        try:
            while True:
                # Pongs arrive every ping interval, so silence for three of them means a frozen peer.
                response = await conn.read_response(timeout=self._ping_interval_s * 3, push_request=True)
                if response is None:  # redis-py's answer to a timeout we asked for
                    raise TimeoutError(f"no answer to pings for {self._ping_interval_s * 3:.1f} s")
                self._handle(response)
        finally:
            pinger.cancel()

    async def _ping(self) -> None:
        while True:
            await asyncio.sleep(self._ping_interval_s)
            self._commands.put_nowait((self._generation, b"PING", b""))

    def _handle(self, response: Any) -> None:
        kind = response[0]
        if kind == b"message":
            tenant = self._topics.get(response[1])
            if tenant is None:
                return
            raw_id, _, data = response[2].partition(b" ")
            try:
                event = decode_event(raw_id, data, tenant)  # any well of the channel's tenant, none of another's
            except ValueError as exc:
                self._malformed.skip("live", f"{response[1].decode()} message {shown(raw_id)}", exc)
                return
            self._deliver(tenant, event)
        elif kind == b"subscribe":
            waiters = self._pending.get(response[1])
            if not waiters:
                return
            waiter = waiters.popleft()
            if not waiters:
                del self._pending[response[1]]
            if not waiter.done():
                waiter.set_result(None)

    async def aclose(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._conn is not None:
            await self._conn.disconnect()
        for waiters in self._pending.values():
            for waiter in waiters:
                waiter.cancel()
        self._pending.clear()
        self._fail_confirmations()
        self._topics.clear()
        self._on_close(self)
