"""Readings for tests: valid by default, each test says only what it cares about."""

from __future__ import annotations

from app.models import ZERO_ID, History, Quality, Reading, StreamId, Topic
from app.streams.seams import StreamLog


def make_reading(
    value: float | None = 1.0,
    tag: str = "p",
    *,
    tenant: str = "acme",
    well: str = "w1",
    connection: str = "c1",
    timestamp: str = "2026-11-27T10:00:00.123Z",
    quality: Quality = "GOOD",
    unit: str = "psi",
) -> Reading:
    return Reading(
        tenant_id=tenant,
        well_id=well,
        tag_name=tag,
        value=value,
        quality=quality,
        timestamp=timestamp,
        source_protocol="simulator",
        connection_id=connection,
        unit=unit,
    )


END = StreamId(2**64 - 1, 2**64 - 1)


async def history(log: StreamLog, topic: Topic, after: StreamId = ZERO_ID, limit: int = 100_000) -> History:
    """A well's stored entries after `after`: what a test checks the log against."""
    return await log.range(topic, after, END, limit)
