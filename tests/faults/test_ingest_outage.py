"""Issue 6, ingestion: Redis SIGKILLed for 10 s under a running `wellstream ingest`, with and without
the worker itself SIGKILLed mid-outage. Nothing the worker accepted (or acknowledged to its spool)
may be missing from the stream log, duplicated or out of order.

The simulator runs with a fixed seed, so the values of every tag are a known sequence: a
well's log must be exactly a prefix of it (per worker run), which shows a gap, a duplicate or
a swap wherever it happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import orjson
import pytest

from app.adapters.simulator import SimulatorAdapter
from app.models import Reading, Topic
from app.streams.redis.keys import log_key
from tests.conftest import ROOT, RedisServer, ingest_command, ingest_env, wait_until

pytestmark = pytest.mark.anyio

WELLS = ["w1", "w2"]
SEED = 7
INTERVAL_S = 0.05  # 2 wells x 4 tags every 50 ms: 160 readings/s
OUTAGE_S = 10


def site_file(tmp_path: Path, connection: str) -> Path:
    path = tmp_path / f"site-{connection}.toml"
    path.write_text(
        f"""
[tenants.acme]
wells = {orjson.dumps(WELLS).decode()}

[[connections]]
protocol = "simulator"
id = "{connection}"
tenant = "acme"
wells = {orjson.dumps(WELLS).decode()}
interval_s = {INTERVAL_S}
seed = {SEED}
"""
    )
    return path


@contextlib.asynccontextmanager
async def ingest_worker(
    tmp_path: Path, redis_url: str, spool: Path, connection: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`wellstream ingest` as a real child process; its JSON log lines go to `<connection>.log`."""
    env = ingest_env(redis_url, spool)
    with (tmp_path / f"{connection}.log").open("wb") as log:
        command = ingest_command(site_file(tmp_path, connection))
        process = await asyncio.create_subprocess_exec(*command, cwd=ROOT, env=env, stderr=log)
        try:
            yield process
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


def log_line(tmp_path: Path, connection: str, event: str) -> dict[str, object]:
    for raw in (tmp_path / f"{connection}.log").read_bytes().splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            line = orjson.loads(raw)
            if isinstance(line, dict) and line.get("event") == event:
                return line
    raise AssertionError(f"no {event} line in the log of {connection}")


def stream_log(server: RedisServer, well: str) -> list[Reading]:
    with server.client() as client:
        entries = client.xrange(log_key(Topic("acme", well)))
    return [Reading.from_json(fields[b"r"]) for _, fields in entries]


def spooled(path: Path) -> list[Reading]:
    """What the spool file holds, read the way any SQLite client would (the worker may be writing)."""
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(path, timeout=5)) as db:
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'batches'").fetchone() is None:
            return []  # the worker is still creating it
        rows = db.execute("SELECT payload FROM batches ORDER BY id").fetchall()
    return [Reading.model_validate(raw) for (payload,) in rows for raw in orjson.loads(payload)]


def expected(well: str, count: int) -> list[tuple[str, float | None, str]]:
    """The first `count` readings of `well` the seeded simulator produces: (tag, value, quality)."""
    simulator = SimulatorAdapter([("acme", w) for w in WELLS], INTERVAL_S, name="x", seed=SEED)
    found: list[tuple[str, float | None, str]] = []
    while len(found) < count:
        found += [key(r) for r in simulator.sample() if r.well_id == well]
    return found[:count]


def key(reading: Reading) -> tuple[str, float | None, str]:
    return (reading.tag_name, reading.value, reading.quality)


def assert_whole_prefix(readings: list[Reading], well: str) -> None:
    """`readings` are exactly the simulator's first ones for `well`, whole samples (every tag), in order."""
    assert len(readings) % 4 == 0, f"{well}: a sample split ({len(readings)} readings)"
    got = [key(r) for r in readings]
    want = expected(well, len(got))
    first_difference = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None)
    assert first_difference is None, f"{well}: reading {first_difference} of {len(got)} is missing or out of order"


async def wait_for_readings(server: RedisServer, count: int) -> None:
    await wait_until(lambda: all(len(stream_log(server, well)) >= count for well in WELLS), interval_s=0.05)


