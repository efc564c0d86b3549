"""The operator dashboard in Debian's Chromium against real gateway processes on Redis.

No timed assertions: every wait is bounded and waits for what the page shows; the assertions
are about content (values, states, words) and order (the ids of the readings received).
"""

from __future__ import annotations

import time

import anyio
import pytest
from playwright.async_api import Browser, expect

from app.streams.redis import connect_redis
from tests.conftest import wait_until
from tests.dashboard.conftest import (
    WAIT_MS,
    assert_no_gap_no_duplicate,
    indicator_states,
    open_page,
    paced_publisher,
    reading,
    row,
    stream_requests,
    tile,
)
from tests.dashboard.proxy import Proxy
from tests.dashboard.servers import Gateway

pytestmark = pytest.mark.anyio


async def test_tiles_show_values_quality_words_stale_and_move_with_the_keyboard(
    browser: Browser, redis_url: str, secret: str, token
) -> None:
    registry = {"acme": ["w1", "w2", "w3"]}
    with anyio.fail_after(45):
        async with (
            Gateway(secret, redis_url, registry).running() as gateway,
            connect_redis(redis_url) as publisher,
        ):
            await publisher.log.publish(
                [reading(well, "p", 12.5) for well in registry["acme"]]
                + [reading(well, "t", 80.25, unit="degC") for well in registry["acme"]]
            )
            page = await open_page(browser)
            await page.goto(f"{gateway.url}/#token={token('acme')}")

            for well in registry["acme"]:
                await expect(row(page, well, "p").locator(".number")).to_have_text("12.5", timeout=WAIT_MS)
                await expect(row(page, well, "p").locator(".unit")).to_have_text("psi")
                await expect(row(page, well, "t").locator(".number")).to_have_text("80.25")
                await expect(row(page, well, "p").locator(".quality")).to_have_text("GOOD")
                await expect(tile(page, well)).to_have_attribute("data-state", "GOOD")
            await expect(page.locator("#indicator")).to_have_attribute("data-state", "Live", timeout=WAIT_MS)
            # The demo's token went into an HttpOnly cookie and out of the address bar.
            assert "token" not in page.url
            cookies = await page.context.cookies()
            assert [(c["name"], c["httpOnly"]) for c in cookies] == [("wellstream_session", True)]
            assert await page.evaluate("wellstream.mode") == "cookie"

            # BAD, UNCERTAIN and STALE (the server's verdict): each a word on the tag and on the tile,
            # not only a colour.
            await publisher.log.publish(
                [
                    reading("w2", "p", None, "BAD"),
                    reading("w1", "t", 81.0, "UNCERTAIN", unit="degC"),
                    reading("w3", "level", 3.5, "UNCERTAIN", unit="m", age_s=600, reason="stale"),
                ]
            )
            await expect(row(page, "w2", "p")).to_have_attribute("data-quality", "BAD", timeout=WAIT_MS)
            await expect(row(page, "w2", "p").locator(".quality")).to_have_text("BAD")
            await expect(row(page, "w2", "p").locator(".number")).to_have_text("\u2014")
            await expect(tile(page, "w2")).to_have_attribute("data-state", "BAD")
            await expect(tile(page, "w2").locator("header .state")).to_have_text("BAD")
            await expect(row(page, "w1", "t").locator(".quality")).to_have_text("UNCERTAIN", timeout=WAIT_MS)
            await expect(tile(page, "w1")).to_have_attribute("data-state", "UNCERTAIN")
            await expect(row(page, "w3", "level")).to_have_attribute("data-stale", "true", timeout=WAIT_MS)
            await expect(row(page, "w3", "level").locator(".quality")).to_have_text("STALE")
            await expect(row(page, "w3", "level").locator(".ago")).to_have_text("10 min")
            await expect(tile(page, "w3")).to_have_attribute("data-state", "STALE")
            await expect(row(page, "w3", "p")).to_have_attribute("data-stale", "false")
            await expect(page.locator("#summary")).to_have_text(
                "3 wells \u00b7 1 BAD \u00b7 1 STALE \u00b7 1 UNCERTAIN"
            )

            # Keyboard: Tab reaches the first tile (after Sign out and the view's controls), arrows
            # and Home/End move along.
            focused = "document.activeElement.dataset.well || document.activeElement.id"
            for expected in ("sign-out", "filter", "sort", "compact", "w1"):
                await page.keyboard.press("Tab")
                assert await page.evaluate(focused) == expected
            await page.keyboard.press("ArrowRight")
            assert await page.evaluate(focused) == "w2"
            await page.keyboard.press("End")
            assert await page.evaluate(focused) == "w3"
            await page.keyboard.press("ArrowLeft")
            assert await page.evaluate(focused) == "w2"
            await page.keyboard.press("Home")
            assert await page.evaluate(focused) == "w1"

            # The browser loses the network: Offline at once; back on it: Live, and new readings show.
            await page.context.set_offline(True)
            await expect(page.locator("#indicator")).to_have_attribute("data-state", "Offline", timeout=WAIT_MS)
            await page.context.set_offline(False)
            await expect(page.locator("#indicator")).to_have_attribute("data-state", "Live", timeout=20_000)
            await publisher.log.publish([reading(well, "p", 13.75) for well in registry["acme"]])
            for well in registry["acme"]:
                await expect(row(page, well, "p").locator(".number")).to_have_text("13.75", timeout=WAIT_MS)
            assert page.errors == []  # type: ignore[attr-defined]


