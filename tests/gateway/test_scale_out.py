"""Several gateway processes on one Redis: each delivers every reading to its own clients."""

from __future__ import annotations

import anyio
import httpx
import pytest

from app.streams.redis import connect_redis
from tests.conftest import gateway_process
from tests.factories import make_reading
from tests.sse_client import SSEReader

pytestmark = pytest.mark.anyio


async def test_two_gateway_processes_both_deliver_a_reading_published_once(redis_url: str, secret: str, token) -> None:
    headers = {"Authorization": f"Bearer {token('acme')}"}
    reading = make_reading(42.5)
    path = "/tenants/acme/wells/w1/stream"
    with anyio.fail_after(30):
        async with (
            gateway_process(secret, WELLSTREAM_REDIS_URL=redis_url) as first,
            gateway_process(secret, WELLSTREAM_REDIS_URL=redis_url) as second,
            connect_redis(redis_url) as publisher,
            httpx.AsyncClient(timeout=10) as client,
            client.stream("GET", first.url + path, headers=headers) as one,
            client.stream("GET", second.url + path, headers=headers) as two,
        ):
            readers = [SSEReader(one), SSEReader(two)]
            for reader in readers:
                await reader.next_event("snapshot")
            [stream_id] = await publisher.log.publish([reading])
            for reader in readers:
                event = await reader.next_event("reading")
                assert event.id == str(stream_id)
                assert event.json()["value"] == 42.5
            assert first.process.pid != second.process.pid
