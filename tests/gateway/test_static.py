"""The dashboard's files: served at /, always revalidated so a reloaded wall screen gets the new page."""

from __future__ import annotations

import re

import anyio
import httpx
import pytest

from tests.conftest import ROOT, make_settings, running_gateway

pytestmark = pytest.mark.anyio

STATIC = ROOT / "static"
MODULES = sorted(path.name for path in STATIC.glob("*.js"))
IMPORT = re.compile(r"""^\s*(?:import|export)\b[^;]*?\bfrom\s+["']([^"']+)["']|^\s*import\s+["']([^"']+)["']""", re.M)


async def test_dashboard_files_are_served_with_no_cache_and_revalidate_to_304(secret: str) -> None:
    with anyio.fail_after(30):
        async with running_gateway(make_settings(secret)) as gateway, httpx.AsyncClient() as client:
            page = await client.get(gateway.url + "/")
            assert page.status_code == 200
            assert page.headers["content-type"].startswith("text/html")
            script = await client.get(gateway.url + "/main.js")
            assert script.status_code == 200
            for response in (page, script):
                assert response.headers["cache-control"] == "no-cache"
            again = await client.get(gateway.url + "/main.js", headers={"If-None-Match": script.headers["etag"]})
            assert again.status_code == 304


async def test_every_module_is_served_as_javascript_with_no_cache(secret: str) -> None:
    # A module script with another MIME type is refused by the browser, and the page stays empty.
    with anyio.fail_after(30):
        async with running_gateway(make_settings(secret)) as gateway, httpx.AsyncClient() as client:
            for name in MODULES:
                response = await client.get(f"{gateway.url}/{name}")
                assert response.status_code == 200, name
                assert response.headers["content-type"].startswith("text/javascript"), name
                assert response.headers["cache-control"] == "no-cache", name


async def test_issue15_the_page_and_its_files_carry_a_strict_csp_no_framing_and_nosniff(secret: str) -> None:
    expected = {
        "content-security-policy": (
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
        ),
        "x-frame-options": "DENY",
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
    }
    with anyio.fail_after(30):
        async with running_gateway(make_settings(secret)) as gateway, httpx.AsyncClient() as client:
            responses = {path: await client.get(gateway.url + path) for path in ("/", "/main.js", "/dashboard.css")}
            responses["HEAD /"] = await client.head(gateway.url + "/")
            etag = responses["/main.js"].headers["etag"]
            responses["304"] = await client.get(gateway.url + "/main.js", headers={"If-None-Match": etag})
            assert responses["304"].status_code == 304
            for name, response in responses.items():
                assert {key: response.headers.get(key) for key in expected} == expected, name


def test_the_page_loads_one_module_and_has_no_inline_script_or_handler() -> None:
    # Ready for a strict Content-Security-Policy (script-src 'self'): no inline code at all.
    html = (STATIC / "index.html").read_text()
    assert re.findall(r"<script\b[^>]*>", html) == ['<script type="module" src="/main.js">']
    assert [body.strip() for body in re.findall(r"<script\b[^>]*>(.*?)</script>", html, re.S)] == [""]
    assert re.search(r"\son[a-z]+\s*=", html) is None


def test_every_import_names_a_module_in_static() -> None:
    # No bundler: an import is fetched as written, so it must be a relative path to a file that is there.
    imported: set[str] = set()
    for name in MODULES:
        for match in IMPORT.finditer((STATIC / name).read_text()):
            specifier = match[1] or match[2]
            assert specifier.startswith("./"), f"{name}: {specifier}"
            assert specifier.endswith(".js"), f"{name}: {specifier}"
            assert (STATIC / specifier[2:]).is_file(), f"{name}: {specifier}"
            imported.add(specifier[2:])
    assert set(MODULES) - imported == {"main.js"}  # every module is used, and main.js is the entry