@pytest.mark.parametrize("mode", ["cookie", "ticket"])
async def test_gateway_restart_behind_a_proxy_answering_502_resumes_without_gap_or_duplicate(
    browser: Browser, redis_url: str, secret: str, token, mode: str
) -> None:
    wells = ["w1", "w2"]
    gateway = Gateway(secret, redis_url, {"acme": wells})
    proxy = Proxy(gateway.port)
    fragment = f"token={token('acme')}" + ("&auth=ticket" if mode == "ticket" else "")
    with anyio.fail_after(50):
        async with proxy.running(), gateway.running(), paced_publisher(redis_url, wells, 0.1) as published:
            page = await open_page(browser)
            await page.goto(f"{proxy.url}/#{fragment}")
            await expect(page.locator("#indicator")).to_have_attribute("data-state", "Live", timeout=WAIT_MS)
            assert await page.evaluate("wellstream.mode") == mode
            await page.wait_for_function(
                "() => wellstream.received.filter((r) => r.event === 'reading').length >= 6", timeout=WAIT_MS
            )

            await gateway.stop()
            await expect(page.locator("#indicator")).to_have_attribute("data-state", "Reconnecting", timeout=WAIT_MS)
            # Stay down until the proxy has refused the page at least once: in cookie mode that
            # refusal is the EventSource's own reconnect, which a 502 closes for good.
            refused = b"/stream" if mode == "cookie" else b"/stream-tickets"
            with anyio.fail_after(15):
                await wait_until(lambda: any(refused in line for line in proxy.bad_gateways))
            await gateway.start()

            await expect(page.locator("#indicator")).to_have_attribute("data-state", "Live", timeout=20_000)
            states = await indicator_states(page)
            live = states.index("Live")
            assert states[live:][states[live:].index("Reconnecting") :][-1] == "Live", states

            # More readings after the restart, then stop publishing and wait for the last of them.
            count = {well: len(ids) for well, ids in published.items()}
            with anyio.fail_after(10):
                await wait_until(lambda: all(len(published[well]) >= count[well] + 5 for well in wells))
        last = {well: ids[-1] for well, ids in published.items()}
        for well in wells:
            await page.wait_for_function(
                "([well, id]) => wellstream.received.some((r) => r.well === well && r.id === id)",
                arg=[well, last[well]],
                timeout=WAIT_MS,
            )
        received: list[dict[str, str]] = await page.evaluate("wellstream.received")
        for well in wells:
            events = [r for r in received if r["well"] == well]
            # A fresh page starts from the stream's snapshot; every reading after it comes once.
            assert events[0]["event"] == "snapshot"
            assert_no_gap_no_duplicate(events, published[well])
        # One stream for both wells, reopened by the page itself after the restart (in ticket mode
        # some attempts ended at the refused ticket and never asked for a stream).
        assert await page.evaluate("wellstream.ownReconnects") >= 1
        streams = stream_requests(page)
        assert all("/tenants/acme/stream" in url for url in streams), streams
        assert 2 <= len(streams) <= await page.evaluate("wellstream.connects")
        assert page.errors == []  # type: ignore[attr-defined]


async def test_sign_in_form_then_auth_expired_asks_again_and_resumes_without_gap(
    browser: Browser, redis_url: str, secret: str, token
) -> None:
    wells = ["w1"]
    with anyio.fail_after(45):
        async with (
            Gateway(secret, redis_url, {"acme": wells}).running() as gateway,
            paced_publisher(redis_url, wells, 0.1) as published,
        ):
            page = await open_page(browser)
            await page.goto(gateway.url + "/")  # no token, no cookie: the sign-in form
            await expect(page.locator("#sign-in")).to_be_visible(timeout=WAIT_MS)
            await expect(page.locator("#indicator")).to_have_attribute("data-state", "Signed out")

            # Short enough to expire during the test, long enough to outlast a slow sign-in on a busy machine.
            await page.fill("#sign-in-token", token("acme", ttl_s=6))
            await page.click("#sign-in button[type=submit]")
            await expect(page.locator("#indicator")).to_have_attribute("data-state", "Live", timeout=WAIT_MS)
            await expect(page.locator("#sign-in")).to_be_hidden()

            # The stream ends with auth-expired; the page's fresh attempt is refused (401): sign in again.
            await expect(page.locator("#sign-in")).to_be_visible(timeout=20_000)
            await expect(page.locator("#indicator")).to_have_attribute("data-state", "Signed out")
            await expect(page.locator("#sign-in-reason")).to_contain_text("Sign in again")
            seen = await page.evaluate("wellstream.received.length")
            await wait_until(lambda: len(published["w1"]) >= seen + 10)  # readings the page missed meanwhile

            await page.fill("#sign-in-token", token("acme"))
            await page.click("#sign-in button[type=submit]")
            await expect(page.locator("#indicator")).to_have_attribute("data-state", "Live", timeout=WAIT_MS)
            count = len(published["w1"])
            await wait_until(lambda: len(published["w1"]) >= count + 3)
        last = published["w1"][-1]
        await page.wait_for_function("(id) => wellstream.received.some((r) => r.id === id)", arg=last, timeout=WAIT_MS)
        assert_no_gap_no_duplicate(await page.evaluate("wellstream.received"), published["w1"])
        assert page.errors == []  # type: ignore[attr-defined]


