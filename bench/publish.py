"""Paced publisher through wellstream's own broker code.

    python -m bench.publish --redis-url URL --tenant T --wells W --rate R --duration S

Wells are `well-001` … `well-<W>`; each reading's `timestamp` is its publish time (µs), which
the load generator turns into device-to-client latency, and its `value` is the well's
sequence number. The script registers wells exactly as ingestion does (the publish script's
SADD), so the gateway serves them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

from app.models import Reading, utc_now_iso
from app.streams.redis import connect_redis

TICK_S = 0.01


def well_names(count: int) -> list[str]:
    return [f"well-{n:03d}" for n in range(1, count + 1)]


@dataclass
class PublishStats:
    published: int
    duration_s: float
    max_lag_ms: float
    per_well: int


Sink = Callable[[list[Reading]], Awaitable[object]]


async def publish(redis_url: str, tenant: str, wells: int, rate: float, duration_s: float) -> PublishStats:
    """Publish `rate` readings/s spread evenly over `wells`, for `duration_s`, in 10 ms batches."""
    async with connect_redis(redis_url) as broker:
        return await paced(broker.log.publish, tenant, wells, rate, duration_s)


async def paced(sink: Sink, tenant: str, wells: int, rate: float, duration_s: float) -> PublishStats:
    """The one pacing loop for every system's publisher (bench/nchan.py's too), so each gets the
    same readings at the same moments: `rate` readings/s over `wells`, handed to `sink` every 10 ms,
    each batch awaited before the next (a slow sink shows as lag, then as larger batches)."""
    names = well_names(wells)
    sequence = 0
    max_lag = 0.0
    loop = asyncio.get_running_loop()
    start = loop.time()
    tick = 0
    while True:
        tick += 1
        due_at = start + tick * TICK_S
        await asyncio.sleep(max(0.0, due_at - loop.time()))
        now = loop.time()
        max_lag = max(max_lag, now - due_at)
        elapsed = min(now - start, duration_s)
        target = int(rate * elapsed)
        if target > sequence:
            stamp = utc_now_iso()
            await sink([_reading(tenant, names[i % wells], i // wells, stamp) for i in range(sequence, target)])
            sequence = target
        if elapsed >= duration_s:
            break
    return PublishStats(sequence, duration_s, round(max_lag * 1000, 2), sequence // wells)


def _reading(tenant: str, well: str, seq: int, stamp: str) -> Reading:
    return Reading(
        tenant_id=tenant,
        well_id=well,
        tag_name=f"tag{seq % 4}",
        value=float(seq),
        quality="GOOD",
        timestamp=stamp,
        source_protocol="simulator",
        connection_id="bench",
        unit="psi",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.publish", description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--tenant", default="bench")
    parser.add_argument("--wells", type=int, default=100)
    parser.add_argument("--rate", type=float, default=1000, help="readings per second, all wells together")
    parser.add_argument("--duration", type=float, default=10, help="seconds")
    args = parser.parse_args(argv)
    stats = asyncio.run(publish(args.redis_url, args.tenant, args.wells, args.rate, args.duration))
    json.dump(asdict(stats), sys.stdout)
    print()


if __name__ == "__main__":
    main()
