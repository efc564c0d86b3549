"""The ingestion spool: batches the broker could not take, kept on local disk until it can.

One SQLite file in WAL mode, one row per batch, oldest first. A batch is acknowledged
(`append` returns) only after its transaction committed, so a worker killed with SIGKILL
loses nothing it had spooled: a committed WAL transaction survives the death of the
process at any `synchronous` level, because the WAL frames are already in the kernel's page
cache. `synchronous` decides what survives a power cut or kernel crash:

- `FULL` (the default) fsyncs the WAL on every commit: an acknowledged batch is on disk.
  The spool only writes while the broker is down, so the fsync is paid during an outage,
  never on the normal path, and a site that loses Redis often loses power next.
- `NORMAL` fsyncs only at checkpoints: cheaper on slow flash, but a power cut can lose the
  last transactions (appends; or deletes, whose batches are then published again and
  skipped by Redis, which knows their origin).

Bounded by `max_bytes` of payload (and optionally `max_readings`). When an append would pass
the bound, the OLDEST batches are dropped, counted in `dropped` / `dropped_batches` and
logged as a warning (at most once per `warn_every_s`). An operator of live telemetry wants
the current state of the field when the outage ends; blocking instead would stall the
adapters, and a polled device or an MQTT session would then lose the newest readings
rather than the oldest. The newest batch is always kept, even if alone it exceeds the bound.

All SQLite work runs on one dedicated thread (the connection never changes threads and
calls are serialized), so the event loop never waits on a disk. One worker owns a spool
file: a second process opening the same path fails with SpoolError (an advisory `flock`
on `<path>.lock`, released by the kernel if the owner dies).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import orjson
from pydantic import ValidationError

from app.errors import SpoolError
from app.models import Origin, Reading

logger = logging.getLogger(__name__)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY,  -- rowid: max + 1 on insert, so ascending id is arrival order
    readings INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    payload BLOB NOT NULL,   -- JSON array of readings in the wire format
    producer TEXT,           -- the batch's Origin: the publisher that made it...
    seq INTEGER              -- ...and its first reading's seq (the others follow, one each)
)
"""


@dataclass(frozen=True, slots=True)
class SpooledRun:
    """Consecutive spooled batches of one producer, oldest first, and the id of the last one
    (for `delete_through`). `origin` lets the broker skip what an earlier attempt applied."""

    last_id: int
    readings: list[Reading]
    origin: Origin | None = None


@dataclass(frozen=True, slots=True)
class _Totals:
    batches: int
    readings: int
    bytes: int
    dropped_batches: int
    dropped_readings: int


