"""A dead ingest worker must not leave its tags looking live: SIGKILL a real `wellstream ingest`, and
every tag it fed turns UNCERTAIN stale on the gateway (on /latest and on an open stream), decided
by the gateway from the worker's lease in Redis, though nothing was published for those tags."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import anyio
import httpx
import pytest

from app.gateway.leasesweep import SWEEP_S
from app.ingest.worker import LEASE_TTL_S
from tests.conftest import ingest_worker, make_settings, running_gateway
from tests.prometheus import parse_samples, value
from tests.sse_client import SSEReader

pytestmark = pytest.mark.anyio

TAGS = {"tubing_pressure", "casing_pressure", "flow_rate", "temperature"}  # the simulator's

SITE = """
[tenants.acme]
wells = ["well-01"]

[[connections]]
protocol = "simulator"
id = "sim"
tenant = "acme"
wells = ["well-01"]
interval_s = 0.2
seed = 7
"""


async def test_a_killed_worker_s_tags_turn_stale_on_the_gateway_and_come_back_with_a_new_worker(
    tmp_path: Path, redis_url: str, secret: str, token
) -> None:
    site = tmp_path / "site.toml"
    site.write_text(SITE)
    headers = {"Authorization": f"Bearer {token('acme')}"}
    with anyio.fail_after(60):
        settings = make_settings(secret, redis_url=redis_url, wells={})
        async with running_gateway(settings) as gateway, httpx.AsyncClient(timeout=20) as client:
            latest_url = f"{gateway.url}/tenants/acme/wells/well-01/latest"

            async def latest() -> dict[str, dict[str, object]]:
                response = await client.get(latest_url, headers=headers)
                return {r["tagName"]: r for r in response.json()["readings"]} if response.status_code == 200 else {}

            async def all_tags(predicate: object) -> None:
                while True:
                    now = await latest()
                    if set(now) == TAGS and all(predicate(r) for r in now.values()):  # type: ignore[operator]
                        return
                    await asyncio.sleep(0.05)

            async with ingest_worker(site, redis_url, tmp_path / "first") as first:
                await all_tags(lambda r: r["quality"] != "UNCERTAIN" or r.get("reason") != "stale")
                async with client.stream("GET", f"{gateway.url}/tenants/acme/stream", headers=headers) as response:
                    assert response.status_code == 200
                    events = SSEReader(response)
                    await events.next_event("snapshot")
                    before = await latest()
                    first.kill()
                    killed_at = time.monotonic()
                    await first.wait()

                    stale: dict[str, dict[str, object]] = {}
                    last: dict[str, dict[str, object]] = dict(before)
                    while len(stale) < len([r for r in before.values() if r["quality"] != "BAD"]):
                        reading = (await events.next_event("reading")).json()
                        if reading.get("reason") == "stale":
                            stale[reading["tagName"]] = reading
                        else:  # published before the kill, arriving now
                            last[reading["tagName"]] = reading
                    waited = time.monotonic() - killed_at
            print(f"stale on the stream {waited:.2f} s after SIGKILL (lease {LEASE_TTL_S} s, sweep every {SWEEP_S} s)")
            after = await latest()
            for tag, reading in after.items():
                if last[tag]["quality"] == "BAD":
                    assert reading == last[tag], "BAD already says more than stale"
                    continue
                assert stale[tag] == reading, "the stream and /latest say the same"
                # The last value with its own timestamp: as old as it was, not a new measurement.
                assert reading == {**last[tag], "quality": "UNCERTAIN", "reason": "stale"}
            metrics = parse_samples((await client.get(f"{gateway.url}/metrics")).text)
            assert value(metrics, "wellstream_stale_marked_total") == len(stale), "counted once, by the one gateway"

            async with ingest_worker(site, redis_url, tmp_path / "second"):
                await all_tags(lambda r: r.get("reason") != "stale")
