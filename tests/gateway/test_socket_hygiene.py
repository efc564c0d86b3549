"""No connection holds a descriptor for long without asking anything, on every server (security
issue 15, item 1; app/gateway/sockets.py).

Hypercorn 0.18 kept a connection whose peer closed before its first request (or between two) in
CLOSE-WAIT for its keep-alive timeout, 75 s: about 270 connect-and-close a second used up the
gateway's 20,000 descriptors within a minute. uvicorn never closed a connection that sent nothing,
or a request line a byte at a time. Each test runs a real gateway process on loopback and reads its
descriptors from /proc/<pid>/fd and its sockets' states from /proc/<pid>/net/tcp.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from ipaddress import ip_network
from pathlib import Path

import anyio
import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from app.auth.tokens import mint_token
from app.gateway.sockets import ConnectionCap, connection_cap
from tests.conftest import gateway_process, make_settings, wait_until

pytestmark = pytest.mark.anyio

SERVERS = ["hypercorn", "uvicorn", "granian"]

# The finding's own run is 12,000 at 300/s (40 s a server): WELLSTREAM_TEST_CHURN=12000. The
# suite's 3,000 at the same rate leave 3,000 descriptors behind on an unfixed Hypercorn.
CHURN = int(os.environ.get("WELLSTREAM_TEST_CHURN", "3000"))
RATE = 300
# Descriptors a gateway may hold above its idle count once the load is over; a leak is one per
# connection, so thousands.
MARGIN = 5
GRACE_S = 3  # how much later than its timeout a connection may be closed

HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
CLOSE_WAIT = "08"  # the state column of /proc/net/tcp


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def close_waiting(pid: int, port: int) -> int:
    """The gateway's sockets on `port` whose peer has closed and that the gateway has not."""
    lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    local = f":{port:04X}"
    return sum(1 for line in lines if line.split()[1].endswith(local) and line.split()[3] == CLOSE_WAIT)


@dataclass
class Served:
    pid: int
    port: int
    url: str
    idle_fds: int = 0

    def fds(self) -> int:
        return fd_count(self.pid)

    def close_waiting(self) -> int:
        return close_waiting(self.pid, self.port)

    async def settled(self, within_s: float = GRACE_S) -> tuple[int, int]:
        """Descriptors and CLOSE-WAIT sockets once back near idle, or as they are `within_s` later."""
        deadline = time.monotonic() + within_s
        while True:
            fds, waiting = self.fds(), self.close_waiting()
            if (fds <= self.idle_fds + MARGIN and waiting == 0) or time.monotonic() > deadline:
                return fds, waiting
            await asyncio.sleep(0.1)

    async def healthz(self) -> int:
        async with httpx.AsyncClient() as client:
            return (await client.get(f"{self.url}/healthz", timeout=5)).status_code


@contextlib.asynccontextmanager
async def serving(secret: str, server: str, **env: str) -> AsyncIterator[Served]:
    async with gateway_process(secret, server, **env) as gateway:
        served = Served(gateway.process.pid, int(gateway.url.rsplit(":", 1)[1]), gateway.url)
        assert await served.healthz() == 200
        await asyncio.sleep(0.5)  # the probes' connections close
        served.idle_fds = served.fds()
        yield served


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


@contextlib.asynccontextmanager
async def opened(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await connect(port)
    try:
        yield reader, writer
    finally:
        writer.close()


async def closed_by_server(reader: asyncio.StreamReader) -> None:
    """Returns once the server has closed the connection (EOF or reset); discards what it sends."""
    with contextlib.suppress(ConnectionError):
        while await reader.read(65536):
            pass


async def read_response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")), 0
    )
    return head + await reader.readexactly(length)


async def churn(port: int, total: int, rate: float) -> int:
    """`total` connections opened at `rate` a second, each closed at once without a byte sent;
    returns how many could not connect."""
    failed = 0
    start = time.monotonic()

    async def one() -> None:
        nonlocal failed
        try:
            _, writer = await connect(port)
        except OSError:
            failed += 1
            return
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    async with anyio.create_task_group() as tasks:
        for n in range(total):
            await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
            tasks.start_soon(one)
    return failed


async def sample(served: Served, into: dict[str, int]) -> None:
    """The highest descriptor and CLOSE-WAIT counts while it runs."""
    while True:
        into["fds"] = max(into.get("fds", 0), served.fds())
        into["close_wait"] = max(into.get("close_wait", 0), served.close_waiting())
        await asyncio.sleep(0.25)


