"""Security issue 15, item 4: a link carrying a token (`/#token=...`) never replaces a session
without the operator confirming it, seeing both tenants (login CSRF); the page runs under a
strict Content-Security-Policy.

No timed assertions: a check that a request was NOT made waits first for what the page showed
after it would have been made (the question, then a later reading).
"""

from __future__ import annotations

import anyio
import pytest
from playwright.async_api import Browser, BrowserContext, Page, expect

from app.streams.redis import connect_redis
from tests.dashboard.conftest import VIEWPORT, WAIT_MS, open_page, reading, row, tile
from tests.dashboard.servers import Gateway

pytestmark = pytest.mark.anyio

REGISTRY = {"acme": ["w1"], "globex": ["g1"]}

# Runs before the page's own scripts; CSP reports every refusal to the document as this event.
RECORD_CSP_VIOLATIONS = """
window.cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
    window.cspViolations.push(`${event.effectiveDirective} ${event.blockedURI}`);
});
"""

# What an injected inline script would be (an XSS): the policy must refuse it.
INJECT_INLINE_SCRIPT = """() => {
    const script = document.createElement("script");
    script.textContent = "window.injected = true";
    document.body.append(script);
    return window.injected === true;
}"""


async def open_tab(context: BrowserContext) -> tuple[Page, list[str]]:
    """A tab of a browser whose other tabs share its cookie and localStorage; and its script errors."""
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    return page, errors


def record_requests(page: Page) -> list[str]:
    """`METHOD url` of every request the page makes from now on."""
    seen: list[str] = []
    page.on("request", lambda request: seen.append(f"{request.method} {request.url}"))
    return seen


def asked_for_globex_or_a_session(requests: list[str]) -> list[str]:
    return [r for r in requests if "/tenants/globex/" in r or "/auth/session" in r]


async def session_cookie(page: Page) -> str:
    return next(c["value"] for c in await page.context.cookies() if c["name"] == "wellstream_session")


async def expect_question(page: Page, to: str, current: str) -> None:
    question = page.locator("#switch-session")
    await expect(question).to_be_visible(timeout=WAIT_MS)
    await expect(page.locator("#switch-to")).to_have_text(to)
    await expect(page.locator("#switch-from")).to_have_text(current)
    await expect(page.locator("#switch-stay")).to_be_focused()  # a stray Enter keeps the session


async def test_a_link_with_another_tenants_token_asks_before_it_replaces_the_session(
    browser: Browser, redis_url: str, secret: str, token
) -> None:
    with anyio.fail_after(60):
        async with Gateway(secret, redis_url, REGISTRY).running() as gateway, connect_redis(redis_url) as publisher:
            await publisher.log.publish([reading("w1", "p", 1.0), reading("g1", "p", 2.0, tenant="globex")])
            context = await browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
            page, errors = await open_tab(context)
            await page.goto(f"{gateway.url}/#token={token('acme')}")
            # No session yet: the demo's link signs in at once.
            await expect(row(page, "w1", "p").locator(".number")).to_have_text("1", timeout=WAIT_MS)
            await expect(page.locator("#indicator")).to_have_attribute("data-state", "Live", timeout=WAIT_MS)
            await expect(page.locator("#switch-session")).to_be_hidden()
            acme_cookie = await session_cookie(page)

            # The other tenant's link, opened in a new tab of the same browser: a fresh page, which
            # knows of the session only from the tenant it remembered. It asks, and asks for nothing.
            tab, tab_errors = await open_tab(context)
            requests = record_requests(tab)
            await tab.goto(f"{gateway.url}/#token={token('globex')}")
            await expect_question(tab, to="globex", current="acme")
            assert "token" not in tab.url
            assert asked_for_globex_or_a_session(requests) == []
            # Staying: the remembered session goes on, with the cookie it had.
            await tab.click("#switch-stay")
            await expect(tab.locator("#switch-session")).to_be_hidden()
            await expect(row(tab, "w1", "p").locator(".number")).to_have_text("1", timeout=WAIT_MS)
            await publisher.log.publish([reading("w1", "p", 3.0)])
            await expect(row(tab, "w1", "p").locator(".number")).to_have_text("3", timeout=WAIT_MS)
            await expect(tab.locator("#indicator")).to_have_attribute("data-state", "Live", timeout=WAIT_MS)
            await expect(tab.locator("#tenant")).to_have_text("acme")
            assert asked_for_globex_or_a_session(requests) == []
            assert await session_cookie(tab) == acme_cookie

            # A link in the first tab, live on acme: only the fragment changes, the wall stays until
            # the operator says otherwise. A token that names no tenant can only be declined...
            await page.goto(f"{gateway.url}/#token=not-a-jwt")
            await expect(page.locator("#switch-session")).to_be_visible(timeout=WAIT_MS)
            await expect(page.locator("#switch-to")).to_contain_text("not a wellstream token")
            await expect(page.locator("#switch-confirm")).to_be_disabled()
            # ... and the next link's question takes its place.
            await page.goto(f"{gateway.url}/#token={token('globex')}")
            await expect_question(page, to="globex", current="acme")
            await expect(page.locator("#switch-confirm")).to_be_enabled()
            assert "token" not in page.url
            await expect(page.locator("#tenant")).to_have_text("acme")
            await expect(row(page, "w1", "p").locator(".number")).to_have_text("3")
            assert await session_cookie(page) == acme_cookie
            # Switching, on purpose: the other tenant's wells, and nothing left of acme's.
            await page.click("#switch-confirm")
            await expect(row(page, "g1", "p").locator(".number")).to_have_text("2", timeout=WAIT_MS)
            await expect(page.locator("#indicator")).to_have_attribute("data-state", "Live", timeout=WAIT_MS)
            await expect(page.locator("#tenant")).to_have_text("globex")
            await expect(page.locator("#switch-session")).to_be_hidden()
            await expect(tile(page, "w1")).to_have_count(0)
            assert await session_cookie(page) != acme_cookie
            assert errors == []
            assert tab_errors == []
            await context.close()


