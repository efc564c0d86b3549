"""The batching publisher between adapters and the stream log: one round trip per batch."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from app.backoff import Backoff
from app.errors import BrokerError, SpoolError
from app.ingest.spool import Spool
from app.models import Origin, Reading, StreamId
from app.streams.seams import StreamLog

logger = logging.getLogger(__name__)


class Publisher:
    """Collects readings for up to `max_delay_s` or `max_batch` readings, then publishes them.

    Order: batches reach the broker in the order their readings were submitted, spooled or not.

    Without a spool, a failed batch is retried with capped backoff, and `submit` applies
    backpressure: when `max_pending` readings wait, adapters await instead of growing memory.

    With a spool, a batch the broker refuses (BrokerError) or does not answer within
    `publish_timeout_s` is written to the spool, and so is every later batch while the spool
    holds anything, so adapters keep going through an outage. A drain task publishes the
    oldest spooled batches, deletes them once the broker took them, and backs off (jittered,
    capped) while it cannot; it starts at once, so a spool left by a previous run drains first.
    A publish that times out is not cancelled (a frozen Redis may still apply it when it wakes):
    its batch is spooled for safety and the drain task first waits for that publish's outcome,
    publishing nothing else meanwhile, and deletes the copy if it succeeded. Where the outcome
    cannot be known (the broker's own timeout fired while the script waited in Redis, the
    connection broke after the script was sent, a SIGKILL between a drained publish and the
    delete of its batch) the batch is published again, and the broker skips what it already
    applied: every batch carries its `Origin` (this publisher's id and a seq per reading, kept
    with the spooled copy), so each reading lands in the stream log once.

    On exit, what is pending is published (or spooled if the broker fails), then the spool
    is drained for up to `drain_on_exit_s` while the broker answers; the rest stays on disk.

    Counters for health and metrics (plain ints): `accepted` (readings submitted), `published`
    (readings the broker took, directly or from the spool), `spooled`, `drained`, and from the
    spool `dropped` and `depth` / `depth_bytes`.
    """

    def __init__(
        self,
        log: StreamLog,
        max_batch: int = 500,
        max_delay_s: float = 0.005,
        max_pending: int = 50_000,
        spool: Spool | None = None,
        publish_timeout_s: float = 5.0,
        drain_on_exit_s: float = 5.0,
    ):
        self._log = log
        self._max_batch = max_batch
        self._max_delay_s = max_delay_s
        self._max_pending = max_pending
        self._spool = spool
        self._publish_timeout_s = publish_timeout_s
        self._drain_on_exit_s = drain_on_exit_s
        self._pending: list[Reading] = []
        self._has_pending = asyncio.Event()
        self._has_room = asyncio.Event()
        self._has_room.set()
        self._spool_filled = asyncio.Event()
        self._spool_emptied = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._drainer: asyncio.Task[None] | None = None
        self._in_flight: _InFlight | None = None
        self._closing = False
        # Every reading gets the next seq of this publisher: a batch sent twice lands once (Origin).
        self._producer = secrets.token_hex(8)
        self._next_seq = 1
        self.accepted = 0
        self.published = 0
        self.spooled = 0
        self.drained = 0
        self.lost = 0

    @property
    def rejected(self) -> int:
        """Readings Redis refused for good (a key of the wrong type): logged by the broker, never retried."""
        return self._log.rejected

    @property
    def dropped(self) -> int:
        return self._spool.dropped if self._spool is not None else 0

    @property
    def depth(self) -> int:
        return self._spool.readings if self._spool is not None else 0

    @property
    def depth_bytes(self) -> int:
        return self._spool.bytes if self._spool is not None else 0

    def report(self) -> dict[str, object]:
        return {
            "accepted": self.accepted,
            "published": self.published,
            "pending": len(self._pending),
            "spooled": self.spooled,
            "drained": self.drained,
            "lost": self.lost,
            "dropped": self.dropped,
            "spool_depth": self.depth,
            "spool_bytes": self.depth_bytes,
        }

    async def submit(self, readings: Sequence[Reading]) -> None:
        while len(self._pending) >= self._max_pending:
            self._has_room.clear()
            await self._has_room.wait()
        self._pending.extend(readings)
        self.accepted += len(readings)
        self._has_pending.set()

    async def __aenter__(self) -> Publisher:
        self._task = asyncio.create_task(self._run(), name="publisher")
        if self._spool is not None:
            self._spool_filled.set()  # a previous run may have left batches
            self._drainer = asyncio.create_task(self._drain(self._spool), name="spool-drain")
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Let the one task that publishes finish what is pending: cancelling it mid-batch
        # would drop or reorder readings.
        self._closing = True
        self._has_pending.set()
        if self._task is not None:
            await self._task
        if self._drainer is not None and self._spool is not None:
            await self._stop_draining(self._drainer, self._spool)

    async def _stop_draining(self, drainer: asyncio.Task[None], spool: Spool) -> None:
        self._spool_filled.set()  # a drainer asleep in its backoff gives up at once on exit
        try:
            await asyncio.wait_for(asyncio.shield(drainer), self._drain_on_exit_s)
        except TimeoutError:
            drainer.cancel()
            await asyncio.gather(drainer, return_exceptions=True)
        if self._in_flight is not None:  # handed over, never picked up: its copy is in the spool
            self._in_flight.attempt.cancel()
            await asyncio.gather(self._in_flight.attempt, return_exceptions=True)
        if spool.readings:
            logger.warning("exiting with %d readings in the spool %s", spool.readings, spool.path)

    async def _run(self) -> None:
        while not (self._closing and not self._pending):
            await self._has_pending.wait()
            self._has_pending.clear()
            if len(self._pending) < self._max_batch and not self._closing:
                await asyncio.sleep(self._max_delay_s)
            await self._flush()

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
            origin = Origin(self._producer, tuple(range(self._next_seq, self._next_seq + len(batch))))
            self._next_seq += len(batch)
            if self._spool is None:
                await self._publish(batch, origin)
            else:
                await self._publish_or_spool(self._spool, batch, origin)
        self._has_room.set()

    async def _publish(self, batch: list[Reading], origin: Origin) -> None:
        backoff = Backoff()
        while True:
            try:
                await self._log.publish(batch, origin)
                self.published += len(batch)
                return
            except Exception as exc:  # not only BrokerError: the one publishing task must not die
                delay = backoff.next()
                log = logger.warning if isinstance(exc, BrokerError) else logger.exception
                log("publish of %d readings failed, retrying in %.2f s: %s", len(batch), delay, exc)
                await asyncio.sleep(delay)

    async def _publish_or_spool(self, spool: Spool, batch: list[Reading], origin: Origin) -> None:
        # The spool only grows here, so when it is empty and nothing is in flight no older batch
        # is waiting: publishing directly cannot overtake one.
        if spool.batches == 0 and self._in_flight is None:
            attempt = asyncio.create_task(self._log.publish(batch, origin), name="publish")
            try:
                await asyncio.wait({attempt}, timeout=self._publish_timeout_s)
            except asyncio.CancelledError:
                attempt.cancel()
                raise
            if not attempt.done():
                # Not cancelled: the script may already be in Redis's hands, and a copy from the
                # spool could then land twice. The drain task waits for its outcome first.
                logger.warning(
                    "publish of %d readings unanswered after %.1f s: spooling", len(batch), self._publish_timeout_s
                )
                batch_id = await self._append(spool, batch, origin)
                self._in_flight = _InFlight(attempt, batch_id, len(batch))
                self._spool_filled.set()
                return
            failure = attempt.exception()
            if failure is None:
                self.published += len(batch)
                return
            if isinstance(failure, BrokerError):
                logger.warning("publish of %d readings failed, spooling until it is back: %s", len(batch), failure)
            else:  # unexpected, but the batch is kept all the same and the publisher goes on
                logger.error("publish of %d readings failed, spooling", len(batch), exc_info=failure)
        await self._append(spool, batch, origin)
        self._spool_filled.set()

    async def _append(self, spool: Spool, batch: list[Reading], origin: Origin) -> int | None:
        # An unwritable spool (disk full) holds the batch here and retries: readings then wait
        # in memory, and adapters feel backpressure at `max_pending`, as without a spool. On
        # exit there is nowhere left to keep them: they are counted as lost, and the exit is prompt.
        backoff = Backoff()
        while True:
            try:
                batch_id = await spool.append(batch, origin)
            except SpoolError as exc:
                if self._closing:
                    logger.error(
                        "exiting: %d readings lost, neither Redis nor the spool took them: %s", len(batch), exc
                    )
                    self.lost += len(batch)
                    return None
                delay = backoff.next()
                log = logger.error if backoff.failures == 1 else logger.debug
                log(
                    "cannot spool %d readings (%d more pending), retrying in %.2f s: %s",
                    len(batch),
                    len(self._pending),
                    delay,
                    exc,
                )
                await asyncio.sleep(delay)
                continue
            self.spooled += len(batch)
            return batch_id

    async def _drain(self, spool: Spool) -> None:
        while True:
            try:
                await self._drain_until_closed(spool)
                return
            except SpoolError as exc:
                logger.error("spool drain: %s; retrying in 1 s", exc)
                await asyncio.sleep(1)
            except Exception:  # the drain must outlive a bug: a dead drain would spool everything from now on
                logger.exception("spool drain failed; retrying in 1 s")
                await asyncio.sleep(1)

    async def _drain_until_closed(self, spool: Spool) -> None:
        backoff = Backoff()
        while True:
            if self._in_flight is not None:
                handed, self._in_flight = self._in_flight, None
                if await self._outcome(handed.attempt) is None:
                    if handed.batch_id is None:  # it was counted lost on exit, but it made it
                        self.published, self.lost = self.published + handed.readings, self.lost - handed.readings
                    else:
                        await self._drained(spool, handed.batch_id, handed.readings)
                continue  # if it failed, the spooled copy is next in line
            if spool.batches == 0:
                if self._closing and (self._task is None or self._task.done()):
                    return
                self._spool_filled.clear()
                await self._spool_filled.wait()
                continue
            run = await spool.peek(self._max_batch)
            if run is None:
                continue
            failure = await self._outcome(
                asyncio.create_task(self._log.publish(run.readings, run.origin), name="drain")
            )
            if failure is None:
                await self._drained(spool, run.last_id, len(run.readings))
                if backoff.failures or spool.batches == 0:
                    logger.info("spool drain: %d readings drained, %d wait", self.drained, spool.readings)
                backoff.reset()
                continue
            if self._closing:
                return  # what is left stays spooled for the next start
            delay = backoff.next()
            log = logger.warning if backoff.failures == 1 else logger.debug
            log("spool drain: publish failed, %d readings wait, retrying in %.2f s: %s", spool.readings, delay, failure)
            self._spool_filled.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wait_closing(), delay)

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

    async def _drained(self, spool: Spool, last_id: int, readings: int) -> None:
        await spool.delete_through(last_id, published=readings)
        self.published += readings
        self.drained += readings

    async def _wait_closing(self) -> None:
        while not self._closing:
            await self._spool_filled.wait()
            self._spool_filled.clear()


@dataclass(frozen=True, slots=True)
class _InFlight:
    """A publish that outlived its timeout, handed to the drain task with the id of its spooled copy."""

    attempt: asyncio.Task[list[StreamId]]
    batch_id: int | None  # None: the spool could not take a copy either
    readings: int
