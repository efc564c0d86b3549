"""An ingest worker's /metrics: readings by protocol and quality, and the spool through a Redis outage."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.conftest import ROOT, RedisServer, free_port, ingest_command, ingest_env
from tests.prometheus import Samples, key, parse_samples

SITE = """
[tenants.acme]
wells = ["well-01", "well-02"]

[[connections]]
protocol = "simulator"
id = "sim"
tenant = "acme"
wells = ["well-01", "well-02"]
interval_s = 0.05
"""


def scrape(port: int) -> Samples:
    return parse_samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)


def eventually(port: int, check: Callable[[Samples], bool]) -> Samples:
    deadline = time.monotonic() + 20
    while True:
        try:
            samples = scrape(port)
            if check(samples):
                return samples
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the metric never got there"
        time.sleep(0.05)


def test_ingest_metrics_count_readings_and_follow_the_spool_through_an_outage(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    site = tmp_path / "site.toml"
    site.write_text(SITE)
    port = free_port()
    env = ingest_env(
        own_redis.url,
        tmp_path / "spool.sqlite3",
        WELLSTREAM_REDIS__TIMEOUT_S="1",
        WELLSTREAM_SPOOL__MAX_READINGS="200",  # small, so the outage hits the bound
    )
    command = ingest_command(site, "--metrics-port", str(port))
    worker = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    try:
        good = key("wellstream_ingest_readings_total", connection="sim", protocol="simulator", quality="GOOD")
        first = eventually(port, lambda m: m.get(good, 0) > 20 and m[key("wellstream_ingest_published_total")] > 0)
        assert first[key("wellstream_ingest_connected", connection="sim", protocol="simulator")] == 1
        assert first[key("wellstream_spool_depth_readings")] == 0

        own_redis.kill()
        down = eventually(port, lambda m: m[key("wellstream_spool_dropped_total")] > 0)
        assert down[key("wellstream_spool_spooled_total")] > 200
        assert 0 < down[key("wellstream_spool_depth_readings")] <= 200 + 40  # one batch may overshoot

        own_redis.start()
        back = eventually(port, lambda m: m[key("wellstream_spool_depth_readings")] == 0)
        assert back[key("wellstream_spool_drained_total")] > 0
        assert back[key("wellstream_ingest_published_total")] > first[key("wellstream_ingest_published_total")]
        assert back[key("wellstream_ingest_lost_total")] == 0
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(15)
        finally:
            if worker.poll() is None:
                worker.kill()
    assert worker.returncode == 0
