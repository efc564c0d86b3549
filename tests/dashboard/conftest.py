"""Chromium (Debian's, driven by Playwright) and the helpers the dashboard tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from playwright.async_api import Browser, Page, async_playwright

from app.models import Quality, Reading
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


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            await chromium.close()


async def open_page(browser: Browser) -> Page:
    page = await browser.new_page(viewport=VIEWPORT)  # type: ignore[arg-type]
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.errors = errors  # type: ignore[attr-defined]
    return page


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
) -> Reading:
    timestamp = iso(datetime.now(UTC) - timedelta(seconds=age_s))
    return make_reading(
        value, tag, tenant=tenant, well=well, connection="test", timestamp=timestamp, quality=quality, unit=unit
    )