@pytest.mark.parametrize("server", SERVERS)
async def test_connect_and_close_churn_leaves_the_descriptors_at_idle(secret: str, server: str) -> None:
    with anyio.fail_after(CHURN / RATE + 45):
        async with serving(secret, server) as served:
            peak: dict[str, int] = {}
            sampler = asyncio.create_task(sample(served, peak))
            began = time.monotonic()
            failed = await churn(served.port, CHURN, RATE)
            took = time.monotonic() - began
            fds, waiting = await served.settled()
            sampler.cancel()
            print(
                f"{server}: {CHURN} connect+close in {took:.1f} s; fds idle {served.idle_fds}, peak {peak['fds']},"
                f" after {fds}; CLOSE-WAIT peak {peak['close_wait']}, after {waiting}"
            )
            assert failed == 0
            assert fds <= served.idle_fds + MARGIN, f"{fds - served.idle_fds} descriptors left by {CHURN} connections"
            assert waiting == 0
            assert await served.healthz() == 200


async def h2c_exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """HTTP/2 by prior knowledge: a GET /healthz, read until its response has ended or the server
    has closed (a server without h2c answers 400, or nothing)."""
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    headers = [(":method", "GET"), (":path", "/healthz"), (":scheme", "http"), (":authority", "127.0.0.1")]
    connection.send_headers(1, headers, end_stream=True)
    writer.write(connection.data_to_send())
    while data := await reader.read(65536):
        if data.startswith(b"HTTP/1.1"):
            return
        if any(isinstance(event, h2.events.StreamEnded) for event in connection.receive_data(data)):
            return


def behaviours(secret: str) -> dict[str, Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]]:
    """What a client may do with a connection before it closes it."""
    stream_request = (
        b"GET /tenants/acme/wells/w1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer " + mint_token(secret, "acme", "tester", None, 600).encode() + b"\r\n\r\n"
    )

    async def nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        return

    async def one_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD)
        assert (await read_response(reader)).startswith(b"HTTP/1.1 200")

    async def part_of_a_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD[:20])
        await writer.drain()

    async def a_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(stream_request)
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")

    return {
        "connect, then close": nothing,
        "one request, then close": one_request,
        "part of a request head, then close": part_of_a_head,
        "an open stream, then close": a_stream,
        "an h2c request, then close": h2c_exchange,
    }


@pytest.mark.parametrize("server", SERVERS)
async def test_no_socket_outlives_its_peer_whatever_the_client_did(secret: str, server: str) -> None:
    with anyio.fail_after(60):
        async with serving(secret, server) as served:
            for name, behave in behaviours(secret).items():

                async def once(behave: Callable[..., Awaitable[None]] = behave) -> None:
                    async with opened(served.port) as (reader, writer):
                        await behave(reader, writer)

                async with anyio.create_task_group() as tasks:
                    for _ in range(20):
                        tasks.start_soon(once)
                fds, waiting = await served.settled()
                assert fds <= served.idle_fds + MARGIN, f"{name}: {fds} descriptors, {served.idle_fds} when idle"
                assert waiting == 0, f"{name}: {waiting} sockets in CLOSE-WAIT"
            assert await served.healthz() == 200


async def seconds_until_closed(reader: asyncio.StreamReader, since: float, limit_s: float) -> float | None:
    with anyio.move_on_after(limit_s):
        await closed_by_server(reader)
        return time.monotonic() - since
    return None


async def dribble(writer: asyncio.StreamWriter, data: bytes, every_s: float) -> None:
    """Sends `data` a byte at a time, until it is sent or the connection is gone."""
    with contextlib.suppress(ConnectionError):
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(every_s)


HEAD_TIMEOUT_S = 2
KEEP_ALIVE_S = 4


@pytest.mark.parametrize("server", SERVERS)
async def test_silent_slow_and_idle_connections_are_closed_within_their_timeouts(secret: str, server: str) -> None:
    env = {"WELLSTREAM_SERVER__REQUEST_HEAD_TIMEOUT_S": str(HEAD_TIMEOUT_S)}
    env["WELLSTREAM_SERVER__KEEP_ALIVE_S"] = str(KEEP_ALIVE_S)
    # A request line that never ends: one byte every 0.25 s lasts longer than any timeout here.
    endless = b"GET /healthz?" + b"x" * 200
    with anyio.fail_after(45):
        async with serving(secret, server, **env) as served:

            async def silent() -> float | None:
                async with opened(served.port) as (reader, _):
                    return await seconds_until_closed(reader, time.monotonic(), HEAD_TIMEOUT_S + GRACE_S)

            async def slow_head(after_request: bool) -> float | None:
                async with opened(served.port) as (reader, writer):
                    if after_request:  # the next head is due within the keep-alive time
                        writer.write(HEAD)
                        await read_response(reader)
                    since, limit = time.monotonic(), (KEEP_ALIVE_S if after_request else HEAD_TIMEOUT_S) + GRACE_S
                    sender = asyncio.create_task(dribble(writer, endless, 0.25))
                    try:
                        return await seconds_until_closed(reader, since, limit)
                    finally:
                        sender.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await sender

            async def idle_after_request() -> float | None:
                async with opened(served.port) as (reader, writer):
                    writer.write(HEAD)
                    await read_response(reader)
                    return await seconds_until_closed(reader, time.monotonic(), KEEP_ALIVE_S + GRACE_S)

            closed = await asyncio.gather(
                *(silent() for _ in range(5)),
                *(slow_head(after_request=False) for _ in range(5)),
                *(idle_after_request() for _ in range(3)),
                *(slow_head(after_request=True) for _ in range(3)),
            )
            print(f"{server}: closed after {[None if s is None else round(s, 1) for s in closed]} s")
            assert None not in closed, (
                "still open past timeout + 3 s: silent x5, slow head x5, idle x3, slow 2nd head x3"
            )
            fds, waiting = await served.settled()
            assert fds <= served.idle_fds + MARGIN
            assert waiting == 0


