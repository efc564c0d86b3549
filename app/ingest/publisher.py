"""The batching publisher between adapters and the stream log: one round trip per batch."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Sequence

from app.backoff import Backoff
from app.cancellation import pause
from app.errors import BrokerError, SpoolError
from app.ingest.counters import IngestCounters
from app.ingest.drain import SpoolDrain
from app.ingest.spool import Spool
from app.models import Origin, Reading, StreamId, utc_now_iso
from app.streams.seams import StreamLog

logger = logging.getLogger(__name__)


class Publisher:
    """Collects readings for up to `max_delay_s` or `max_batch` readings, then publishes them.

    Order: batches reach the broker in the order their readings were submitted, spooled or not.
    One task publishes, one batch at a time, and every reading gets the next seq of this
    publisher's `Origin`, so a batch sent twice lands once.

    Without a spool, a failed batch is retried with capped backoff, and `submit` applies
    backpressure: when `max_pending` readings wait, adapters await instead of growing memory.

    With a spool, a batch the broker refuses (BrokerError) or does not answer within
    `publish_timeout_s` is written to the spool, and so is every later batch while the spool
    holds anything, so adapters keep going through an outage; a `SpoolDrain` empties it
    (oldest first, exactly once; see there). A publish that times out is not cancelled (a
    frozen Redis may still apply it when it wakes): its batch is spooled for safety and the
    publish handed to the drain, which waits for its outcome before publishing anything else.

    On exit, what is pending is published (or spooled if the broker fails), then the spool
    is drained for up to `drain_on_exit_s` while the broker answers; the rest stays on disk.

    Counters for health and metrics (plain ints, kept in `counters`): `accepted`, `published`,
    `spooled`, `drained`, `lost`, and from the spool `dropped` and `depth` / `depth_bytes`.
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
        self.counters = IngestCounters(spool)
        self._drain: SpoolDrain | None = None
        if spool is not None:
            self._drain = SpoolDrain(log, spool, self.counters, max_batch, publish_timeout_s, drain_on_exit_s)
        self._pending: list[Reading] = []
        self._has_pending = asyncio.Event()
        self._has_room = asyncio.Event()
        self._has_room.set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._producer = secrets.token_hex(8)
        self._next_seq = 1

    @property
    def producer(self) -> str:
        """This publisher's producer id (see Origin): one per worker run."""
        return self._producer

    @property
    def rejected(self) -> int:
        """Readings Redis refused for good (a key of the wrong type): logged by the broker, never retried."""
        return self._log.rejected

    def report(self) -> dict[str, object]:
        return self.counters.report(pending=len(self._pending))

    async def submit(self, readings: Sequence[Reading]) -> None:
        while len(self._pending) >= self._max_pending:
            self._has_room.clear()
            await self._has_room.wait()
        # Stamped once per submit: every reading says when wellstream took it, next to when the device read it.
        ingested = {"ingested_at": utc_now_iso()}
        self._pending.extend(r if r.ingested_at else r.model_copy(update=ingested) for r in readings)
        self.counters.count_accepted(len(readings))
        self._has_pending.set()

    async def __aenter__(self) -> Publisher:
        self._task = asyncio.create_task(self._run(), name="publisher")
        if self._drain is not None:
            self._drain.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Let the one task that publishes finish what is pending: cancelling it mid-batch
        # would drop or reorder readings.
        self._closing = True
        if self._drain is not None:
            self._drain.closing()
        self._has_pending.set()
        if self._task is not None:
            await self._task
        if self._drain is not None:
            await self._drain.stop()

    async def _run(self) -> None:
        while not (self._closing and not self._pending):
            await self._has_pending.wait()
            self._has_pending.clear()
            if len(self._pending) < self._max_batch and not self._closing:
                await pause(self._max_delay_s)
            await self._flush()

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
            origin = Origin(self._producer, tuple(range(self._next_seq, self._next_seq + len(batch))))
            self._next_seq += len(batch)
            if self._spool is None or self._drain is None:
                await self._publish(batch, origin)
            else:
                await self._publish_or_spool(self._spool, self._drain, batch, origin)
        self._has_room.set()

    async def _publish(self, batch: list[Reading], origin: Origin) -> None:
        backoff = Backoff()
        while True:
            try:
                await self._log.publish(batch, origin)
                self.counters.count_published(len(batch))
                return
            except Exception as exc:  # not only BrokerError: the one publishing task must not die
                delay = backoff.next()
                log = logger.warning if isinstance(exc, BrokerError) else logger.exception
                log("publish of %d readings failed, retrying in %.2f s: %s", len(batch), delay, exc)
                await pause(delay)

    async def _publish_or_spool(self, spool: Spool, drain: SpoolDrain, batch: list[Reading], origin: Origin) -> None:
        # The spool only grows here, so while the drain is idle no older batch is waiting:
        # publishing directly cannot overtake one.
        if drain.idle:
            attempt = asyncio.create_task(self._log.publish(batch, origin), name="publish")
            await self._wait_for_answer(attempt)
            if not attempt.done():
                await self._hand_over(spool, drain, attempt, batch, origin)
                return
            if self._took(attempt, len(batch)):
                return
        await self._append(spool, batch, origin)
        drain.filled()

    async def _wait_for_answer(self, attempt: asyncio.Task[list[StreamId]]) -> None:
        try:
            await asyncio.wait({attempt}, timeout=self._publish_timeout_s)
        except asyncio.CancelledError:
            attempt.cancel()
            raise

    async def _hand_over(
        self,
        spool: Spool,
        drain: SpoolDrain,
        attempt: asyncio.Task[list[StreamId]],
        batch: list[Reading],
        origin: Origin,
    ) -> None:
        # Not cancelled: the script may already be in Redis's hands, and a copy from the
        # spool could then land twice. The drain waits for its outcome first.
        logger.warning("publish of %d readings unanswered after %.1f s: spooling", len(batch), self._publish_timeout_s)
        batch_id = await self._append(spool, batch, origin)
        drain.hand_over(attempt, batch_id, len(batch))

    def _took(self, attempt: asyncio.Task[list[StreamId]], readings: int) -> bool:
        """Whether a finished publish succeeded (counted); a failure is logged, for the spool to keep the batch."""
        failure = attempt.exception()
        if failure is None:
            self.counters.count_published(readings)
            return True
        if isinstance(failure, BrokerError):
            logger.warning("publish of %d readings failed, spooling until it is back: %s", readings, failure)
        else:  # unexpected, but the batch is kept all the same and the publisher goes on
            logger.error("publish of %d readings failed, spooling", readings, exc_info=failure)
        return False

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
                    self.counters.count_lost(len(batch))
                    return None
                await self._retry_append_after(backoff, len(batch), exc)
                continue
            self.counters.count_spooled(len(batch))
            return batch_id

    async def _retry_append_after(self, backoff: Backoff, readings: int, exc: SpoolError) -> None:
        delay = backoff.next()
        log = logger.error if backoff.failures == 1 else logger.debug
        log(
            "cannot spool %d readings (%d more pending), retrying in %.2f s: %s",
            readings,
            len(self._pending),
            delay,
            exc,
        )
        await pause(delay)