class _Store:
    """The synchronous half: every method runs on the spool's thread."""

    def __init__(self, path: Path, synchronous: str, max_bytes: int, max_readings: int | None) -> None:
        self._max_bytes = max_bytes
        self._max_readings = max_readings
        self._db = sqlite3.connect(path, isolation_level=None)  # autocommit: transactions are explicit
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(batches)")}
        for column, kind in (("producer", "TEXT"), ("seq", "INTEGER")):  # a spool from before origins
            if column not in columns:
                self._db.execute(f"ALTER TABLE batches ADD COLUMN {column} {kind}")
        row = self._db.execute("SELECT count(*), coalesce(sum(readings), 0), coalesce(sum(bytes), 0) FROM batches")
        self.batches, self.readings, self.bytes = row.fetchone()
        self.dropped_batches = 0
        self.dropped_readings = 0

    def totals(self) -> _Totals:
        return _Totals(self.batches, self.readings, self.bytes, self.dropped_batches, self.dropped_readings)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # SQLite may have rolled back already (disk full)
                self._db.execute("ROLLBACK")
            raise

    def append(self, count: int, payload: bytes, producer: str | None, seq: int | None) -> tuple[_Totals, int]:
        with self._transaction():
            cursor = self._db.execute(
                "INSERT INTO batches (readings, bytes, payload, producer, seq) VALUES (?, ?, ?, ?, ?)",
                (count, len(payload), payload, producer, seq),
            )
            newest = cursor.lastrowid
            assert newest is not None
            last, dropped_batches, dropped_readings, dropped_bytes = self._oldest_to_drop(
                newest, self.readings + count, self.bytes + len(payload)
            )
            if last is not None:
                self._db.execute("DELETE FROM batches WHERE id <= ?", (last,))
            batches = self.batches + 1 - dropped_batches
            readings = self.readings + count - dropped_readings
            size = self.bytes + len(payload) - dropped_bytes
        self.batches, self.readings, self.bytes = batches, readings, size
        self.dropped_batches += dropped_batches
        self.dropped_readings += dropped_readings
        return self.totals(), newest

    def _oldest_to_drop(self, newest: int, readings: int, size: int) -> tuple[int | None, int, int, int]:
        """The id through which old batches must go to fit the bound, and what that frees."""
        last, batches, freed_readings, freed_bytes = None, 0, 0, 0
        after = 0
        while self._over(readings - freed_readings, size - freed_bytes):
            rows = self._db.execute(
                "SELECT id, readings, bytes FROM batches WHERE id > ? AND id < ? ORDER BY id LIMIT 256", (after, newest)
            ).fetchall()
            if not rows:
                break  # only the newest batch is left: it stays, whatever its size
            for row_id, row_readings, row_bytes in rows:
                if not self._over(readings - freed_readings, size - freed_bytes):
                    break
                last, batches = row_id, batches + 1
                freed_readings, freed_bytes = freed_readings + row_readings, freed_bytes + row_bytes
            after = rows[-1][0]
        return last, batches, freed_readings, freed_bytes

    def _over(self, readings: int, size: int) -> bool:
        return size > self._max_bytes or (self._max_readings is not None and readings > self._max_readings)

    def peek(self, max_readings: int) -> list[tuple[int, int, bytes, str | None, int | None]]:
        rows: list[tuple[int, int, bytes, str | None, int | None]] = []
        total = 0
        cursor = self._db.execute("SELECT id, readings, payload, producer, seq FROM batches ORDER BY id")
        try:  # one row at a time: a long outage's spool never comes into memory whole
            while (row := cursor.fetchone()) is not None and not (rows and total + row[1] > max_readings):
                if rows and row[3] != rows[0][3]:
                    break  # one publish carries one producer's seqs
                rows.append(row)
                total += row[1]
        finally:
            cursor.close()
        return rows

    def delete_through(self, last_id: int, published: int | None = None) -> _Totals:
        with self._transaction():
            row = self._db.execute(
                "SELECT count(*), coalesce(sum(readings), 0), coalesce(sum(bytes), 0) FROM batches WHERE id <= ?",
                (last_id,),
            ).fetchone()
            self._db.execute("DELETE FROM batches WHERE id <= ?", (last_id,))
        self.batches -= row[0]
        self.readings -= row[1]
        self.bytes -= row[2]
        if published is not None and published > row[1]:
            # Some of what was just published had been evicted meanwhile (the bound was hit while
            # the publish ran) and counted as dropped: it reached Redis after all.
            self.dropped_readings = max(0, self.dropped_readings - (published - row[1]))
        if self.batches == 0:
            # Empty again: give the WAL's disk space back instead of keeping an outage's worth.
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return self.totals()

    def discard(self, row_id: int) -> _Totals:
        row = self._db.execute("SELECT readings, bytes FROM batches WHERE id = ?", (row_id,)).fetchone()
        if row is not None:
            self._db.execute("DELETE FROM batches WHERE id = ?", (row_id,))
            self.batches, self.readings, self.bytes = self.batches - 1, self.readings - row[0], self.bytes - row[1]
            self.dropped_batches, self.dropped_readings = self.dropped_batches + 1, self.dropped_readings + row[0]
        return self.totals()

    def close(self) -> None:
        self._db.close()


def _lock(path: Path) -> int:
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolError(
            f"spool {path} is in use by another worker: give each worker its own WELLSTREAM_SPOOL__PATH"
        ) from None
    return fd