async def test_after_signing_out_a_link_signs_in_at_once(browser: Browser, redis_url: str, secret: str, token) -> None:
    with anyio.fail_after(45):
        async with Gateway(secret, redis_url, REGISTRY).running() as gateway, connect_redis(redis_url) as publisher:
            await publisher.log.publish([reading("g1", "p", 2.0, tenant="globex")])
            page = await open_page(browser)
            await page.goto(f"{gateway.url}/#token={token('acme')}")
            await expect(page.locator("#indicator")).to_have_attribute("data-state", "Live", timeout=WAIT_MS)
            await page.click("#sign-out")
            await expect(page.locator("#indicator")).to_have_attribute("data-state", "Signed out", timeout=WAIT_MS)

            # Signed out on purpose: no session is left to protect, so nothing to confirm.
            await page.goto(f"{gateway.url}/#token={token('globex')}")
            await expect(row(page, "g1", "p").locator(".number")).to_have_text("2", timeout=WAIT_MS)
            await expect(page.locator("#indicator")).to_have_attribute("data-state", "Live", timeout=WAIT_MS)
            await expect(page.locator("#tenant")).to_have_text("globex")
            await expect(page.locator("#switch-session")).to_be_hidden()
            assert "token" not in page.url
            assert page.errors == []  # type: ignore[attr-defined]


async def test_the_dashboard_runs_under_its_content_security_policy_without_a_violation(
    browser: Browser, redis_url: str, secret: str, token
) -> None:
    with anyio.fail_after(45):
        async with Gateway(secret, redis_url, REGISTRY).running() as gateway, connect_redis(redis_url) as publisher:
            await publisher.log.publish([reading("w1", "p", 1.0), reading("w1", "t", 80.5, unit="degC")])
            page = await open_page(browser)
            console_errors: list[str] = []
            page.on("console", lambda message: console_errors.append(message.text) if message.type == "error" else None)
            await page.add_init_script(RECORD_CSP_VIOLATIONS)
            response = await page.goto(f"{gateway.url}/#token={token('acme')}")
            assert response is not None
            assert "script-src 'self'" in response.headers["content-security-policy"]

            # Values, a sparkline with a gap (BAD), the sign-in and the stream: all of the page at work.
            await expect(row(page, "w1", "p").locator(".number")).to_have_text("1", timeout=WAIT_MS)
            await publisher.log.publish([reading("w1", "p", None, "BAD"), reading("w1", "p", 4.0)])
            await expect(row(page, "w1", "p").locator(".number")).to_have_text("4", timeout=WAIT_MS)
            await expect(row(page, "w1", "t").locator(".number")).to_have_text("80.5")
            await expect(page.locator("#indicator")).to_have_attribute("data-state", "Live", timeout=WAIT_MS)
            await page.fill("#filter", "w1")
            await page.select_option("#sort", "state")
            await page.check("#compact")
            await expect(page.locator("#wells")).to_have_class("wells compact")
            assert await page.evaluate("window.cspViolations") == []

            # The policy is in force: an injected inline script is refused, and reported as such.
            assert await page.evaluate(INJECT_INLINE_SCRIPT) is False
            await page.wait_for_function("() => window.cspViolations.length > 0", timeout=WAIT_MS)
            assert await page.evaluate("window.cspViolations") == ["script-src-elem inline"]
            assert [text for text in console_errors if "Content Security Policy" not in text] == []
            assert page.errors == []  # type: ignore[attr-defined]
