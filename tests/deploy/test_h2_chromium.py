"""One Chromium page's per-well EventSources over one HTTP/2 connection to `wellstream serve --hypercorn-config`
(config/hypercorn.toml, TLS), readings published through the real broker on Redis; then SIGTERM.

Stock Hypercorn 0.18 froze such a connection from about the 101st stream: Chromium chains every request
under the one before in RFC 7540 priorities, Hypercorn's priority tree refuses a chain over 100 deep, and
the connection was left open with nothing reading or writing it, which also kept a SIGTERM from ever
finishing (app/gateway/server.py, StreamingH2Protocol).

No timed assertions: every wait is for what the page shows or the process does, under an overall bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest
from playwright.async_api import async_playwright

from app.gateway.devcert import DevCert
from app.streams.redis import connect_redis
from app.streams.seams import Broker
from tests.dashboard.conftest import CHROMIUM, CHROMIUM_FLAGS
from tests.deploy.test_http2 import established_connections, tls_gateway
from tests.factories import make_reading

pytestmark = pytest.mark.anyio

# Chromium never has more than 256 streams open on one HTTP/2 connection, whatever the server allows
# (kMaxConcurrentStreamLimit in net/spdy/spdy_session.cc), and holds further requests back until one
# ends, which an EventSource does not: 250 is as many wells as one page can stream from one origin,
# with room left for the page's other requests.
WELLS = [f"c{n:03d}" for n in range(250)]
PUBLISH_EVERY_S = 0.3
# Every stream must receive more readings in each of these rounds, ROUND_S apart: still flowing ten
# seconds on, where stock Hypercorn froze a connection for good within a second or two.
GROWTH_ROUNDS, ROUND_S = 5, 2.0
# The gateway's own bound on a shutdown: graceful_timeout (stream.shutdown_grace_s, 1 s in tls_gateway,
# + 2 s), then connections still open are cut and it exits; plus slack for a shared machine.
EXIT_BOUND_S = 1 + 2 + 1 + 6

SIGN_IN = """async ([token]) =>
    (await fetch("/auth/session", {method: "POST", headers: {Authorization: `Bearer ${token}`}})).status"""
OPEN_STREAMS = """([wells]) => {
    window.readings = {};
    for (const well of wells) {
        window.readings[well] = 0;
        const source = new EventSource(`/tenants/acme/wells/${well}/stream`);
        source.addEventListener("reading", () => { window.readings[well] += 1; });
    }
}"""
COUNTS = "([wells]) => wells.map((well) => window.readings[well])"
ALL_ABOVE = "([wells, counts]) => wells.every((well, n) => window.readings[well] > counts[n])"


@contextlib.asynccontextmanager
async def publishing(broker: Broker, wells: list[str]) -> AsyncIterator[None]:
    """A reading for every well every PUBLISH_EVERY_S, through the broker, until the block ends."""

    async def publish_forever() -> None:
        for n in range(1_000_000):
            await broker.log.publish([make_reading(float(n), well=well) for well in wells])
            await asyncio.sleep(PUBLISH_EVERY_S)

    task = asyncio.create_task(publish_forever())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_250_eventsources_of_one_chromium_page_flow_over_one_connection_and_sigterm_then_exits(
    secret: str, token, redis_url: str, dev_cert: DevCert, tmp_path: Path
) -> None:
    with anyio.fail_after(60):
        async with (
            tls_gateway(secret, redis_url, dev_cert, tmp_path, WELLS) as (https, _, served),
            connect_redis(redis_url) as broker,
            publishing(broker, WELLS),
            async_playwright() as playwright,
        ):
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            try:
                page = await browser.new_page()
                await page.goto(f"{https}/healthz")
                assert await page.evaluate(SIGN_IN, [token("acme")]) == 200  # the session cookie
                await page.evaluate(OPEN_STREAMS, [WELLS])

                # Every stream receives readings...
                await page.wait_for_function(ALL_ABOVE, arg=[WELLS, [0] * len(WELLS)], timeout=30_000)
                assert await page.evaluate("performance.getEntriesByType('navigation')[0].nextHopProtocol") == "h2"
                assert established_connections(httpx.URL(https).port or 443) == 1
                # ...and every one keeps receiving them.
                for _ in range(GROWTH_ROUNDS):
                    counts = await page.evaluate(COUNTS, [WELLS])
                    await asyncio.sleep(ROUND_S)
                    await page.wait_for_function(ALL_ABOVE, arg=[WELLS, counts], timeout=15_000)

                # SIGTERM with the page still connected: the streams are told goodbye and the process exits.
                served.process.send_signal(signal.SIGTERM)
                with anyio.fail_after(EXIT_BOUND_S):
                    assert await served.process.wait() == 0
            finally:
                await browser.close()