async def test_a_session_that_expired_during_a_gateway_restart_brings_every_well_back_after_sign_in(
    browser: Browser, redis_url: str, secret: str, token
) -> None:
    # While the gateway is down every well waits out its own backoff; the first to come back
    # is refused (401) and signs the page out. Every well, not only that one, must resume.
    wells = ["w1", "w2", "w3"]
    gateway = Gateway(secret, redis_url, {"acme": wells})
    proxy = Proxy(gateway.port)
    with anyio.fail_after(75):
        async with proxy.running(), gateway.running(), paced_publisher(redis_url, wells, 0.1) as published:
            page = await open_page(browser)
            expires_at = time.time() + 8
            await page.goto(f"{proxy.url}/#token={token('acme', ttl_s=8)}")
            await expect(page.locator("#indicator")).to_have_attribute("data-state", "Live", timeout=WAIT_MS)

            await gateway.stop()
            await wait_until(lambda: time.time() > expires_at + 1 and len(proxy.bad_gateways) >= 1)
            await gateway.start()
            await expect(page.locator("#sign-in")).to_be_visible(timeout=40_000)

            await page.fill("#sign-in-token", token("acme"))
            await page.click("#sign-in button[type=submit]")
            await expect(page.locator("#indicator")).to_have_attribute("data-state", "Live", timeout=20_000)
            count = {well: len(ids) for well, ids in published.items()}
            await wait_until(lambda: all(len(published[well]) >= count[well] + 3 for well in wells))
        for well in wells:
            await page.wait_for_function(
                "([well, id]) => wellstream.received.some((r) => r.well === well && r.id === id)",
                arg=[well, published[well][-1]],
                timeout=WAIT_MS,
            )
        assert page.errors == []  # type: ignore[attr-defined]


async def test_while_the_list_of_wells_cannot_load_the_page_says_offline_with_the_status(
    browser: Browser, redis_url: str, secret: str, token
) -> None:
    gateway = Gateway(secret, redis_url, {"acme": ["w1"]})
    proxy = Proxy(gateway.port)
    with anyio.fail_after(45):
        async with proxy.running(), gateway.running():
            page = await open_page(browser)
            await page.goto(proxy.url + "/")
            await expect(page.locator("#indicator")).to_have_attribute("data-state", "Signed out", timeout=WAIT_MS)
            await gateway.stop()
            await page.fill("#sign-in-token", token("acme"))
            await page.click("#sign-in button[type=submit]")
            await wait_until(lambda: sum(b"/wells" in line for line in proxy.bad_gateways) >= 3)
            await expect(page.locator("#indicator")).to_have_text("Offline (502)")
            await gateway.start()
            await expect(page.locator("#indicator")).to_have_attribute("data-state", "Live", timeout=WAIT_MS)
        states = await indicator_states(page)
        # Offline from the first refusal until the wells came, not overwritten by the page's clock.
        signed_in = states[states.index("Signed out") + 1 :]
        assert signed_in[:1] == ["Offline"], states
        assert "Live" in signed_in, states
        assert page.errors == []  # type: ignore[attr-defined]


async def test_history_trimmed_while_away_gives_a_reset_then_a_fresh_snapshot(
    browser: Browser, redis_url: str, secret: str, token
) -> None:
    gateway = Gateway(secret, redis_url, {"acme": ["w1"]})
    with anyio.fail_after(45):
        # This publisher keeps about 10 entries per well (Redis trims approximately, whole nodes).
        async with gateway.running(), connect_redis(redis_url, 10) as publisher:
            await publisher.log.publish([reading("w1", "p", 1.0)])
            page = await open_page(browser)
            await page.goto(f"{gateway.url}/#token={token('acme')}")
            await expect(row(page, "w1", "p").locator(".number")).to_have_text("1", timeout=WAIT_MS)
            await expect(page.locator("#indicator")).to_have_attribute("data-state", "Live", timeout=WAIT_MS)

            await gateway.stop()
            for batch in range(10):
                await publisher.log.publish([reading("w1", "p", batch * 100 + n + 0.5) for n in range(100)])
            await gateway.start()

            await expect(row(page, "w1", "p").locator(".number")).to_have_text("999.5", timeout=20_000)
            events = [e["event"] for e in await page.evaluate("wellstream.received")]
            assert events[events.index("reset") + 1] == "snapshot", events
            await expect(page.locator("#indicator")).to_have_attribute("data-state", "Live")
