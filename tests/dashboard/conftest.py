"""Chromium (Debian's, driven by Playwright) and the helpers the dashboard tests share.

The page runs under a Content-Security-Policy without 'unsafe-eval': give `wait_for_function` a
function ("() => ..."), which Playwright compiles once, never an expression, which it evals on
every poll (and the policy refuses).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from playwright.async_api import Browser, Locator, Page, async_playwright

from app.models import Quality, Reading, Reason, StreamId
from app.streams.redis import connect_redis
from app.streams.seams import Broker
from tests.factories import make_reading

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--ignore-certificate-errors",  # the HTTP/2 test's certificate comes from a throwaway CA
]
VIEWPORT = {"width": 1440, "height": 900}
WAIT_MS = 10_000  # generous bound for "values within a second": the machine is shared


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            await chromium.close()


async def open_page(browser: Browser) -> Page:
    """A fresh page that keeps its script errors (`page.errors`) and the streams it asked for (stream_requests)."""
    page = await browser.new_page(viewport=VIEWPORT)  # type: ignore[arg-type]
    errors: list[str] = []
    streams: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda request: streams.append(request.url) if STREAM_PATH.search(request.url) else None)
    page.errors = errors  # type: ignore[attr-defined]
    page.stream_urls = streams  # type: ignore[attr-defined]
    return page


STREAM_PATH = re.compile(r"/tenants/[^/]+/(?:wells/[^/]+/)?stream(?:\?|$)")


def stream_requests(page: Page) -> list[str]:
    """Every stream the page asked for, per-well or of many wells, in order."""
    streams: list[str] = page.stream_urls  # type: ignore[attr-defined]
    return streams


def iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def reading(
    well: str,
    tag: str,
    value: float | None,
    quality: Quality = "GOOD",
    *,
    unit: str = "psi",
    age_s: float = 0.0,
    tenant: str = "acme",
    reason: Reason | None = None,
    status_code: str | None = None,
) -> Reading:
    """A reading of now (or `age_s` ago, source time), with the server's verdict when it has one."""
    timestamp = iso(datetime.now(UTC) - timedelta(seconds=age_s))
    plain = make_reading(
        value, tag, tenant=tenant, well=well, connection="test", timestamp=timestamp, quality=quality, unit=unit
    )
    if reason is None and status_code is None:
        return plain
    return Reading.model_validate(plain.model_dump() | {"reason": reason, "status_code": status_code})


def tile(page: Page, well: str) -> Locator:
    return page.locator(f'.well[data-well="{well}"]')


def row(page: Page, well: str, tag: str) -> Locator:
    return page.locator(f'.well[data-well="{well}"] .tag[data-tag="{tag}"]')


async def indicator_states(page: Page) -> list[str]:
    states: list[str] = await page.evaluate("wellstream.indicator.map((t) => t.state)")
    return states


def assert_no_gap_no_duplicate(events: list[dict[str, str]], published: list[str]) -> None:
    """One well's events as the page received them: its snapshot from the page's fresh stream (or,
    where its first event is a reading, nothing before it), then every published id after that,
    once, in order, across however many reconnects."""
    kinds = [e["event"] for e in events]
    assert "reset" not in kinds, kinds
    assert "snapshot" not in kinds[1:], kinds
    after = StreamId.parse(events[0]["id"]) if kinds[:1] == ["snapshot"] else None
    readings = [e["id"] for e in events if e["event"] == "reading"]
    expected = [i for i in published if after is None or StreamId.parse(i) > after]
    assert readings == expected, f"received {len(readings)} ids, published {len(expected)}"


@contextlib.asynccontextmanager
async def paced_publisher(redis_url: str, wells: list[str], every_s: float) -> AsyncIterator[dict[str, list[str]]]:
    """Publishes one reading per well every `every_s` until the block ends; yields the ids per well."""
    published: dict[str, list[str]] = {well: [] for well in wells}

    async def run(broker: Broker) -> None:
        n = 0
        while True:
            n += 1
            ids = await broker.log.publish([reading(well, "p", float(n)) for well in wells])
            for well, stream_id in zip(wells, ids, strict=True):
                published[well].append(str(stream_id))
            await asyncio.sleep(every_s)

    async with connect_redis(redis_url) as broker:
        task = asyncio.create_task(run(broker))
        try:
            yield published
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
