"""ReconnectLoop against a real TCP peer on loopback: a port that refuses, then listens, then hangs up."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator

import anyio
import pytest

from app.adapters.reconnect import ReconnectLoop, describe
from app.errors import ConnectionLost
from tests.conftest import free_port, wait_until

pytestmark = pytest.mark.anyio

LOGGER = logging.getLogger("tests.reconnect")


class Peer:
    """A TCP server on a fixed loopback port; stopping it hangs up on every client and stops listening."""

    def __init__(self) -> None:
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._clients: list[asyncio.StreamWriter] = []
        self.greeting = b""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._clients:
            writer.close()
        await self._server.wait_closed()
        self._clients.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.append(writer)
        writer.write(self.greeting)
        await writer.drain()


class Client:
    """The smallest adapter: a session is a TCP connection, served until the peer hangs up."""

    def __init__(self, peer: Peer, handshake: bool = False) -> None:
        self.port = peer.port
        self.handshake = handshake  # read a number from the peer before the session counts as open
        self.attempts: list[float] = []

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[asyncio.StreamReader]:
        self.attempts.append(time.monotonic())
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError as exc:
            raise ConnectionLost("probe", "cannot connect") from exc
        try:
            if self.handshake:
                int(await reader.readline())  # a peer speaking nonsense: a failure nobody translated
            yield reader
        finally:
            writer.close()

    async def serve(self, reader: asyncio.StreamReader) -> None:
        await reader.read()
        raise ConnectionLost("probe", "the peer hung up")


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    peer = Peer()
    yield peer
    with contextlib.suppress(AssertionError):
        await peer.stop()


@contextlib.asynccontextmanager
async def looping(loop: ReconnectLoop, client: Client) -> AsyncIterator[None]:
    """The loop as a task; cancelling it must end it with CancelledError, disconnected."""
    task = asyncio.create_task(loop.run(client.session, client.serve))
    try:
        yield
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not loop.connected


def outage_lines(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER.name and r.levelno == level and "retrying" in r.message]


async def test_failed_attempts_back_off_doubling_up_to_the_cap(peer: Peer) -> None:
    first_s, cap_s = 0.02, 0.08
    loop = ReconnectLoop("test", "probe", first_s=first_s, cap_s=cap_s, logger=LOGGER)
    client = Client(peer)
    with anyio.fail_after(10):
        async with looping(loop, client):
            await wait_until(lambda: loop.errors >= 7)
    gaps = [later - earlier for earlier, later in itertools.pairwise(client.attempts)][:6]
    ceilings = [min(cap_s, first_s * 2**n) for n in range(len(gaps))]  # 0.02, 0.04, 0.08, 0.08, ...
    # Each wait is drawn from the upper half of its ceiling; the loop's clock may fire a tick early.
    assert all(gap >= ceiling / 2 - 0.005 for gap, ceiling in zip(gaps, ceilings, strict=True)), gaps
    # Uncapped, the sixth wait would be at least 0.32 s.
    assert max(gaps) < 0.3, gaps
    assert loop.errors >= 7
    assert not loop.connected


async def test_an_outage_is_logged_once_and_a_success_ends_it(peer: Peer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER.name)
    loop = ReconnectLoop("test", "probe", first_s=0.01, cap_s=0.05, logger=LOGGER)
    with anyio.fail_after(10):
        async with looping(loop, Client(peer)):
            await wait_until(lambda: loop.errors >= 4)
            await peer.start()
            await wait_until(lambda: loop.connected)
            failed = loop.errors
            await peer.stop()
            await wait_until(lambda: loop.errors >= failed + 4)
            await peer.start()
            await wait_until(lambda: loop.connected)
    warnings = outage_lines(caplog, logging.WARNING)
    assert [r.getMessage().split("; retrying")[0] for r in warnings] == [
        "test probe: cannot connect",
        "test probe: the peer hung up",
    ]
    assert len(outage_lines(caplog, logging.DEBUG)) == loop.errors - 2
    _, _, first_wait_of_the_second_outage = warnings[1].args or ()
    assert isinstance(first_wait_of_the_second_outage, float)
    assert first_wait_of_the_second_outage <= 0.01, "a success starts the backoff over"


async def test_a_failure_nobody_translated_is_logged_with_its_traceback_once(
    peer: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER.name)
    peer.greeting = b"not a number\n"
    await peer.start()
    loop = ReconnectLoop("test", "probe", first_s=0.01, cap_s=0.02, logger=LOGGER)
    with anyio.fail_after(10):
        async with looping(loop, Client(peer, handshake=True)):
            await wait_until(lambda: loop.errors >= 3)
    (warning,) = outage_lines(caplog, logging.WARNING)
    assert warning.exc_info
    assert "invalid literal for int()" in warning.getMessage()
    assert not any(r.exc_info for r in outage_lines(caplog, logging.DEBUG))


def test_describe_names_every_failure_of_a_group_and_an_adapter_error_by_its_detail() -> None:
    group = ExceptionGroup("poll", [ConnectionLost("plc", "connection dropped"), ValueError("bad"), TimeoutError()])

    assert describe(ExceptionGroup("outer", [group])) == "connection dropped; bad; TimeoutError"


def test_credentials_are_looked_up_by_name_at_each_call_and_a_missing_one_is_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER.name)
    credentials = {"PLC_USER": "operator"}
    loop = ReconnectLoop("test", "probe", first_s=0.1, cap_s=1, logger=LOGGER, credentials=credentials)

    assert loop.secret("PLC_USER") == "operator"
    assert loop.secret(None) is None
    assert caplog.records == []
    assert loop.secret("PLC_PASSWORD") is None
    credentials["PLC_PASSWORD"] = "s3cret"
    assert loop.secret("PLC_PASSWORD") == "s3cret"

    assert [r.getMessage() for r in caplog.records] == ["test probe: environment variable PLC_PASSWORD is not set"]
