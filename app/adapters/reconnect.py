"""The reconnect loop every field adapter runs: open a session, serve it until it fails, back off, again.

No protocol library reconnects by itself here: their own retries would happen behind our
backoff and our counters. An outage is logged once, at WARNING when it starts; the attempts
that keep failing are DEBUG until one succeeds, so a device that is away all night writes one
line, not thousands. Credentials are looked up by name at every connect, in the mapping the
caller passes (a live view of the environment picks up rotated secrets); only
app/settings.py reads the process environment.

A device that is away must not look like a steady one: the loop knows the last sign of life
(the session coming up, and whatever the adapter counts as contact: an answered request, a
notification), and `ReconnectingAdapter` runs a watch beside it that, once the connection has
been down for the connection's `comm_timeout_s` since then, reports every tag BAD with reason
`comm_failure`, and while it is up reports tags that stopped updating as stale (app/adapters/reporter.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import ClassVar, NoReturn, TypeVar

from app.adapters.base import ReadingSink
from app.adapters.reporter import Reporter
from app.backoff import Backoff
from app.cancellation import pause
from app.errors import AdapterError, ConnectionLost
from app.models import Reading

T = TypeVar("T")


class ReconnectLoop:
    """One connection's lifecycle: `connected` and `errors` (failed connects plus connections
    lost) for the health line and metrics, the backoff, and the outage log.

    Args:
        protocol, connection_id: how log lines and errors name the connection.
        first_s, cap_s: the backoff after the first failure, and its ceiling.
        logger: the adapter's own, so its lines can be filtered by module.
        credentials: where `secret()` looks names up.
    """

    def __init__(
        self,
        protocol: str,
        connection_id: str,
        *,
        first_s: float,
        cap_s: float,
        logger: logging.Logger,
        credentials: Mapping[str, str] | None = None,
    ) -> None:
        self.label = f"{protocol} {connection_id}"
        self.connection_id = connection_id
        self.connected = False
        self.errors = 0
        self.last_contact = time.monotonic()  # the start counts: a device never reached is lost too
        self._backoff = Backoff(first_s, cap_s)
        self._logger = logger
        self._credentials: Mapping[str, str] = {} if credentials is None else credentials

    async def run(
        self,
        session: Callable[[], AbstractAsyncContextManager[T]],
        serve: Callable[[T], Awaitable[None]],
        on_up: Callable[[], None] | None = None,
    ) -> NoReturn:
        """Forever: open `session()`, then `serve` it until it raises; `connected` holds in between.

        Entering the session connects (and subscribes); leaving it closes, whatever happened.
        Any Exception is a failed attempt; cancellation is not, and ends the loop. `on_up` is
        called each time a session is up, before it is served.
        """
        while True:
            try:
                async with session() as opened:
                    self._up()
                    if on_up is not None:
                        on_up()
                    try:
                        await serve(opened)
                    finally:
                        self.connected = False
                raise ConnectionLost(self.connection_id, "the session ended")
            except Exception as exc:
                # Not Task.cancelling(): on Python 3.11 a TaskGroup whose child failed (Modbus polls
                # in one) leaves it raised, and the adapter would take its own failure for a cancel.
                delay = self._failed(exc)
            # asyncio.sleep, not app.cancellation.pause, for the same reason: that TaskGroup's
            # leftover count would read as a lost cancel and end the loop for good.
            await asyncio.sleep(delay)

    def secret(self, name: str | None) -> str | None:
        """The credential held by the variable `name`; warns (naming it, never a value) when unset."""
        if name is None:
            return None
        value = self._credentials.get(name)
        if value is None:
            self._logger.warning("%s: environment variable %s is not set", self.label, name)
        return value

    def declared_lost(self, tags: int, after_s: float) -> None:
        self._logger.warning("%s: no contact for %.1f s: %d tags reported BAD comm_failure", self.label, after_s, tags)

    def contact(self) -> None:
        """The device just showed it is alive (answered, notified, sent a message)."""
        self.last_contact = time.monotonic()

    def down_for(self) -> float:
        """Seconds since the last sign of life while the connection is down; 0 while it is up."""
        return 0.0 if self.connected else time.monotonic() - self.last_contact

    def _up(self) -> None:
        self._backoff.reset()
        self.connected = True
        self.contact()

    def _failed(self, exc: Exception) -> float:
        self.errors += 1
        delay = self._backoff.next()
        first = self._backoff.failures == 1
        level = logging.WARNING if first else logging.DEBUG
        # A failure we did not translate is a bug or a library surprise: show where, once.
        trace = first and not _expected(exc)
        self._logger.log(level, "%s: %s; retrying in %.1f s", self.label, describe(exc), delay, exc_info=trace)
        return delay


def describe(exc: BaseException) -> str:
    """One line for a failure: every leaf of an exception group, an AdapterError by its detail."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(inner) for inner in exc.exceptions)
    if isinstance(exc, AdapterError):
        return exc.detail
    return str(exc) or type(exc).__name__


def _expected(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_expected(inner) for inner in exc.exceptions)
    return isinstance(exc, AdapterError)


_WATCH_S = 0.25  # how often the watch looks; a small fraction of any sensible comm_timeout_s


class ReconnectingAdapter:
    """What every reconnecting adapter shares: its name and vital signs come from its loop, its
    tags' state from its reporter, and the watch that reports a lost device and stale tags.

    Args:
        reconnect: the connection's loop.
        reporter: the connection's tags.
        comm_timeout_s: how long the connection may be down (since its last sign of life)
            before every tag is reported BAD comm_failure.
    """

    # True where the protocol client's own keepalive watches the peer (MQTT): being connected is
    # then the sign of life; elsewhere the adapter calls `contact()` on each answer.
    connected_is_alive: ClassVar[bool] = False

    def __init__(self, reconnect: ReconnectLoop, reporter: Reporter, comm_timeout_s: float) -> None:
        self._reconnect = reconnect
        self._reporter = reporter
        self._comm_timeout_s = comm_timeout_s

    def current(self) -> list[Reading]:
        return self._reporter.current()

    async def _run_watched(
        self,
        sink: ReadingSink,
        session: Callable[[], AbstractAsyncContextManager[T]],
        serve: Callable[[T], Awaitable[None]],
    ) -> NoReturn:
        """The reconnect loop, with the watch beside it for as long as it runs."""
        watch = asyncio.create_task(self._watch_vitals(sink), name=f"{self.name}-watch")
        try:
            await self._reconnect.run(session, serve, on_up=self._reporter.connected)
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch

    async def _watch_vitals(self, sink: ReadingSink) -> NoReturn:
        while True:
            await pause(_WATCH_S)
            if self._reconnect.connected:
                if self.connected_is_alive:
                    self._reconnect.contact()
                readings = self._reporter.overdue()
            elif self._reconnect.down_for() >= self._comm_timeout_s:
                readings = self._reporter.lost()
                if readings:
                    self._reconnect.declared_lost(len(readings), self._comm_timeout_s)
            else:
                continue
            if readings:
                await sink.submit(readings)

    @property
    def name(self) -> str:
        return self._reconnect.connection_id

    @property
    def connected(self) -> bool:
        return self._reconnect.connected

    @property
    def errors(self) -> int:
        return self._reconnect.errors
