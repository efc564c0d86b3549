"""The ingestion spool on a real SQLite file, and the publisher spooling through a real Redis outage."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from pathlib import Path

import anyio
import pytest

from app.errors import SpoolError
from app.ingest.publisher import Publisher
from app.ingest.spool import Spool
from app.models import ZERO_ID, Origin, Reading, Topic
from app.streams.redis import connect_redis
from tests.conftest import ROOT, RedisServer, wait_until
from tests.factories import history
from tests.factories import make_reading as reading

pytestmark = pytest.mark.anyio

TOPIC = Topic("acme", "w1")


def batch(start: int, count: int) -> list[Reading]:
    return [reading(float(v)) for v in range(start, start + count)]


def values(readings: list[Reading]) -> list[float | None]:
    return [r.value for r in readings]


async def everything(spool: Spool) -> list[float | None]:
    run = await spool.peek(1_000_000)
    return [] if run is None else values(run.readings)


async def test_batches_come_back_oldest_first_and_go_once_deleted(tmp_path: Path) -> None:
    async with await Spool.open(tmp_path / "spool" / "s.sqlite3") as spool:
        for start in (0, 3, 6):
            await spool.append(batch(start, 3))
        assert (spool.batches, spool.readings) == (3, 9)
        first = await spool.peek(4)  # whole batches only: the second would pass 4
        assert first is not None
        assert values(first.readings) == [0.0, 1.0, 2.0]
        assert first.readings[0] == reading(0.0), "a reading comes back exactly as it went in"
        two = await spool.peek(6)
        assert two is not None
        assert values(two.readings) == [float(v) for v in range(6)]
        await spool.delete_through(two.last_id)
        assert (spool.batches, spool.readings) == (1, 3)
        assert await everything(spool) == [6.0, 7.0, 8.0]
        await spool.append(batch(9, 2))
        assert await everything(spool) == [float(v) for v in range(6, 11)], "new batches after an emptied head"


async def test_a_big_batch_is_handed_out_whole(tmp_path: Path) -> None:
    async with await Spool.open(tmp_path / "s.sqlite3") as spool:
        await spool.append(batch(0, 10))
        run = await spool.peek(2)
        assert run is not None
        assert len(run.readings) == 10


async def test_when_full_the_oldest_batches_are_dropped_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="app.ingest.spool")
    async with await Spool.open(tmp_path / "s.sqlite3", max_readings=10) as spool:
        for start in range(0, 16, 4):
            await spool.append(batch(start, 4))
        assert await everything(spool) == [float(v) for v in range(8, 16)]
        assert (spool.dropped, spool.dropped_batches, spool.readings, spool.batches) == (8, 2, 8, 2)
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "full" in r.getMessage()]
    assert len(warnings) == 1, "logged once, not once per batch"
    assert "dropped the oldest" in warnings[0].getMessage()


async def test_one_big_batch_can_push_out_many_small_ones(tmp_path: Path) -> None:
    async with await Spool.open(tmp_path / "s.sqlite3", max_readings=600) as spool:
        for v in range(600):
            await spool.append(batch(v, 1))
        await spool.append(batch(1000, 300))
        assert await everything(spool) == [float(v) for v in range(300, 600)] + [float(v) for v in range(1000, 1300)]
        assert (spool.dropped_batches, spool.batches) == (300, 301)


async def test_the_byte_bound_keeps_the_newest_batch_even_if_it_alone_is_too_big(tmp_path: Path) -> None:
    def size(readings: list[Reading]) -> int:
        return len(b"[" + b",".join(r.to_json() for r in readings) + b"]")

    bound = size(batch(5, 5)) + size(batch(10, 5))
    async with await Spool.open(tmp_path / "s.sqlite3", max_bytes=bound) as spool:
        for start in range(0, 15, 5):
            await spool.append(batch(start, 5))
        assert await everything(spool) == [float(v) for v in range(5, 15)]
        assert spool.bytes == bound
        await spool.append(batch(100, 50))
        assert await everything(spool) == [float(v) for v in range(100, 150)]
        assert spool.dropped == 15


async def test_contents_and_counts_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    async with await Spool.open(path) as spool:
        await spool.append(batch(0, 5))
        await spool.append(batch(5, 5))
        size = spool.bytes
    async with await Spool.open(path) as spool:
        assert (spool.batches, spool.readings, spool.bytes) == (2, 10, size)
        assert await everything(spool) == [float(v) for v in range(10)]


async def test_a_second_worker_cannot_open_a_spool_in_use(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    async with await Spool.open(path):
        with pytest.raises(SpoolError, match="in use by another worker"):
            await Spool.open(path)
    async with await Spool.open(path):
        pass  # free again once closed


async def test_an_unwritable_path_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(SpoolError, match="cannot open spool"):
        await Spool.open(tmp_path / "file" / "s.sqlite3")


async def test_a_damaged_batch_is_dropped_and_the_rest_still_drains(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    async with await Spool.open(path) as spool:
        await spool.append(batch(0, 2))
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO batches (readings, bytes, payload) VALUES (1, 5, x'7b7b7b7b7b')")
        db.execute("INSERT INTO batches (readings, bytes, payload) VALUES (1, 2, '[{\"value\": 1}]')")
    db.close()
    async with await Spool.open(path) as spool:
        await spool.append(batch(2, 2))
        first = await spool.peek(100)
        assert first is not None
        assert values(first.readings) == [0.0, 1.0], "the good batches before a damaged one"
        await spool.delete_through(first.last_id)
        rest = await spool.peek(100)
        assert rest is not None
        assert values(rest.readings) == [2.0, 3.0]
        assert (spool.dropped, spool.dropped_batches) == (2, 2)


# Appends numbered batches of 10 and prints each number once `append` returned (acknowledged).
_APPENDER = """
import asyncio, sys
from pathlib import Path
from app.ingest.spool import Spool
from tests.factories import make_reading

