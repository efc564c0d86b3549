"""The dashboard's files: served at /, always revalidated so a reloaded wall screen gets the new page."""

from __future__ import annotations

import anyio
import httpx
import pytest

from tests.conftest import make_settings, running_gateway

pytestmark = pytest.mark.anyio


async def test_dashboard_files_are_served_with_no_cache_and_revalidate_to_304(secret: str) -> None:
    with anyio.fail_after(30):
        async with running_gateway(make_settings(secret)) as gateway, httpx.AsyncClient() as client:
            page = await client.get(gateway.url + "/")
            assert page.status_code == 200
            assert page.headers["content-type"].startswith("text/html")
            script = await client.get(gateway.url + "/dashboard.js")
            assert script.status_code == 200
            for response in (page, script):
                assert response.headers["cache-control"] == "no-cache"
            again = await client.get(gateway.url + "/dashboard.js", headers={"If-None-Match": script.headers["etag"]})
            assert again.status_code == 304