CAP = 20


async def refused(port: int) -> bool:
    """Whether a new connection is reset or closed within a second (the reset can come so fast
    that it reaches the client as a failed connect)."""
    try:
        reader, writer = await connect(port)
    except ConnectionError:
        return True
    try:
        return await seconds_until_closed(reader, time.monotonic(), 1) is not None
    finally:
        writer.close()


# Not granian: it accepts in Rust, out of our reach, so it has no cap per address (docs/security.md).
@pytest.mark.parametrize("server", ["hypercorn", "uvicorn"])
async def test_connections_past_the_cap_per_address_are_reset_at_once(secret: str, server: str) -> None:
    env = {"WELLSTREAM_SERVER__CONNECTIONS_PER_ADDRESS": str(CAP), "WELLSTREAM_SERVER__CONNECTION_CAP_EXEMPT": "[]"}
    with anyio.fail_after(30):
        async with serving(secret, server, **env) as served:
            async with contextlib.AsyncExitStack() as stack:
                held = [await stack.enter_async_context(opened(served.port)) for _ in range(CAP)]
                with anyio.fail_after(5):  # accepted, and counted, by the gateway
                    await wait_until(lambda: served.fds() >= served.idle_fds + CAP)
                assert await refused(served.port), "a connection past the cap stays open"
                assert served.fds() <= served.idle_fds + CAP  # and it holds no descriptor
                reader, writer = held[0]  # those admitted are served as ever
                writer.write(HEAD)
                assert (await read_response(reader)).startswith(b"HTTP/1.1 200")
            with anyio.fail_after(5):
                await wait_until(lambda: served.fds() <= served.idle_fds)
            async with opened(served.port) as (reader, writer):  # room again
                writer.write(HEAD)
                assert (await read_response(reader)).startswith(b"HTTP/1.1 200")


def test_the_cap_counts_each_address_and_spares_proxies_and_exempt_networks(secret: str) -> None:
    settings = make_settings(
        secret,
        server={"connections_per_address": 2, "connection_cap_exempt": ["10.0.0.0/8"]},
        auth={"trusted_proxies": ["192.0.2.7"]},
    )
    cap = connection_cap(settings)
    peer, mapped, other = ("198.51.100.1", 40000), ("::ffff:198.51.100.1", 40001, 0, 0), ("198.51.100.2", 1)
    assert cap.admit(peer)
    assert cap.admit(mapped)  # the same address, however the socket spells it
    assert not cap.admit(peer)
    assert cap.admit(other)
    cap.release(mapped)
    assert cap.admit(peer)
    assert cap.open_from(peer) == 2
    for spared in (("10.1.2.3", 1), ("192.0.2.7", 1), None, "/run/gateway.sock"):
        assert all(cap.admit(spared) for _ in range(5))
    assert ConnectionCap(None).admit(peer)
    assert ip_network("10.0.0.0/8") in cap.exempt


@pytest.mark.parametrize("server", SERVERS)
async def test_no_server_names_itself_in_a_header(secret: str, server: str) -> None:
    # Issue 15, item 8: `server: hypercorn-h11` told a scanner which server and version to try.
    with anyio.fail_after(30):
        async with serving(secret, server) as served, httpx.AsyncClient() as client:
            for path in ("/healthz", "/tenants/acme/wells", "/no-such-page"):
                response = await client.get(served.url + path)
                # granian always says its name, without a version, and cannot be told not to
                # (emmett-framework/granian#594): behind a proxy the proxy's header is what goes out.
                expected = "granian" if server == "granian" else None
                assert response.headers.get("server") == expected, path
