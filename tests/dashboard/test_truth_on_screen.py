"""Issue "Truth on screen": the dashboard shows the server's verdict on each reading (its quality,
its `reason`, the source's `statusCode`) and guesses nothing, STALE least of all.

No timed assertions: a check that something did NOT happen waits first for later events the
page did process (other tags' values, the clock moving a tag's age).
"""

from __future__ import annotations

import anyio
import pytest
from playwright.async_api import Browser, Page, expect

from app.streams.redis import connect_redis
from tests.dashboard.conftest import WAIT_MS, open_page, paced_publisher, reading, row, tile
from tests.dashboard.servers import Gateway

pytestmark = pytest.mark.anyio

# The page's own clock has ticked past this age of the tag (its age text reads in whole seconds).
AGE_AT_LEAST = """([well, tag, seconds]) => {
    const ago = document.querySelector(`.well[data-well="${well}"] .tag[data-tag="${tag}"] .ago`);
    const match = /^(\\d+) s$/.exec(ago ? ago.textContent : "");
    return match !== null && Number(match[1]) >= seconds;
}"""


async def open_live(browser: Browser, url: str, token: str) -> Page:
    page = await open_page(browser)
    await page.goto(f"{url}/#token={token}")
    await expect(page.locator("#indicator")).to_have_attribute("data-state", "Live", timeout=WAIT_MS)
    return page


async def test_stale_is_the_servers_verdict_shown_as_a_word_and_ended_by_a_fresh_reading(
    browser: Browser, redis_url: str, secret: str, token
) -> None:
    registry = {"acme": ["w1", "w2"]}
    with anyio.fail_after(45):
        async with Gateway(secret, redis_url, registry).running() as gateway, connect_redis(redis_url) as publisher:
            last = reading("w1", "p", 5.0)
            await publisher.log.publish([last, reading("w2", "p", 6.0)])
            page = await open_live(browser, gateway.url, token("acme"))
            await expect(row(page, "w1", "p").locator(".quality")).to_have_text("GOOD", timeout=WAIT_MS)

            # The server's verdict: the last value and timestamp known, UNCERTAIN because stale.
            verdict = last.model_copy(update={"quality": "UNCERTAIN", "reason": "stale"})
            await publisher.log.publish([verdict])
            stale = row(page, "w1", "p")
            await expect(stale).to_have_attribute("data-stale", "true", timeout=WAIT_MS)
            await expect(stale).to_have_attribute("data-reason", "stale")
            await expect(stale).to_have_attribute("data-quality", "UNCERTAIN")
            await expect(stale.locator(".quality")).to_have_text("STALE")
            await expect(stale.locator(".quality")).to_have_class("quality badge STALE")
            await expect(stale.locator(".number")).to_have_text("5")
            await expect(tile(page, "w1")).to_have_attribute("data-state", "STALE")
            await expect(tile(page, "w1").locator("header .state")).to_have_text("STALE")
            # One tag, one state: STALE stands for its UNCERTAIN, it is not counted twice.
            await expect(page.locator("#summary")).to_have_text("2 wells \u00b7 1 STALE")
            await expect(tile(page, "w2")).to_have_attribute("data-state", "GOOD")

            await publisher.log.publish([reading("w1", "p", 5.5)])
            await expect(stale).to_have_attribute("data-stale", "false", timeout=WAIT_MS)
            await expect(stale).to_have_attribute("data-reason", "")
            await expect(stale.locator(".quality")).to_have_text("GOOD")
            await expect(tile(page, "w1")).to_have_attribute("data-state", "GOOD")
            await expect(page.locator("#summary")).to_have_text("2 wells")
            assert page.errors == []  # type: ignore[attr-defined]


async def test_a_quiet_tag_is_never_stale_on_the_page_however_late_its_last_reading(
    browser: Browser, redis_url: str, secret: str, token
) -> None:
    # A deadbanded tag says nothing while its value holds; only the server knows its expected
    # interval. The page used to guess: STALE once the age passed 3 x the median interval, at
    # least 5 s. Here the tag's last readings come 100 ms apart, already 8 s old by source time
    # (a store-and-forward device flushing late), then nothing: any such guess says STALE at once,
    # and the page's clock ticks while the test watches.
    registry = {"acme": ["w1", "w2"]}
    with anyio.fail_after(45):
        async with Gateway(secret, redis_url, registry).running() as gateway, connect_redis(redis_url) as publisher:
            await publisher.log.publish([reading(well, "p", 1.0) for well in registry["acme"]])
            page = await open_live(browser, gateway.url, token("acme"))
            for n in range(4):
                await publisher.log.publish([reading("w1", "quiet", 40.0 + n, age_s=8)])
                await anyio.sleep(0.1)
            quiet = row(page, "w1", "quiet")
            await expect(quiet.locator(".number")).to_have_text("43", timeout=WAIT_MS)

            # Nothing more for the quiet tag; the other tags go on. The page is still at work: it
            # shows their newest values, and its clock has moved the quiet tag's age on twice.
            async with paced_publisher(redis_url, registry["acme"], 0.1) as published:
                await page.wait_for_function(AGE_AT_LEAST, arg=["w1", "quiet", 10], timeout=WAIT_MS)
            for well in registry["acme"]:
                await expect(row(page, well, "p").locator(".number")).to_have_text(
                    str(len(published[well])), timeout=WAIT_MS
                )

            await expect(quiet).to_have_attribute("data-stale", "false")
            await expect(quiet).to_have_attribute("data-reason", "")
            await expect(quiet.locator(".quality")).to_have_text("GOOD")
            await expect(tile(page, "w1")).to_have_attribute("data-state", "GOOD")
            await expect(page.locator("#summary")).to_have_text("2 wells")
            assert page.errors == []  # type: ignore[attr-defined]


