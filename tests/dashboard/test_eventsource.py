"""A browser's own EventSource (Chromium) refused for now comes back by itself.

EventSource closes for good on any status but 200, so a gateway that answered it 503 while Redis
was out of reach left the page dead until a reload. Real gateway process, real Redis (frozen with
SIGSTOP, then thawed).
"""

from __future__ import annotations

import anyio
import pytest
from playwright.async_api import Browser

from app.streams.redis import connect_redis
from tests.conftest import RedisServer
from tests.dashboard.conftest import WAIT_MS, open_page, reading
from tests.dashboard.servers import Gateway

pytestmark = pytest.mark.anyio

SIGN_IN = """async (token) => {
    const signedIn = await fetch('/auth/session', {
        method: 'POST', credentials: 'same-origin', headers: { Authorization: `Bearer ${token}` },
    });
    if (!signedIn.ok) throw new Error(`sign-in: ${signedIn.status}`);
}"""
OPEN = """() => {
    window.log = [];
    const source = new EventSource('/tenants/acme/wells/w1/stream');
    for (const kind of ['refused', 'snapshot', 'reading']) {
        source.addEventListener(kind, (e) => window.log.push({ kind, data: JSON.parse(e.data) }));
    }
    source.onerror = () => window.log.push({ kind: 'error', state: source.readyState });
    window.source = source;
}"""
SAW = "(kind) => window.log.some((e) => e.kind === kind)"


async def test_an_eventsource_refused_while_redis_is_away_comes_back_by_itself(
    browser: Browser, own_redis: RedisServer, secret: str, token
) -> None:
    gateway = Gateway(secret, own_redis.url, {"acme": ["w1"]}, WELLSTREAM_REDIS__TIMEOUT_S="0.5")
    with anyio.fail_after(60):
        async with gateway.running(), connect_redis(own_redis.url) as publisher:
            await publisher.log.publish([reading("w1", "p", 7.0)])
            page = await open_page(browser)
            await page.goto(f"{gateway.url}/healthz")  # the gateway's origin, no dashboard opening streams
            await page.evaluate(SIGN_IN, token("acme"))  # the session cookie, which EventSource sends
            own_redis.freeze()
            try:
                await page.evaluate(OPEN)
                await page.wait_for_function(SAW, arg="refused", timeout=WAIT_MS)
            finally:
                own_redis.thaw()
            log = await page.evaluate("window.log")
            refused = next(e for e in log if e["kind"] == "refused")
            assert refused["data"]["status"] == 503
            await page.wait_for_function(SAW, arg="error", timeout=WAIT_MS)  # the refusal's end
            errors = [e for e in await page.evaluate("window.log") if e["kind"] == "error"]
            assert errors[0]["state"] == 0, "CONNECTING: the EventSource will try again (2 would be CLOSED for good)"
            # Its own retry, after the refusal's `retry:` (Retry-After 2 s, spread to at most 3 s).
            await page.wait_for_function(SAW, arg="snapshot", timeout=20_000)
            snapshot = next(e for e in await page.evaluate("window.log") if e["kind"] == "snapshot")
            assert [r["value"] for r in snapshot["data"]["readings"]] == [7.0]
            await publisher.log.publish([reading("w1", "p", 8.0)])
            await page.wait_for_function(SAW, arg="reading", timeout=WAIT_MS)
            assert await page.evaluate("window.source.readyState") == 1
            assert page.errors == []  # type: ignore[attr-defined]