class Spool:
    """A durable FIFO of reading batches; see the module docstring for durability and bounds.

    Open with `async with await Spool.open(path) as spool:` (or call `aclose`). The counters
    (`batches`, `readings`, `bytes`, `dropped_batches`, `dropped`) are plain ints, current as
    of the last completed operation, for health lines and metrics.
    """

    def __init__(self, path: Path, store: _Store, executor: ThreadPoolExecutor, lock_fd: int) -> None:
        self.path = path
        self._store = store
        self._executor = executor
        self._lock_fd = lock_fd
        self._last_warning = -float("inf")
        self.warn_every_s = 10.0
        self._set(store.totals())

    @classmethod
    async def open(
        cls,
        path: Path,
        max_bytes: int = 512 * 2**20,
        max_readings: int | None = None,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
    ) -> Spool:
        """Open (creating directories and file) and lock the spool at `path`; raises SpoolError."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        loop = asyncio.get_running_loop()

        def setup() -> tuple[int, _Store]:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = _lock(path)
            try:
                return fd, _Store(path, synchronous, max_bytes, max_readings)
            except BaseException:
                os.close(fd)
                raise

        try:
            fd, store = await loop.run_in_executor(executor, setup)
        except (OSError, sqlite3.Error) as exc:
            executor.shutdown()
            raise SpoolError(f"cannot open spool {path}: {exc}") from exc
        except BaseException:
            executor.shutdown()
            raise
        spool = cls(path, store, executor, fd)
        if spool.batches:
            logger.info("spool %s holds %d readings from before the restart", path, spool.readings)
        return spool

    def _set(self, totals: _Totals) -> None:
        self.batches = totals.batches
        self.readings = totals.readings
        self.bytes = totals.bytes
        self.dropped_batches = totals.dropped_batches
        self.dropped = totals.dropped_readings

    async def _call(self, func: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, func)
        except sqlite3.Error as exc:  # a full or failing disk: the caller decides, nothing is half-done
            raise SpoolError(f"spool {self.path}: {exc}") from exc

    async def append(self, batch: Sequence[Reading], origin: Origin | None = None) -> int:
        """Store `batch` durably after every older batch; returns its id once committed.

        `origin` must number the batch's readings consecutively (seq, seq + 1, ...).
        """
        payload = b"[" + b",".join(reading.to_json() for reading in batch) + b"]"
        producer, seq = (origin.producer, origin.seqs[0]) if origin is not None and origin.seqs else (None, None)
        dropped_before = self.dropped
        totals, batch_id = await self._call(lambda: self._store.append(len(batch), payload, producer, seq))
        self._set(totals)
        if totals.dropped_readings > dropped_before:
            self._warn_dropped()
        return batch_id

    def _warn_dropped(self) -> None:
        now = time.monotonic()
        if now - self._last_warning >= self.warn_every_s:
            self._last_warning = now
            logger.warning(
                "spool %s is full: dropped the oldest batches, %d readings in all (%d batches); %d readings kept",
                self.path,
                self.dropped,
                self.dropped_batches,
                self.readings,
            )

    async def peek(self, max_readings: int) -> SpooledRun | None:
        """The oldest batches, together up to `max_readings` (at least one batch), or None if empty.

        A batch that no longer decodes (a damaged file) is deleted, counted as dropped and logged.
        """
        while True:
            rows = await self._call(lambda: self._store.peek(max_readings))
            if not rows:
                return None
            readings: list[Reading] = []
            seqs: list[int] = []
            last_id = None
            for row_id, count, payload, _producer, first_seq in rows:
                try:
                    decoded = [Reading.model_validate(raw) for raw in orjson.loads(payload)]
                except (orjson.JSONDecodeError, ValidationError, TypeError) as exc:
                    if last_id is not None:
                        break  # hand out the good ones before it; it is first in line next time
                    logger.error(
                        "spool %s: batch %d (%d readings) is damaged, dropped: %s", self.path, row_id, count, exc
                    )
                    self._set(await self._call(lambda row_id=row_id: self._store.discard(row_id)))  # type: ignore[misc]
                    break
                readings += decoded
                if first_seq is not None:
                    seqs += range(first_seq, first_seq + len(decoded))
                last_id = row_id
            if last_id is not None:
                return SpooledRun(last_id, readings, self._origin(rows[0][3], seqs, len(readings)))

    def _origin(self, producer: str | None, seqs: list[int], readings: int) -> Origin | None:
        if producer is None or len(seqs) != readings:
            return None
        try:
            return Origin(producer, tuple(seqs))
        except ValueError:  # a damaged row: publish it without dedupe rather than not at all
            logger.error("spool %s: a batch's origin %r is damaged; publishing it without one", self.path, producer)
            return None

    async def delete_through(self, last_id: int, published: int | None = None) -> None:
        """Forget every batch up to and including `last_id` (they reached the broker)."""
        self._set(await self._call(lambda: self._store.delete_through(last_id, published)))

    async def aclose(self) -> None:
        await self._call(self._store.close)
        self._executor.shutdown()
        os.close(self._lock_fd)

    async def __aenter__(self) -> Spool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
