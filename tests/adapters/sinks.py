"""A real ReadingSink for adapter tests: it keeps every batch and can wait for a value."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import pytest

from app.adapters.base import Adapter
from app.models import Reading
from tests.conftest import wait_until


class CollectingSink:
    """A real ReadingSink that keeps every batch it is given."""

    def __init__(self) -> None:
        self.batches: list[list[Reading]] = []

    async def submit(self, readings: Sequence[Reading]) -> None:
        self.batches.append(list(readings))

    @property
    def readings(self) -> list[Reading]:
        return [reading for batch in self.batches for reading in batch]

    def of(self, tag: str) -> list[Reading]:
        return [reading for reading in self.readings if reading.tag_name == tag]

    def latest(self, tag: str) -> Reading | None:
        found = self.of(tag)
        return found[-1] if found else None

    async def wait_for(
        self, tag: str, value: float | None, quality: str = "GOOD", reason: str | None = None
    ) -> Reading:
        """The tag's latest reading once it has this value and quality (and `reason`, when given)."""

        def arrived() -> bool:
            latest = self.latest(tag)
            if latest is None or (reason is not None and latest.reason != reason):
                return False
            return latest.value == value and latest.quality == quality

        await wait_until(arrived)
        found = self.latest(tag)
        assert found is not None
        return found


@contextlib.asynccontextmanager
async def running(adapter: Adapter) -> AsyncIterator[CollectingSink]:
    """The adapter running as a task into a fresh sink; on exit it is cancelled and must end with CancelledError."""
    sink = CollectingSink()
    task = asyncio.create_task(adapter.run(sink))
    try:
        yield sink
        assert not task.done(), "the adapter stopped by itself"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
