"""Several gateway processes on one Redis: each delivers every reading to its own clients."""

from __future__ import annotations

import anyio
import httpx
import pytest

from app.models import Reading
from app.streams.redis import RedisBroker
from tests.conftest import make_settings, running_gateway
from tests.sse_client import SSEReader

pytestmark = pytest.mark.anyio


async def test_two_gateways_both_deliver_a_reading_published_once(redis_url: str, secret: str, token) -> None:
    headers = {"Authorization": f"Bearer {token('acme')}"}
    settings = make_settings(secret, redis_url=redis_url)
    reading = Reading(
        tenant_id="acme",
        well_id="w1",
        tag_name="p",
        value=42.5,
        quality="GOOD",
        timestamp="2026-11-27T10:00:00.000Z",
        source_protocol="simulator",
        connection_id="c1",
    )
    with anyio.fail_after(15):
        async with (
            running_gateway(settings) as first,
            running_gateway(settings) as second,
            RedisBroker.connect(redis_url) as publisher,
            httpx.AsyncClient(timeout=10) as client,
            client.stream("GET", first.url + "/tenants/acme/wells/w1/stream", headers=headers) as one,
            client.stream("GET", second.url + "/tenants/acme/wells/w1/stream", headers=headers) as two,
        ):
            readers = [SSEReader(one), SSEReader(two)]
            for reader in readers:
                await reader.next_event("snapshot")
            [stream_id] = await publisher.publish([reading])
            for reader in readers:
                event = await reader.next_event("reading")
                assert event.id == str(stream_id)
                assert event.json()["value"] == 42.5
