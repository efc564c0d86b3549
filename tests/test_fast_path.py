"""The fan-out fast path: frames queued while a stream's writer waits go out together, in order."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from app.models import Reading
from app.streams.memory import MemoryBroker
from tests.conftest import make_settings, running_gateway, wait_until

pytestmark = pytest.mark.anyio


def reading(value: float) -> Reading:
    return Reading(
        tenant_id="acme",
        well_id="w1",
        tag_name="p",
        value=value,
        quality="GOOD",
        timestamp="2026-11-27T10:00:00.000Z",
        source_protocol="simulator",
        connection_id="c1",
    )


async def read_chunks(reader: asyncio.StreamReader, until: bytes) -> list[bytes]:
    """HTTP/1.1 chunked body, one entry per chunk, until a chunk contains `until`."""
    chunks: list[bytes] = []
    while not chunks or until not in chunks[-1]:
        size = int((await reader.readline()).strip(), 16)
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)
    return chunks


async def test_a_burst_is_written_in_few_sends_and_in_order(secret: str, token) -> None:
    broker = MemoryBroker()
    with anyio.fail_after(20):
        async with running_gateway(make_settings(secret), broker) as gateway:
            host, port = gateway.url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                f"GET /tenants/acme/wells/w1/stream HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {token('acme')}\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            assert b"transfer-encoding: chunked" in head.lower()
            await read_chunks(reader, b"event: snapshot")
            await wait_until(lambda: gateway.hub.open_streams == 1)
            # One publish call reaches the hub in one go: 1,000 frames queue (of 1,024 allowed) before the writer runs.
            ids = await broker.publish([reading(float(v)) for v in range(1000)])
            chunks = await read_chunks(reader, f"id: {ids[-1]}\n".encode())
            body = b"".join(chunks)
            got = [line.removeprefix(b"id: ").decode() for line in body.split(b"\n") if line.startswith(b"id: ")]
            assert got == [str(i) for i in ids], "every reading, in order, once"
            assert len(chunks) < 20, f"1,000 queued frames took {len(chunks)} sends"
            writer.close()
            await writer.wait_closed()
            await wait_until(lambda: gateway.hub.open_streams == 0)


async def test_a_client_that_leaves_mid_stream_frees_its_subscription(secret: str, token) -> None:
    broker = MemoryBroker()
    with anyio.fail_after(10):
        async with running_gateway(make_settings(secret), broker) as gateway:
            host, port = gateway.url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                f"GET /tenants/acme/wells/w1/stream HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {token('acme')}\r\n\r\n".encode()
            )
            await reader.readuntil(b"event: snapshot")
            assert gateway.hub.open_streams == 1
            writer.close()
            await writer.wait_closed()
            await wait_until(lambda: gateway.hub.open_streams == 0)
            assert gateway.hub.topics == 0
            assert len(broker.feeds) == 1
            assert next(iter(broker.feeds)).topics == set(), "the upstream subscription is gone too"
