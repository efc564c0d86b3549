"""The well registry's conformance suite, on the memory broker and a real redis-server."""

from __future__ import annotations

import anyio
import pytest

from tests.factories import make_reading as reading
from tests.streams.conftest import Backend

pytestmark = pytest.mark.anyio


async def test_the_well_registry_is_per_tenant(backend: Backend) -> None:
    with anyio.fail_after(5):
        async with backend.open() as broker:
            await broker.registry.register("acme", ["w1", "w2"])
            await broker.log.publish([reading(well="w3")])
            assert await broker.registry.wells("acme") == ["w1", "w2", "w3"]
            assert await broker.registry.has_well("acme", "w3")
            assert not await broker.registry.has_well("globex", "w1")
            assert await broker.registry.wells("globex") == []


async def test_registering_nothing_or_again_changes_nothing(backend: Backend) -> None:
    with anyio.fail_after(5):
        async with backend.open() as broker:
            await broker.registry.register("acme", [])
            await broker.registry.register("acme", ["w1"])
            await broker.registry.register("acme", ["w1"])
            assert await broker.registry.wells("acme") == ["w1"]
