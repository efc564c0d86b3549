"""The spool drain: a task of its own that publishes spooled batches, oldest first, and deletes them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from app.backoff import Backoff
from app.cancellation import pause
from app.errors import BrokerError, SpoolError
from app.ingest.counters import IngestCounters
from app.ingest.spool import Spool
from app.models import StreamId
from app.streams.seams import StreamLog

logger = logging.getLogger(__name__)


class SpoolDrain:
    """Publishes the spool's oldest batches into the stream log and deletes them once the log took them.

    The publisher spools a batch and says so with `filled()`; a publish that outlived its
    timeout comes with `hand_over()` instead. While the log refuses, the drain backs off
    (jittered, capped) and retries; new batches do not cut a backoff short.

    Order: the drain is the only one to publish from the spool, one run of batches at a time,
    oldest first. The publisher may bypass the spool only while `idle` (spool empty, nothing
    handed over), so no newer batch overtakes a spooled one. The drain starts at once, so a
    spool left by a previous run drains before anything newer.

    A handed-over publish is not cancelled (a frozen Redis may still apply it when it wakes):
    the drain first waits for its outcome, publishing nothing else meanwhile, and deletes the
    batch's spooled copy if it succeeded. Where the outcome cannot be known (the broker's own
    timeout fired while the script waited in Redis, the connection broke after the script was
    sent, a SIGKILL between a drained publish and the delete of its batch) the copy is published
    again, and the log skips what it already applied: a spooled batch keeps its `Origin`, so each
    reading lands in the stream log once.

    Exit: after `closing()` a failed publish ends the drain, and a backoff ends at the next
    wake-up. `stop()` (the publisher is done, nothing more will be spooled) drains for up to
    `drain_on_exit_s` while the log answers; what is left stays on disk for the next start.
    """

    def __init__(
        self,
        log: StreamLog,
        spool: Spool,
        counters: IngestCounters,
        max_batch: int,
        publish_timeout_s: float,
        drain_on_exit_s: float,
    ) -> None:
        self._log = log
        self._spool = spool
        self._counters = counters
        self._max_batch = max_batch
        self._publish_timeout_s = publish_timeout_s
        self._drain_on_exit_s = drain_on_exit_s
        self._wake = asyncio.Event()
        self._wake.set()  # a previous run may have left batches
        self._in_flight: _InFlight | None = None
        self._closing = False
        self._finished = False
        self._task: asyncio.Task[None] | None = None

    @property
    def idle(self) -> bool:
        """No older batch waits (the spool is empty and no publish is handed over): a new one may go directly."""
        return self._spool.batches == 0 and self._in_flight is None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="spool-drain")

    def filled(self) -> None:
        """A batch was spooled."""
        self._wake.set()

    def hand_over(self, attempt: asyncio.Task[list[StreamId]], batch_id: int | None, readings: int) -> None:
        """A publish outlived its timeout; its copy is spooled as `batch_id` (None: the spool refused it on exit)."""
        self._in_flight = _InFlight(attempt, batch_id, readings)
        self._wake.set()

    def closing(self) -> None:
        """The publisher is exiting: stop retrying, it is flushing its last batches."""
        self._closing = True

    async def stop(self) -> None:
        """The publisher is done: drain for up to `drain_on_exit_s`, then end; the rest stays spooled."""
        self._closing = self._finished = True
        self._wake.set()  # a drain in its backoff tries once more now, and ends if that fails
        if self._task is not None:
            await self._end(self._task)
        if self._in_flight is not None:  # handed over, never picked up: its copy is in the spool
            self._in_flight.attempt.cancel()
            await asyncio.gather(self._in_flight.attempt, return_exceptions=True)
        if self._spool.readings:
            logger.warning("exiting with %d readings in the spool %s", self._spool.readings, self._spool.path)

    async def _end(self, task: asyncio.Task[None]) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(task), self._drain_on_exit_s)
        except TimeoutError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                await self._drain_until_closed()
                return
            except SpoolError as exc:
                logger.error("spool drain: %s; retrying in 1 s", exc)
                await pause(1)
            except Exception:  # the drain must outlive a bug: a dead drain would spool everything from now on
                logger.exception("spool drain failed; retrying in 1 s")
                await pause(1)

    async def _drain_until_closed(self) -> None:
        backoff = Backoff()
        while True:
            if self._in_flight is not None:
                handed, self._in_flight = self._in_flight, None
                await self._settle(handed)
            elif self._spool.batches:
                if not await self._drain_oldest(backoff):
                    return
            elif self._finished:
                return
            else:
                self._wake.clear()
                await self._wake.wait()

    async def _settle(self, handed: _InFlight) -> None:
        # If it failed, its spooled copy is next in line like any other batch.
        if await self._outcome(handed.attempt) is not None:
            return
        if handed.batch_id is None:  # it was counted lost on exit, but it made it
            self._counters.count_lost_as_published(handed.readings)
        else:
            await self._drained(handed.batch_id, handed.readings)

    async def _drain_oldest(self, backoff: Backoff) -> bool:
        """Publish and delete the oldest batches, or back off; False ends the drain (a failure on exit)."""
        run = await self._spool.peek(self._max_batch)
        if run is None:
            return True
        failure = await self._outcome(asyncio.create_task(self._log.publish(run.readings, run.origin), name="drain"))
        if failure is None:
            await self._drained(run.last_id, len(run.readings))
            if backoff.failures or self._spool.batches == 0:
                logger.info("spool drain: %d readings drained, %d wait", self._counters.drained, self._spool.readings)
            backoff.reset()
            return True
        if self._closing:
            return False  # what is left stays spooled for the next start
        await self._back_off(backoff, failure)
        return True

    async def _back_off(self, backoff: Backoff, failure: BrokerError) -> None:
        delay = backoff.next()
        log = logger.warning if backoff.failures == 1 else logger.debug
        log(
            "spool drain: publish failed, %d readings wait, retrying in %.2f s: %s",
            self._spool.readings,
            delay,
            failure,
        )
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wait_closing(), delay)

    async def _wait_closing(self) -> None:
        # Woken by a new batch, the drain keeps waiting out its backoff; on exit it stops waiting.
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()

    async def _outcome(self, attempt: asyncio.Task[list[StreamId]]) -> BrokerError | None:
        """Wait for a publish to succeed (None) or fail; a slow one is logged, never abandoned."""
        try:
            await asyncio.wait({attempt}, timeout=self._publish_timeout_s)
            if not attempt.done():
                logger.warning(
                    "spool drain: a publish unanswered after %.1f s, waiting for it", self._publish_timeout_s
                )
            await attempt
        except BrokerError as exc:
            return exc
        except asyncio.CancelledError:
            attempt.cancel()  # on exit: the batch stays spooled for the next start
            raise
        except Exception as exc:  # unexpected: logged, and the batch is tried again like any failure
            logger.error("spool drain: publish failed", exc_info=exc)
            return BrokerError("publish", repr(exc))
        return None

    async def _drained(self, last_id: int, readings: int) -> None:
        await self._spool.delete_through(last_id, published=readings)
        self._counters.count_drained(readings)


@dataclass(frozen=True, slots=True)
class _InFlight:
    """A publish that outlived its timeout, handed to the drain with the id of its spooled copy."""

    attempt: asyncio.Task[list[StreamId]]
    batch_id: int | None  # None: the spool could not take a copy either
    readings: int
