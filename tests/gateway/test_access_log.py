"""Access lines: one per request, JSON, and never a query string, a header, or a ticket."""

from __future__ import annotations

import logging

import anyio
import httpx
import pytest

from app.logs import JsonFormatter
from tests.conftest import make_settings, running_gateway

pytestmark = pytest.mark.anyio


async def test_access_lines_have_path_and_status_but_no_query_token_or_ticket(
    secret: str, token, caplog: pytest.LogCaptureFixture
) -> None:
    bearer = token("acme")
    caplog.set_level(logging.INFO, logger="wellstream.access")
    with anyio.fail_after(30):
        async with running_gateway(make_settings(secret)) as gateway, httpx.AsyncClient() as client:
            headers = {"Authorization": f"Bearer {bearer}"}
            assert (await client.get(gateway.url + "/healthz?access_token=querysecret123")).status_code == 200
            issued = await client.post(
                gateway.url + "/tenants/acme/stream-tickets", headers=headers, json={"wells": ["w1"]}
            )
            assert issued.status_code == 200
            ticket = issued.json()["ticket"]
            missing = await client.get(
                gateway.url + "/tenants/acme/wells/nope/latest?ticket=" + ticket, headers=headers
            )
            assert missing.status_code == 404
    formatter = JsonFormatter()
    lines = [formatter.format(r) for r in caplog.records if r.name == "wellstream.access"]
    lines = lines[-3:]  # before them: the fixture's own /healthz polls while the server starts
    assert '"path":"/healthz","status":200' in lines[0]
    assert '"method":"POST","path":"/tenants/acme/stream-tickets","status":200' in lines[1]
    assert '"path":"/tenants/acme/wells/nope/latest","status":404' in lines[2]
    for line in lines:
        for secret_text in ("querysecret123", bearer, ticket, "?"):
            assert secret_text not in line