async def test_redis_down_for_10_s_every_reading_arrives_in_order_once_it_is_back(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    spool = tmp_path / "spool" / "ingest.sqlite3"
    with anyio.fail_after(60):
        async with ingest_worker(tmp_path, own_redis.url, spool, "sim") as worker:
            await wait_for_readings(own_redis, 40)
            own_redis.kill()
            await asyncio.sleep(OUTAGE_S)  # the outage itself, not a wait for something
            during = spooled(spool)
            own_redis.start()
            await wait_until(lambda: not spooled(spool), interval_s=0.05)
            await wait_for_readings(own_redis, len(stream_log(own_redis, "w1")) + 40)  # live again
            worker.terminate()
            assert await worker.wait() == 0

    stopped = log_line(tmp_path, "sim", "ingest-stopped")
    logs = {well: stream_log(own_redis, well) for well in WELLS}
    for well, readings in logs.items():
        assert_whole_prefix(readings, well)
    assert len(logs["w1"]) == len(logs["w2"])
    assert sum(len(readings) for readings in logs.values()) == stopped["accepted"], "everything accepted is there"
    assert len(during) >= 8 * OUTAGE_S, "the outage's readings were spooled"
    stored = {(r.well_id, r.tag_name, r.timestamp) for readings in logs.values() for r in readings}
    assert {(r.well_id, r.tag_name, r.timestamp) for r in during} <= stored, "the outage's readings are in the log"
    assert stopped["spooled"] == stopped["drained"]
    assert isinstance(stopped["spooled"], int)
    assert stopped["spooled"] >= len(during)
    assert (stopped["dropped"], stopped["spool_depth"]) == (0, 0)


async def test_the_worker_sigkilled_mid_outage_loses_nothing_it_had_spooled(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    spool = tmp_path / "spool" / "ingest.sqlite3"
    with anyio.fail_after(90):
        async with ingest_worker(tmp_path, own_redis.url, spool, "first") as first:
            await wait_for_readings(own_redis, 40)
            down_at = time.monotonic()
            own_redis.kill()
            await wait_until(lambda: len(spooled(spool)) >= 400, interval_s=0.05)  # some seconds of outage
            first.kill()
            await first.wait()
        acknowledged = spooled(spool)  # exactly what the killed worker had committed

        async with ingest_worker(tmp_path, own_redis.url, spool, "second") as second:
            await wait_until(lambda: len(spooled(spool)) > len(acknowledged), interval_s=0.05)
            await asyncio.sleep(max(0.0, down_at + OUTAGE_S - time.monotonic()))  # the rest of the 10 s outage
            own_redis.start()
            await wait_until(lambda: not spooled(spool), interval_s=0.05)
            second.terminate()
            assert await second.wait() == 0

    stopped = log_line(tmp_path, "second", "ingest-stopped")
    assert stopped["dropped"] == 0
    second_total = 0
    for well in WELLS:
        readings = stream_log(own_redis, well)
        runs = [r.connection_id for r in readings]
        cut = runs.count("first")
        assert runs == ["first"] * cut + ["second"] * (len(runs) - cut), "the first run's readings come first"
        before, after = readings[:cut], readings[cut:]
        assert_whole_prefix(before, well)  # no gap and no duplicate up to the kill
        mine = [key(r) for r in acknowledged if r.well_id == well]
        assert mine, "the first worker had spooled readings of every well"
        assert [key(r) for r in before[-len(mine) :]] == mine, "every acknowledged reading, and nothing after it"
        assert_whole_prefix(after, well)  # the second run: from its first sample, complete
        second_total += len(after)
    assert second_total == stopped["accepted"]


async def test_sigterm_while_redis_is_down_spools_what_is_pending_and_exits(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    spool = tmp_path / "spool" / "ingest.sqlite3"
    own_redis.kill()
    with anyio.fail_after(30):
        async with ingest_worker(tmp_path, own_redis.url, spool, "sim") as worker:
            await wait_until(lambda: len(spooled(spool)) >= 80, interval_s=0.05)
            worker.terminate()
            assert await worker.wait() == 0, "exits on its own while Redis is still down"
    stopped = log_line(tmp_path, "sim", "ingest-stopped")
    left = spooled(spool)
    assert stopped["accepted"] == stopped["spooled"] == stopped["spool_depth"] == len(left)
    assert stopped["published"] == 0
    for well in WELLS:
        assert_whole_prefix([r for r in left if r.well_id == well], well)


async def test_a_second_worker_on_the_same_spool_refuses_to_start(tmp_path: Path, own_redis: RedisServer) -> None:
    spool = tmp_path / "spool" / "ingest.sqlite3"
    with anyio.fail_after(30):
        async with ingest_worker(tmp_path, own_redis.url, spool, "first"):
            await wait_until(spool.exists, interval_s=0.05)
            await wait_for_readings(own_redis, 8)  # the first one is up and owns the spool
            async with ingest_worker(tmp_path, own_redis.url, spool, "second") as second:
                assert await second.wait() != 0
    message = (tmp_path / "second.log").read_text()
    assert "is in use by another worker" in message
    assert "WELLSTREAM_SPOOL__PATH" in message