async def main():
    spool = await Spool.open(Path(sys.argv[1]))
    n = 0
    while True:
        await spool.append([make_reading(float(n * 10 + i)) for i in range(10)])
        print(n, flush=True)
        n += 1

asyncio.run(main())
"""


async def test_a_process_killed_right_after_an_acknowledged_append_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _APPENDER, str(path), cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        acknowledged = -1
        with anyio.fail_after(20):
            while acknowledged < 50:
                line = await process.stdout.readline()
                assert line, "the appender died"
                acknowledged = int(line)
        process.kill()  # SIGKILL: no close, no checkpoint, the lock held
        await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    async with await Spool.open(path) as spool:
        found = await everything(spool)
    assert len(found) >= (acknowledged + 1) * 10, "every acknowledged batch is there"
    assert found == [float(v) for v in range(len(found))], "in order, whole batches, nothing else"


async def test_the_publisher_spools_through_an_outage_and_drains_in_order(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    with anyio.fail_after(30):
        async with (
            connect_redis(own_redis.url) as broker,
            await Spool.open(tmp_path / "s.sqlite3") as spool,
        ):
            async with Publisher(broker.log, max_batch=50, max_delay_s=0.005, spool=spool) as publisher:
                await publisher.submit(batch(0, 100))
                await wait_until(lambda: publisher.counters.published >= 100)
                own_redis.stop()
                for start in range(100, 300, 10):  # never waits on the dead Redis
                    await publisher.submit(batch(start, 10))
                await wait_until(lambda: publisher.counters.spooled >= 200)
                own_redis.start()
                await publisher.submit(batch(300, 50))
                await wait_until(lambda: publisher.counters.published >= 350)
                assert spool.readings == 0
            found = await history(broker.log, TOPIC, ZERO_ID, 1000)
    assert [Reading.from_json(e.data).value for e in found.events] == [float(v) for v in range(350)]
    assert publisher.counters.spooled >= 200, "what arrived during the outage went to the spool"
    assert (publisher.counters.drained, publisher.counters.dropped) == (publisher.counters.spooled, 0)


async def test_exit_with_redis_down_spools_what_is_pending_and_the_next_start_drains_it_first(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    path = tmp_path / "s.sqlite3"
    with anyio.fail_after(30):
        async with connect_redis(own_redis.url) as broker:
            own_redis.stop()
            async with await Spool.open(path) as spool:
                async with Publisher(broker.log, max_batch=50, max_delay_s=1, spool=spool) as publisher:
                    await publisher.submit(batch(0, 120))  # still pending (1 s batching) at exit
                assert (spool.readings, publisher.counters.spooled, publisher.counters.published) == (120, 120, 0)
            own_redis.start()
            async with await Spool.open(path) as spool:
                async with Publisher(broker.log, max_batch=50, spool=spool) as publisher:
                    await publisher.submit(batch(120, 30))
                assert spool.readings == 0
            found = await history(broker.log, TOPIC, ZERO_ID, 1000)
    assert [Reading.from_json(e.data).value for e in found.events] == [float(v) for v in range(150)]
    assert publisher.counters.published == 150
    assert publisher.counters.drained >= 120


@pytest.mark.parametrize(
    "redis_timeout_s",
    [
        # Shorter freeze than the client's timeout: the publish is still waited for, not duplicated.
        pytest.param(5.0, id="client-waits"),
        # The client gives up while its script waits in the frozen Redis, which runs it on SIGCONT;
        # the spooled copy carries the same origin, and Redis skips it.
        pytest.param(0.3, id="client-gives-up"),
    ],
)
async def test_a_frozen_redis_gets_every_batch_once_and_in_order(
    tmp_path: Path, own_redis: RedisServer, redis_timeout_s: float
) -> None:
    # SIGSTOP: connections stay open and nothing answers, so a publish that timed out may
    # still be applied when Redis wakes; its spooled copy must then not land again.
    with anyio.fail_after(30):
        async with (
            connect_redis(own_redis.url, timeout_s=redis_timeout_s) as broker,
            await Spool.open(tmp_path / "s.sqlite3") as spool,
        ):
            publisher = Publisher(broker.log, max_batch=50, spool=spool, publish_timeout_s=0.2)
            async with publisher:
                await publisher.submit(batch(0, 20))
                await wait_until(lambda: publisher.counters.published >= 20)
                own_redis.freeze()
                for start in range(20, 200, 5):
                    await publisher.submit(batch(start, 5))
                    await asyncio.sleep(0.02)  # an adapter's pace, so batches stay small
                await wait_until(lambda: spool.readings >= 150)
                own_redis.thaw()
                await wait_until(lambda: publisher.counters.published >= 200 and spool.readings == 0)
            found = await history(broker.log, TOPIC, ZERO_ID, 1000)
    assert [Reading.from_json(e.data).value for e in found.events] == [float(v) for v in range(200)]
    assert publisher.counters.drained == publisher.counters.spooled >= 150


async def test_runs_keep_one_producer_and_its_seqs(tmp_path: Path) -> None:
    async with await Spool.open(tmp_path / "s.sqlite3") as spool:
        await spool.append(batch(0, 2), Origin("aaaaaaaa", (1, 2)))
        await spool.append(batch(2, 2), Origin("aaaaaaaa", (3, 4)))
        await spool.append(batch(4, 1), Origin("bbbbbbbb", (1,)))
        first = await spool.peek(100)
        assert first is not None
        assert first.origin == Origin("aaaaaaaa", (1, 2, 3, 4))
        assert values(first.readings) == [0.0, 1.0, 2.0, 3.0]
        await spool.delete_through(first.last_id)
        second = await spool.peek(100)
        assert second is not None
        assert second.origin == Origin("bbbbbbbb", (1,))


async def test_a_full_disk_holds_readings_in_memory_until_the_spool_takes_them_again(
    tmp_path: Path, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("ERROR", logger="app.ingest.publisher")
    with anyio.fail_after(30):
        async with (
            connect_redis(own_redis.url) as broker,
            await Spool.open(tmp_path / "s.sqlite3") as spool,
        ):

            def limit_pages(pages: int | None) -> None:  # SQLite's own "disk is full"; on the spool's thread
                db = spool._store._db
                db.execute(f"PRAGMA max_page_count = {pages or db.execute('PRAGMA page_count').fetchone()[0]}")

            async with Publisher(broker.log, max_batch=50, spool=spool) as publisher:
                own_redis.stop()
                await spool._call(lambda: limit_pages(None))
                for start in range(0, 500, 50):
                    await publisher.submit(batch(start, 50))
                await wait_until(lambda: any("cannot spool" in r.getMessage() for r in caplog.records))
                assert publisher.counters.spooled < 500
                await spool._call(lambda: limit_pages(1_000_000))
                await wait_until(lambda: publisher.counters.spooled == 500)
                own_redis.start()
                await wait_until(lambda: publisher.counters.published == 500)
            found = await history(broker.log, TOPIC, ZERO_ID, 1000)
    assert [Reading.from_json(e.data).value for e in found.events] == [float(v) for v in range(500)]
    assert publisher.counters.lost == 0


async def test_readings_evicted_while_their_publish_ran_are_not_counted_as_dropped(tmp_path: Path) -> None:
    async with await Spool.open(tmp_path / "s.sqlite3", max_readings=10) as spool:
        await spool.append(batch(0, 5))
        await spool.append(batch(5, 5))
        run = await spool.peek(100)  # the drain takes both and publishes them...
        assert run is not None
        await spool.append(batch(10, 5))  # ...while the bound evicts the oldest
        assert spool.dropped == 5
        await spool.delete_through(run.last_id, published=len(run.readings))  # the publish succeeded
        assert spool.dropped == 0, "they reached Redis: not lost"
        assert await everything(spool) == [float(v) for v in range(10, 15)]
