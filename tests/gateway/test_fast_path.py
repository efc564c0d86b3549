"""The fan-out fast path: frames queued while a stream's writer waits go out together, in order."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from app.streams.memory import MemoryStreamLog, memory_broker
from tests.conftest import make_settings, running_gateway, wait_until
from tests.factories import make_reading as reading

pytestmark = pytest.mark.anyio


async def open_stream(url: str, token: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw HTTP/1.1 stream request, so the test sees the response's chunks as sent."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    request = f"GET /tenants/acme/wells/w1/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
    writer.write(request.encode())
    return reader, writer


async def read_chunks(reader: asyncio.StreamReader, until: bytes) -> list[bytes]:
    """HTTP/1.1 chunked body, one entry per chunk, until a chunk contains `until`."""
    chunks: list[bytes] = []
    while not chunks or until not in chunks[-1]:
        size = int((await reader.readline()).strip(), 16)
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)
    return chunks


async def test_a_burst_is_written_in_few_sends_and_in_order(secret: str, token) -> None:
    broker = memory_broker()
    with anyio.fail_after(20):
        async with running_gateway(make_settings(secret), broker) as gateway:
            reader, writer = await open_stream(gateway.url, token("acme"))
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            assert b"transfer-encoding: chunked" in head.lower()
            await read_chunks(reader, b"event: snapshot")
            await wait_until(lambda: gateway.hub.open_streams == 1)
            # One publish call reaches the hub in one go: 1,000 frames queue (of 1,024 allowed) before the writer runs.
            ids = await broker.log.publish([reading(float(v)) for v in range(1000)])
            chunks = await read_chunks(reader, f"id: {ids[-1]}\n".encode())
            body = b"".join(chunks)
            got = [line.removeprefix(b"id: ").decode() for line in body.split(b"\n") if line.startswith(b"id: ")]
            assert got == [str(i) for i in ids], "every reading, in order, once"
            assert len(chunks) < 20, f"1,000 queued frames took {len(chunks)} sends"
            writer.close()
            await writer.wait_closed()
            await wait_until(lambda: gateway.hub.open_streams == 0)


async def test_a_client_that_leaves_mid_stream_frees_its_subscription(secret: str, token) -> None:
    broker = memory_broker()
    assert isinstance(broker.log, MemoryStreamLog)
    log = broker.log
    with anyio.fail_after(10):
        async with running_gateway(make_settings(secret), broker) as gateway:
            reader, writer = await open_stream(gateway.url, token("acme"))
            await reader.readuntil(b"event: snapshot")
            assert gateway.hub.open_streams == 1
            writer.close()
            await writer.wait_closed()
            await wait_until(lambda: gateway.hub.open_streams == 0)
            assert gateway.hub.tenants == 0
            assert len(log.feeds) == 1
            assert next(iter(log.feeds)).tenants == set(), "the upstream subscription is gone too"
