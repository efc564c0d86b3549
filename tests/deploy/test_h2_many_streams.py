"""One client, 150 per-well streams over one HTTP/2 TLS connection to `wellstream serve --hypercorn-config`
(config/hypercorn.toml), readings published through Redis for every well for a minute (issue 19: open but
silent streams).

The reader is a raw `h2` client on one socket: it takes every frame as it arrives and gives the server
back its flow-control windows as it consumes the data, the stream's and the connection's, as a browser
does. It keeps h2's default 64 KiB windows, far below a browser's, so the connection's window is
reopened by a WINDOW_UPDATE every hundred readings or so, and runs out whenever one is late; a gateway
that stops sending on a stream or on the whole connection shows up as a stream whose readings stop while
its well still publishes. httpx is not used here: its HTTP/2 client has been seen to stall one of several
streams on one connection where a raw h2 client never did.

The same client, told to stop opening one stream's window, checks the other side: the gateway ends
that stream (it resumes) rather than leaving it open and silent.

No timed performance assertions: the only bound on time is a generous liveness one (MAX_GAP_S).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from app.gateway.devcert import DevCert
from app.streams.redis import connect_redis
from app.streams.seams import Broker
from tests.conftest import wait_until
from tests.dashboard.conftest import assert_no_gap_no_duplicate
from tests.deploy.test_http2 import established_connections, tls_gateway
from tests.factories import make_reading
from tests.prometheus import parse_samples, value

pytestmark = pytest.mark.anyio

WELLS = [f"w{n:03d}" for n in range(150)]
PUBLISH_FOR_S = 60.0
PUBLISH_EVERY_S = 0.3  # about 3 readings a second a well: 500 readings a second on the one connection
# Liveness, not speed: a stream that waits this long for its next reading while its well publishes has
# stopped. Stock Hypercorn's frozen connections never resumed at all.
MAX_GAP_S = 10.0
LAST_S = 10.0  # every stream still receives readings in the minute's last seconds


@dataclass
class Stream:
    """One stream as the client saw it: status, every SSE event (arrival time, name, id), how it ended."""

    well: str
    id: int
    status: int | None = None
    events: list[tuple[float, str, str]] = field(default_factory=list, repr=False)
    ended: str | None = None
    pending: bytes = field(default=b"", repr=False)

    def feed(self, data: bytes, now: float) -> None:
        self.pending += data
        *blocks, self.pending = self.pending.split(b"\n\n")
        for block in blocks:
            fields = dict(line.decode().partition(": ")[::2] for line in block.split(b"\n"))
            if "data" in fields:  # retry hints and heartbeat comments carry none
                self.events.append((now, fields.get("event", "message"), fields.get("id", "")))

    def readings(self) -> list[float]:
        return [arrived for arrived, name, _ in self.events if name == "reading"]


class H2Client:
    """A raw h2 client on one TLS connection, reading as a browser does (see the module docstring)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.streams: dict[int, Stream] = {}
        self.withheld: set[int] = set()  # streams whose own window this client never opens again
        self.closed: str | None = None
        self.settled = asyncio.Event()  # the server's SETTINGS arrived: its stream limit is known

    async def open(self, path: str, headers: dict[str, str], well: str) -> Stream:
        stream_id = self.connection.get_next_available_stream_id()
        request = {":method": "GET", ":path": path, ":scheme": "https", ":authority": "127.0.0.1"} | headers
        self.connection.send_headers(stream_id, [(k.encode(), v.encode()) for k, v in request.items()], end_stream=True)
        self.streams[stream_id] = stream = Stream(well, stream_id)
        await self.flush()
        return stream

    async def flush(self) -> None:
        self.writer.write(self.connection.data_to_send())
        await self.writer.drain()

    async def pump(self) -> None:
        """Reads until the server closes the connection."""
        self.connection.initiate_connection()
        await self.flush()
        try:
            while data := await self.reader.read(65536):
                now = time.monotonic()
                for event in self.connection.receive_data(data):
                    self.handle(event, now)
                await self.flush()
        except Exception as exc:
            self.closed = f"the client failed: {exc!r}"  # the test says so, rather than only seeing silence
            raise
        self.closed = self.closed or "the server closed the connection"

    def handle(self, event: h2.events.Event, now: float) -> None:
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self.settled.set()
        elif isinstance(event, h2.events.ResponseReceived):
            self.streams[event.stream_id].status = int(dict(event.headers or [])[b":status"])
        elif isinstance(event, h2.events.DataReceived):
            assert event.stream_id is not None
            assert event.data is not None
            self.streams[event.stream_id].feed(event.data, now)
            length = event.flow_controlled_length or 0
            if event.stream_id in self.withheld:
                if length:  # the connection's window only, so the other streams are not held back
                    self.connection.increment_flow_control_window(length)
            else:
                self.connection.acknowledge_received_data(length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
            assert event.stream_id is not None
            self.streams[event.stream_id].ended = type(event).__name__
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.closed = f"GOAWAY {event.error_code!r}"


@contextlib.asynccontextmanager
async def h2_client(url: str, dev_cert: DevCert) -> AsyncIterator[H2Client]:
    """One TLS connection negotiated to h2 by ALPN, its frames read by a task until the block ends."""
    context = ssl.create_default_context(cafile=str(dev_cert.ca))
    context.set_alpn_protocols(["h2"])
    target = httpx.URL(url)
    reader, writer = await asyncio.open_connection(target.host, target.port, ssl=context)
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
    client = H2Client(reader, writer)
    pump = asyncio.create_task(client.pump())
    try:
        await client.settled.wait()
        yield client
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def publish_for(broker: Broker, wells: list[str], seconds: float) -> dict[str, list[str]]:
    """A reading for every well every PUBLISH_EVERY_S for `seconds`; the ids published, per well."""
    published: dict[str, list[str]] = {well: [] for well in wells}
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
        ids = await broker.log.publish([make_reading(float(n), well=well) for well in wells])
        for well, stream_id in zip(wells, ids, strict=True):
            published[well].append(str(stream_id))
        await asyncio.sleep(PUBLISH_EVERY_S)
    return published


def longest_gap(arrivals: list[float], start: float, stop: float) -> float:
    """The longest wait for a reading between `start` and `stop`, counting both ends as waits."""
    times = [start, *(t for t in arrivals if start <= t <= stop), stop]
    return max(later - earlier for earlier, later in itertools.pairwise(times))


async def test_150_streams_of_one_client_keep_flowing_over_one_http2_connection_for_a_minute(
    secret: str, token, redis_url: str, dev_cert: DevCert, tmp_path: Path
) -> None:
    headers = {"authorization": f"Bearer {token('acme')}"}
    with anyio.fail_after(PUBLISH_FOR_S + 90):
        async with (
            tls_gateway(secret, redis_url, dev_cert, tmp_path, WELLS) as (https, plain, _),
            connect_redis(redis_url) as broker,
            h2_client(https, dev_cert) as client,
        ):
            for well in WELLS:
                await client.open(f"/tenants/acme/wells/{well}/stream", headers, well)
            streams = list(client.streams.values())
            with anyio.fail_after(30):
                await wait_until(lambda: all(stream.events for stream in streams))  # every snapshot
            assert established_connections(httpx.URL(https).port or 443) == 1

            start = time.monotonic()
            published = await publish_for(broker, WELLS, PUBLISH_FOR_S)
            stop = time.monotonic()
            # Whatever is still on its way arrives; a stalled stream never completes, and is reported below.
            with anyio.move_on_after(MAX_GAP_S):
                await wait_until(lambda: all(len(s.readings()) >= len(published[s.well]) for s in streams), 0.1)

            assert established_connections(httpx.URL(https).port or 443) == 1
            assert client.closed is None
            async with httpx.AsyncClient(base_url=plain) as http:
                samples = parse_samples((await http.get("/metrics")).text)
    assert {stream.status for stream in streams} == {200}
    assert [stream.well for stream in streams if stream.ended] == []
    gaps = {stream.well: longest_gap(stream.readings(), start, stop) for stream in streams}
    assert {well: gap for well, gap in gaps.items() if gap > MAX_GAP_S} == {}
    assert [s.well for s in streams if not any(stop - LAST_S <= t <= stop for t in s.readings())] == []
    for stream in streams:
        assert_no_gap_no_duplicate([{"event": name, "id": i} for _, name, i in stream.events], published[stream.well])
    # What the gateway counts as sent is what arrived: nothing is left sitting in a buffer it thinks delivered.
    assert value(samples, "wellstream_events_sent_total") == sum(len(s.readings()) for s in streams)


async def test_a_stream_whose_client_stops_opening_its_window_is_reset_while_its_neighbour_flows(
    secret: str, token, redis_url: str, dev_cert: DevCert, tmp_path: Path
) -> None:
    """Over HTTP/1.1 a client that stops reading fills its socket and the gateway's send waits; over
    HTTP/2 the client says so by not opening the stream's window. Either way the gateway must see the
    wait and end the stream (stream.stall_s), so the client resumes, instead of leaving it open and
    silent, and counted live, as Hypercorn's unbounded stream buffer did (app/gateway/server.py)."""
    headers = {"authorization": f"Bearer {token('acme')}"}
    stuck_well, flowing_well = "s1", "f1"
    with anyio.fail_after(90):
        async with (
            tls_gateway(secret, redis_url, dev_cert, tmp_path, [stuck_well, flowing_well]) as (https, plain, _),
            connect_redis(redis_url) as broker,
            h2_client(https, dev_cert) as client,
        ):
            stuck = await client.open(f"/tenants/acme/wells/{stuck_well}/stream", headers, stuck_well)
            flowing = await client.open(f"/tenants/acme/wells/{flowing_well}/stream", headers, flowing_well)
            client.withheld.add(stuck.id)
            await wait_until(lambda: bool(stuck.events and flowing.events))
            published: dict[str, list[str]] = {stuck_well: [], flowing_well: []}

            async def publish() -> None:  # 100 a second a well: the window and Hypercorn's buffer fill in seconds
                for n in itertools.count():
                    batch = [make_reading(float(n), tag=f"t{k}", well=w) for w in published for k in range(5)]
                    for reading, stream_id in zip(batch, await broker.log.publish(batch), strict=True):
                        published[reading.well_id].append(str(stream_id))
                    await asyncio.sleep(0.05)

            publishing = asyncio.create_task(publish())
            try:
                with anyio.move_on_after(30):  # the buffer fills, then stall_s (5 s)
                    await wait_until(lambda: stuck.ended is not None, 0.1)
            finally:
                publishing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await publishing
            with anyio.move_on_after(MAX_GAP_S):
                await wait_until(lambda: len(flowing.readings()) >= len(published[flowing_well]), 0.1)
            async with httpx.AsyncClient(base_url=plain) as http:
                samples = parse_samples((await http.get("/metrics")).text)
            assert client.closed is None
    assert stuck.ended == "StreamReset"
    ended_for_not_reading = ("stalled_streams", "send_timeouts", "slow_evictions")
    assert sum(value(samples, f"wellstream_{name}_total") for name in ended_for_not_reading) == 1
    assert flowing.ended is None
    assert_no_gap_no_duplicate([{"event": name, "id": i} for _, name, i in flowing.events], published[flowing_well])
