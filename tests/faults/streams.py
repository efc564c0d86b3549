"""What the fault tests share: a paced publisher that survives Redis going away, and streams
that record every reading id they receive, checked against the stream log itself."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import redis

from app.errors import BrokerError
from app.models import StreamId, Topic
from app.streams.redis.keys import log_key
from app.streams.seams import Broker
from tests.factories import make_reading
from tests.sse_client import Event, SSEReader


@dataclass
class PacedPublisher:
    """Publishes `per_tick` readings spread over `wells` every `tick_s`; a batch Redis refuses is dropped
    (it was never acknowledged, so nobody may expect it) and counted."""

    broker: Broker
    wells: list[str]
    per_tick: int = 10
    tick_s: float = 0.05
    acknowledged: dict[str, list[StreamId]] = field(default_factory=dict)
    refused: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    gate: asyncio.Lock = field(default_factory=asyncio.Lock)  # held by a test: no batch is in flight
    _n: int = 0

    async def run(self) -> None:
        """Until `stop` is set."""
        stop = self.stop
        while not stop.is_set():
            batch = []
            for _ in range(self.per_tick):
                well = self.wells[self._n % len(self.wells)]
                batch.append(make_reading(float(self._n), well=well))
                self._n += 1
            try:
                async with self.gate:
                    ids = await asyncio.wait_for(self.broker.log.publish(batch), 2)
            except (BrokerError, TimeoutError):
                self.refused += 1
            else:
                for reading, stream_id in zip(batch, ids, strict=True):
                    self.acknowledged.setdefault(reading.well_id, []).append(stream_id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.tick_s)

    def last_acknowledged(self, well: str) -> StreamId:
        return self.acknowledged[well][-1]


@dataclass
class RecordingStream:
    """One open stream: every reading id in arrival order, and whatever else came."""

    well: str
    ids: list[StreamId] = field(default_factory=list)
    snapshot_id: StreamId | None = None
    heartbeats: int = 0
    last_block: Event | None = None
    ended: bool = False
    opened: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def position(self) -> StreamId | None:
        """What an EventSource would send as Last-Event-ID."""
        return self.ids[-1] if self.ids else self.snapshot_id

    async def run(self, client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> None:
        """Read until the server ends the stream; resumes from `position` if there is one."""
        self.ended = False
        if self.position is not None:
            headers = {**headers, "Last-Event-ID": str(self.position)}
        async with client.stream("GET", url, headers=headers) as response:
            assert response.status_code == 200, response.status_code
            async for block in SSEReader(response):
                self.last_block = block
                if block.event == "snapshot":
                    assert block.id is not None
                    # A stream of many wells starts with one snapshot per well, all at the tenant's clock.
                    snapshot = StreamId.parse(block.id)
                    assert self.snapshot_id in (None, snapshot), "a resume must not start over with a snapshot"
                    self.snapshot_id = snapshot
                    self.opened.set()
                elif block.event == "reading":
                    assert block.id is not None
                    self.ids.append(StreamId.parse(block.id))
                elif block.comments and not block.data:
                    self.heartbeats += 1
        self.ended = True


def stream_log(server_port: int, well: str, tenant: str = "acme") -> list[StreamId]:
    """Every id in the well's stream log, oldest first: the truth the streams are checked against."""
    with redis.Redis(port=server_port, socket_timeout=5) as client:
        entries = client.xrange(log_key(Topic(tenant, well)))
    return [StreamId.parse(raw.decode()) for raw, _ in entries]


def assert_exactly_the_log(stream: RecordingStream, log: list[StreamId]) -> None:
    """From the first id after its snapshot on, the stream got exactly the log: no gap, no duplicate, in order."""
    start = stream.snapshot_id
    expected = [stream_id for stream_id in log if start is None or stream_id > start]
    received = stream.ids
    assert len(received) == len(set(received)), f"{stream.well}: duplicates"
    assert received == expected[: len(received)], f"{stream.well}: out of order or a gap"
    assert len(received) == len(expected), f"{stream.well}: {len(expected) - len(received)} readings missing"


FIELD = "*"  # the `well` of a recording of the tenant's one stream of every well

# Fast health checks so a fault test sees an outage in about a second; production keeps the defaults.
FAST_FEED = {
    "WELLSTREAM_REDIS__PING_INTERVAL_S": "0.3",
    "WELLSTREAM_REDIS__TIMEOUT_S": "1",
    "WELLSTREAM_STREAM__HEARTBEAT_S": "0.5",
}


@contextlib.asynccontextmanager
async def recording_streams(
    client: httpx.AsyncClient, base: str, wells: list[str], per_well: int, headers: dict[str, str]
) -> AsyncIterator[list[RecordingStream]]:
    """`per_well` streams of each well (a well of FIELD: the tenant's one stream of every well)."""
    streams = [RecordingStream(well) for well in wells for _ in range(per_well)]

    def url(stream: RecordingStream) -> str:
        return (
            f"{base}/tenants/acme/stream" if stream.well == FIELD else f"{base}/tenants/acme/wells/{stream.well}/stream"
        )

    tasks = [asyncio.create_task(s.run(client, url(s), headers)) for s in streams]
    try:
        await asyncio.gather(*(s.opened.wait() for s in streams))
        yield streams
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
