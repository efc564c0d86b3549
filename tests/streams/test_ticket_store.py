"""The ticket store's conformance suite, on the memory broker and a real redis-server."""

from __future__ import annotations

import anyio
import pytest

from tests.streams.conftest import Backend

pytestmark = pytest.mark.anyio


async def test_a_ticket_redeems_once(backend: Backend) -> None:
    with anyio.fail_after(5):
        async with backend.open() as broker:
            await broker.tickets.put("k1", b"payload", ttl_s=30)
            assert await broker.tickets.take("k1") == b"payload"
            assert await broker.tickets.take("k1") is None, "single use"
            assert await broker.tickets.take("never") is None


async def test_a_ticket_expires_after_its_ttl_and_not_before(backend: Backend) -> None:
    with anyio.fail_after(5):
        async with backend.open() as broker:
            await broker.tickets.put("short", b"a", ttl_s=0.3)
            await broker.tickets.put("long", b"b", ttl_s=30)
            await backend.advance(0.5)
            assert await broker.tickets.take("short") is None, "expired"
            assert await broker.tickets.take("long") == b"b"
