"""One sharded Pub/Sub connection to one Redis node: the live feed behind the gateway's hub.

On a standalone Redis it is the whole feed; on Redis Cluster (clusterfeed.py) there is one per
primary that owns a subscribed tenant's slot. Channels are sharded (SSUBSCRIBE, SPUBLISH in the
publish script), so a message goes to the subscribers of its slot's node, not to every node.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from redis.asyncio.connection import Connection
from redis.exceptions import ResponseError

from app.backoff import Backoff
from app.cancellation import pause
from app.errors import BrokerError
from app.models import StreamId
from app.streams.codec import MalformedValues, decode_event, shown
from app.streams.redis.client import redis_errors
from app.streams.redis.keys import channel_name
from app.streams.seams import Deliver

logger = logging.getLogger(__name__)


def _release(waiters: deque[asyncio.Future[None]], _: asyncio.Future[None]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)


class TenantMoved(Exception):
    """The tenant's slot is served by another node now: subscribe there (clusterfeed.py)."""


def _retrieved(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


class RedisFeed:
    """One sharded Pub/Sub connection: one reader task, one writer task.

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


    Two hooks serve Redis Cluster: `on_moved(tenant)` when the node unsubscribed a tenant we
    still want (its slot moved) or refused a command (MOVED: `tenant` None), and `on_lost()`
    after the connection dropped and after each failed reconnect (the node may be gone for good).
    """

    def __init__(
        self,
        connect: Callable[[], Connection],
        deliver: Deliver,
        on_close: Callable[[RedisFeed], None],
        malformed: MalformedValues,
        on_gap: Callable[[], None] | None = None,
        ping_interval_s: float = 5.0,
        on_moved: Callable[[str | None], None] | None = None,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self._make_connection = connect
        self._on_moved = on_moved
        self._on_lost = on_lost
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
        self._unsubscribing: dict[bytes, int] = {}  # SUNSUBSCRIBEs we sent, not yet answered
        self._heard: dict[str, StreamId] = {}  # by tenant: the newest id of a skipped message
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def topics(self) -> int:
        """Tenants subscribed (or being subscribed) on this connection."""
        return len(self._topics)

    async def start(self) -> None:
        await self._connect()
        self._tasks = [
            asyncio.create_task(self._read_forever(), name="redis-feed-reader"),
            asyncio.create_task(self._write_forever(), name="redis-feed-writer"),
        ]

    async def _connect(self) -> None:
        conn = self._make_connection()
        try:
            with redis_errors("connect pubsub"):
                await conn.connect()  # type: ignore[no-untyped-call]
                # Commands queued for the old connection are covered by this resubscribe (or,
                # for UNSUBSCRIBE, by not resubscribing): the writer drops them, so no stray
                # reply can confirm a later subscriber early.
                self._generation += 1
                self._realign_waiters()  # also with no topics: stale waiters must not stay in line
                self._unsubscribing.clear()  # their answers died with the old connection
                # One command per channel (a cluster refuses two slots in one), over a copy: each
                # send yields, and streams that open or close meanwhile change the topics.
                for channel in list(self._topics):
                    await conn.send_command("SSUBSCRIBE", channel)
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
        self._commands.put_nowait((self._generation, b"SSUBSCRIBE", channel))
        await waiter

    async def unsubscribe(self, tenant: str) -> None:
        channel = channel_name(tenant).encode()
        if self._topics.pop(channel, None) is not None:
            self._commands.put_nowait((self._generation, b"SUNSUBSCRIBE", channel))

    def drop(self, tenant: str) -> None:
        """Forget a tenant whose slot moved to another node: its waiting subscribers get
        TenantMoved (and subscribe there), and whatever this node still sends for it is ignored."""
        channel = channel_name(tenant).encode()
        # No SUNSUBSCRIBE: the node already let go of the slot (or the connection is gone), and
        # would answer MOVED. Anything it still sends for the tenant is ignored.
        self._topics.pop(channel, None)
        for waiter in self._pending.pop(channel, ()):
            if not waiter.done():
                waiter.set_exception(TenantMoved(tenant))
                waiter.add_done_callback(_retrieved)  # its caller may be gone
        confirmation = self._confirmations.pop(channel, None)
        if confirmation is not None and not confirmation.done():
            confirmation.set_exception(BrokerError("resubscribe", f"{tenant} moved to another node"))
            confirmation.add_done_callback(_retrieved)

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
            if command[0] == b"SUNSUBSCRIBE":
                self._unsubscribing[command[1]] = self._unsubscribing.get(command[1], 0) + 1
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
                if self._on_lost is not None:
                    self._on_lost()
                await pause(backoff.next())
                try:
                    await self._connect()
                    break
                except (BrokerError, TimeoutError) as exc:
                    logger.warning("redis pubsub reconnect failed: %s", exc or "timed out")
                except Exception:  # a bug here must not end the reader: the feed would stay down for good
                    logger.exception("redis pubsub reconnect failed")
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
                try:
                    response = await conn.read_response(timeout=self._ping_interval_s * 3, push_request=True)
                except ResponseError as exc:  # an error reply: the connection itself is fine
                    self._refused(exc)
                    continue
                if response is None:  # redis-py's answer to a timeout we asked for
                    raise TimeoutError(f"no answer to pings for {self._ping_interval_s * 3:.1f} s")
                self._handle(response)
        finally:
            pinger.cancel()

    async def _ping(self) -> None:
        while True:
            await pause(self._ping_interval_s)
            self._commands.put_nowait((self._generation, b"PING", b""))

    def heard(self, tenant: str) -> StreamId | None:
        """The newest id of a message this connection skipped as malformed (see the feed audit)."""
        return self._heard.get(tenant)

    def _note_heard(self, tenant: str, raw_id: bytes) -> None:
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            stream_id = StreamId.parse(raw_id.decode())
            if (heard := self._heard.get(tenant)) is None or stream_id > heard:
                self._heard[tenant] = stream_id

    def _refused(self, exc: ResponseError) -> None:
        # On a cluster: MOVED (the slot is elsewhere), CLUSTERDOWN, TRYAGAIN. Which command it
        # answered is not said; the cluster feed rechecks where every tenant lives.
        logger.warning("redis pubsub command refused: %s", exc)
        if self._on_moved is not None:
            self._on_moved(None)

    def _handle(self, response: Any) -> None:
        kind = response[0]
        if kind == b"smessage":
            tenant = self._topics.get(response[1])
            if tenant is None:
                return
            raw_id, _, data = response[2].partition(b" ")
            try:
                event = decode_event(raw_id, data, tenant)  # any well of the channel's tenant, none of another's
            except ValueError as exc:
                self._malformed.skip("live", f"{response[1].decode()} message {shown(raw_id)}", exc)
                self._note_heard(tenant, raw_id)  # it arrived: the feed audit must not take it for lost
                return
            self._deliver(tenant, event)
        elif kind == b"sunsubscribe":
            channel = response[1]
            ours = self._unsubscribing.get(channel, 0)
            if ours > 1:
                self._unsubscribing[channel] = ours - 1
            elif ours == 1:
                del self._unsubscribing[channel]
            elif channel in self._topics:  # the node let go of a tenant we want: its slot moved
                tenant = self._topics[channel]
                logger.warning("redis unsubscribed %s (its slot moved)", tenant)
                if self._on_moved is not None:
                    self._on_moved(tenant)
        elif kind == b"ssubscribe":
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
