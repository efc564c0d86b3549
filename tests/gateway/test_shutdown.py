"""SIGTERM to a real `wellstream serve` process with 100 open streams."""

from __future__ import annotations

import asyncio
import signal
import time

import anyio
import httpx
import pytest

from app.auth.tokens import mint_token
from tests.conftest import gateway_process
from tests.sse_client import Event, SSEReader

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("server", ["hypercorn", "uvicorn", "granian"])
async def test_sigterm_ends_every_stream_cleanly_and_exits_within_5_s(secret: str, server: str) -> None:
    headers = {"Authorization": f"Bearer {mint_token(secret, 'acme')}"}
    limits = httpx.Limits(max_connections=None)
    with anyio.fail_after(60):
        async with (
            gateway_process(secret, server, WELLSTREAM_STREAM__SHUTDOWN_GRACE_S="2") as gateway,
            httpx.AsyncClient(timeout=20, limits=limits) as client,
        ):
            opened = 0
            all_open = asyncio.Event()

            async def one_stream(n: int) -> list[Event]:
                nonlocal opened
                url = f"{gateway.url}/tenants/acme/wells/well-{n % 10}/stream"
                async with client.stream("GET", url, headers=headers) as response:
                    assert response.status_code == 200
                    reader = SSEReader(response)
                    blocks = [await reader.next_event("snapshot")]
                    opened += 1
                    if opened == 100:
                        all_open.set()
                    blocks += await reader.collect()  # until the server ends the stream
                    return blocks

            streams = [asyncio.create_task(one_stream(n)) for n in range(100)]
            await all_open.wait()
            sent_at = time.monotonic()
            gateway.process.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*streams)  # a cut connection would raise here
            code = await asyncio.wait_for(gateway.process.wait(), 10)
            elapsed = time.monotonic() - sent_at
    assert code == 0
    assert elapsed < 5, f"exited {elapsed:.1f} s after SIGTERM"
    for blocks in results:
        goodbye = blocks[-1]
        assert goodbye.retry is not None, "the last frame tells the client when to come back"
        assert "shutting down" in " ".join(goodbye.comments)
    retries = {blocks[-1].retry for blocks in results}
    assert len(retries) > 1, "retry hints are jittered so clients do not return all at once"