async def test_reasons_in_words_overrides_marked_but_good_and_the_status_code_as_title(
    browser: Browser, redis_url: str, secret: str, token
) -> None:
    wells = ["w1", "w2", "w3", "w4", "w5"]
    with anyio.fail_after(45):
        async with (
            Gateway(secret, redis_url, {"acme": wells}).running() as gateway,
            connect_redis(redis_url) as publisher,
        ):
            # w1 lost its device before the page opened: every tag BAD comm_failure, from the snapshot.
            await publisher.log.publish(
                [
                    reading("w1", tag, None, "BAD", reason="comm_failure", status_code="BadCommunicationError")
                    for tag in ("p", "t")
                ]
                + [reading(well, "p", 1.0) for well in ("w2", "w3", "w4")]
            )
            page = await open_live(browser, gateway.url, token("acme"))
            for tag in ("p", "t"):
                lost = row(page, "w1", tag)
                await expect(lost.locator(".quality")).to_have_text("BAD \u00b7 comm failure", timeout=WAIT_MS)
                await expect(lost).to_have_attribute("data-reason", "comm_failure")
                await expect(lost).to_have_attribute("data-quality", "BAD")
                await expect(lost.locator(".quality")).to_have_attribute("title", "BadCommunicationError")
                await expect(lost.locator(".number")).to_have_text("\u2014")
            await expect(tile(page, "w1")).to_have_attribute("data-state", "BAD")
            await expect(tile(page, "w1").locator("header .state")).to_have_text("BAD")
            await expect(tile(page, "w1").locator("header .why")).to_have_text("comm failure")
            await expect(tile(page, "w1")).to_have_attribute("data-reason", "comm_failure")
            # A well without any reading still says so, and gives no reason.
            await expect(tile(page, "w5")).to_have_attribute("data-state", "NODATA")
            await expect(tile(page, "w5").locator("header .state")).to_have_text("NO DATA")
            await expect(tile(page, "w5").locator("header .why")).to_have_text("")

            # Live: a broken 4-20 mA loop, a device fault, a local override, a retained MQTT message.
            await publisher.log.publish(
                [
                    reading("w2", "level", None, "BAD", unit="m", reason="out_of_range"),
                    reading("w2", "t", 80.0, "BAD", unit="degC", reason="device_error", status_code="BadSensorFailure"),
                    reading("w3", "q", 12.0, reason="override", status_code="GoodLocalOverride"),
                    reading("w4", "q", 3.0, "UNCERTAIN", reason="retained"),
                ]
            )
            out = row(page, "w2", "level")
            await expect(out.locator(".quality")).to_have_text("BAD \u00b7 out of range", timeout=WAIT_MS)
            await expect(out).to_have_attribute("data-reason", "out_of_range")
            assert await out.locator(".quality").get_attribute("title") is None  # no status of its own
            fault = row(page, "w2", "t")
            await expect(fault.locator(".quality")).to_have_text("BAD \u00b7 device error")
            await expect(fault.locator(".quality")).to_have_attribute("title", "BadSensorFailure")
            await expect(fault.locator(".number")).to_have_text("80")
            await expect(tile(page, "w2").locator("header .why")).to_have_text("device error, out of range")

            override = row(page, "w3", "q")
            await expect(override.locator(".quality")).to_have_text("GOOD \u00b7 override", timeout=WAIT_MS)
            await expect(override).to_have_attribute("data-quality", "GOOD")
            await expect(override).to_have_attribute("data-reason", "override")
            await expect(override.locator(".quality")).to_have_class("quality badge GOOD")
            await expect(override.locator(".quality")).to_have_attribute("title", "GoodLocalOverride")
            # Marked by its own shape, not only its word: GOOD's is a full disc, an override's a half one.
            mark = "(e) => getComputedStyle(e, '::before').content"
            assert await override.locator(".quality").evaluate(mark) == '"\u25d0"'
            assert await row(page, "w3", "p").locator(".quality").evaluate(mark) == '"\u25cf"'
            # Not a problem: the tile is GOOD (saying why it is marked), and nothing is counted for it.
            await expect(tile(page, "w3")).to_have_attribute("data-state", "GOOD")
            await expect(tile(page, "w3").locator("header .why")).to_have_text("override")

            retained = row(page, "w4", "q")
            await expect(retained.locator(".quality")).to_have_text("UNCERTAIN \u00b7 retained", timeout=WAIT_MS)
            await expect(retained).to_have_attribute("data-reason", "retained")
            await expect(tile(page, "w4")).to_have_attribute("data-state", "UNCERTAIN")
            await expect(page.locator("#summary")).to_have_text("5 wells \u00b7 4 BAD \u00b7 1 UNCERTAIN")

            # The reason is the latest reading's, even where the quality stays: then the device is back.
            await publisher.log.publish([reading("w1", "p", None, "BAD", reason="device_error")])
            await expect(tile(page, "w1").locator("header .why")).to_have_text(
                "comm failure, device error", timeout=WAIT_MS
            )
            await expect(row(page, "w1", "p").locator(".quality")).to_have_text("BAD \u00b7 device error")
            assert await row(page, "w1", "p").locator(".quality").get_attribute("title") is None
            await publisher.log.publish([reading("w1", tag, 2.0) for tag in ("p", "t")])
            await expect(tile(page, "w1")).to_have_attribute("data-state", "GOOD", timeout=WAIT_MS)
            await expect(row(page, "w1", "p")).to_have_attribute("data-reason", "")
            await expect(row(page, "w1", "p").locator(".quality")).to_have_text("GOOD")
            await expect(tile(page, "w1").locator("header .why")).to_have_text("")
            assert page.errors == []  # type: ignore[attr-defined]
