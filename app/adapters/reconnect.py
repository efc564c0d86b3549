"""The reconnect loop every field adapter runs: open a session, serve it until it fails, back off, again.

No protocol library reconnects by itself here: their own retries would happen behind our
backoff and our counters. An outage is logged once, at WARNING when it starts; the attempts
that keep failing are DEBUG until one succeeds, so a device that is away all night writes one
line, not thousands. Credentials are looked up by name at every connect, in the mapping the
caller passes (a live view of the environment picks up rotated secrets); only
app/settings.py reads the process environment.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import NoReturn, TypeVar

from app.backoff import Backoff
from app.errors import AdapterError, ConnectionLost

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
        self._backoff = Backoff(first_s, cap_s)
        self._logger = logger
        self._credentials: Mapping[str, str] = {} if credentials is None else credentials

    async def run(
        self, session: Callable[[], AbstractAsyncContextManager[T]], serve: Callable[[T], Awaitable[None]]
    ) -> NoReturn:
        """Forever: open `session()`, then `serve` it until it raises; `connected` holds in between.

        Entering the session connects (and subscribes); leaving it closes, whatever happened.
        Any Exception is a failed attempt; cancellation is not, and ends the loop.
        """
        while True:
            try:
                async with session() as opened:
                    self._up()
                    try:
                        await serve(opened)
                    finally:
                        self.connected = False
                raise ConnectionLost(self.connection_id, "the session ended")
            except Exception as exc:
                # Not Task.cancelling(): on Python 3.11 a TaskGroup whose child failed (Modbus polls
                # in one) leaves it raised, and the adapter would take its own failure for a cancel.
                delay = self._failed(exc)
            await asyncio.sleep(delay)

    def secret(self, name: str | None) -> str | None:
        """The credential held by the variable `name`; warns (naming it, never a value) when unset."""
        if name is None:
            return None
        value = self._credentials.get(name)
        if value is None:
            self._logger.warning("%s: environment variable %s is not set", self.label, name)
        return value

    def _up(self) -> None:
        self._backoff.reset()
        self.connected = True

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


class ReconnectingAdapter:
    """What every reconnecting adapter shares: its name and vital signs come from its loop."""

    def __init__(self, reconnect: ReconnectLoop) -> None:
        self._reconnect = reconnect

    @property
    def name(self) -> str:
        return self._reconnect.connection_id

    @property
    def connected(self) -> bool:
        return self._reconnect.connected

    @property
    def errors(self) -> int:
        return self._reconnect.errors
