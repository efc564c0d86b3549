"""`wellstream serve --hypercorn-config` from config/hypercorn.toml with a `wellstream dev-cert` certificate:
HTTP/2 over TLS (many streams on one connection), and HTTP/1.1 and h2c on the cleartext port; and the
changes app.gateway.server makes to Hypercorn's HTTP/2 connection, driven in this process by an h2 client
(tests/deploy/test_h2_chromium.py runs them against Chromium)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import h2.config
import h2.connection
import h2.errors
import h2.events
import httpx
import hypercorn.protocol
import pytest
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.asyncio.task_group import TaskGroup
from hypercorn.asyncio.worker_context import WorkerContext
from hypercorn.events import Closed, RawData
from hypercorn.events import Event as ConnectionEvent
from hypercorn.protocol import ProtocolWrapper
from hypercorn.typing import ConnectionState

from app.gateway.devcert import DevCert
from app.gateway.server import MAX_H2_STREAMS, StreamingH2Protocol, hypercorn_config, use_streaming_h2
from app.streams.redis import connect_redis
from tests.conftest import ROOT, free_port, gateway_env, make_settings, wait_until
from tests.deploy.processes import CONFIG, Gateway, gateway, render
from tests.factories import make_reading
from tests.sse_client import SSEReader

pytestmark = pytest.mark.anyio

WELLS = [f"h2-{n:02d}" for n in range(50)]


@contextlib.asynccontextmanager
async def tls_gateway(
    secret: str, redis_url: str, dev_cert: DevCert, workdir: Path, wells: list[str] = WELLS
) -> AsyncIterator[tuple[str, str, Gateway]]:
    """A gateway serving config/hypercorn.toml (ports and certificate swapped), `wells` registered for
    tenant acme: (https URL, http URL, process)."""
    tls_port, plain_port = free_port(), free_port()
    toml = workdir / "hypercorn.toml"
    replacements = {
        "127.0.0.1:8443": f"127.0.0.1:{tls_port}",
        "127.0.0.1:8000": f"127.0.0.1:{plain_port}",
        '"certs/server.pem"': json.dumps(str(dev_cert.cert)),
        '"certs/server.key"': json.dumps(str(dev_cert.key)),
    }
    toml.write_text(render(CONFIG / "hypercorn.toml", replacements))
    env = gateway_env(secret, redis_url, WELLSTREAM_WELLS=json.dumps({"acme": wells}))
    env["WELLSTREAM_STREAM__SHUTDOWN_GRACE_S"] = "1"
    plain = f"http://127.0.0.1:{plain_port}"
    async with gateway(["--hypercorn-config", str(toml)], env, plain + "/readyz") as process:
        yield f"https://127.0.0.1:{tls_port}", plain, process


def established_connections(port: int) -> int:
    """Client-side TCP connections to `port`, as the kernel counts them."""
    listing = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( dport = :{port} )"], capture_output=True, text=True, check=True
    ).stdout
    return len(listing.splitlines())


async def test_fifty_streams_of_fifty_wells_flow_over_one_tls_connection(
    secret: str, token, redis_url: str, dev_cert: DevCert, tls_context: ssl.SSLContext, tmp_path
) -> None:
    headers = {"Authorization": f"Bearer {token('acme')}"}
    with anyio.fail_after(60):
        async with (
            tls_gateway(secret, redis_url, dev_cert, tmp_path) as (https, _, served),
            httpx.AsyncClient(base_url=https, http2=True, verify=tls_context, timeout=20) as client,
            connect_redis(redis_url) as publisher,
            contextlib.AsyncExitStack() as stack,
        ):
            responses = [
                await stack.enter_async_context(
                    client.stream("GET", f"/tenants/acme/wells/{well}/stream", headers=headers)
                )
                for well in WELLS
            ]
            assert {(r.status_code, r.http_version) for r in responses} == {(200, "HTTP/2")}
            assert established_connections(httpx.URL(https).port or 443) == 1
            readers = [SSEReader(response) for response in responses]
            for reader in readers:
                await reader.next_event("snapshot")
            ids = await publisher.log.publish([make_reading(float(n), well=well) for n, well in enumerate(WELLS)])
            events = await asyncio.gather(*(reader.next_event("reading") for reader in readers))
            # SIGTERM: every stream on the connection ends with a goodbye, and the process exits,
            # even though this client, unlike a browser, leaves the TLS connection open: the
            # bound is below the 30 s a gateway would wait for the client's close_notify.
            served.process.send_signal(signal.SIGTERM)
            with anyio.fail_after(20):
                endings = await asyncio.gather(*(reader.collect() for reader in readers))
                assert await served.process.wait() == 0
    assert [(event.json()["wellId"], event.json()["value"]) for event in events] == [
        (well, float(n)) for n, well in enumerate(WELLS)
    ]
    assert [event.id for event in events] == [str(stream_id) for stream_id in ids]
    assert all(blocks[-1].retry is not None and "shutting down" in " ".join(blocks[-1].comments) for blocks in endings)


async def test_the_cleartext_port_speaks_http1_and_h2c(secret: str, token, redis_url: str, dev_cert: DevCert, tmp_path):
    headers = {"Authorization": f"Bearer {token('acme')}"}
    path = f"/tenants/acme/wells/{WELLS[0]}/stream"
    with anyio.fail_after(30):
        async with (
            tls_gateway(secret, redis_url, dev_cert, tmp_path) as (_, plain, _),
            httpx.AsyncClient(base_url=plain, timeout=10) as h1,
            httpx.AsyncClient(base_url=plain, http1=False, http2=True, timeout=10) as h2c,
            h1.stream("GET", path, headers=headers) as over_h1,
            h2c.stream("GET", path, headers=headers) as over_h2c,
        ):
            assert (over_h1.status_code, over_h1.http_version) == (200, "HTTP/1.1")
            assert (over_h2c.status_code, over_h2c.http_version) == (200, "HTTP/2")
            for response in (over_h1, over_h2c):
                assert (await SSEReader(response).next_event("snapshot")).json()["wellId"] == WELLS[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hypercorn-config", "no/such.toml"], "existing file"),
        (["--server", "uvicorn", "--hypercorn-config", "config/hypercorn.toml"], "--server hypercorn"),
    ],
)
def test_serve_refuses_a_hypercorn_config_it_cannot_use(secret: str, args: list[str], message: str) -> None:
    env = gateway_env(secret, "")
    result = subprocess.run(
        [sys.executable, "-m", "app", "serve", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
    assert message in result.stderr


def test_dev_cert_writes_a_ca_a_server_certificate_and_a_private_key_only_its_owner_reads(tmp_path) -> None:
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-m", "app", "dev-cert", "--dir", str(tmp_path)], cwd=ROOT, env=env, check=True)
    assert (tmp_path / "server.key").stat().st_mode & 0o777 == 0o600
    assert not any("PRIVATE KEY" in (tmp_path / name).read_text() for name in ("ca.pem", "server.pem"))
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    context.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")  # the key matches the certificate


# Hypercorn's HTTP/2 connection in this process: an h2 client on one side, the gateway's protocol class on the other.

ASGIApp = Callable[
    [dict[str, Any], Callable[[], Awaitable[dict[str, Any]]], Callable[[dict[str, Any]], Awaitable[None]]],
    Awaitable[None],
]


class Wire:
    """The transport of one connection: what the server writes goes to an h2 client, whose events pile up in
    `events`; `closed` is set once the server asks for the connection to be closed."""

    def __init__(self) -> None:
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.client.initiate_connection()
        self.events: list[h2.events.Event] = []
        self.closed = asyncio.Event()

    async def send(self, event: ConnectionEvent) -> None:
        if isinstance(event, RawData):
            self.events.extend(self.client.receive_data(event.data))
        elif isinstance(event, Closed):
            self.closed.set()

    def streams_with(self, kind: type[h2.events.Event]) -> set[int]:
        return {event.stream_id for event in self.events if isinstance(event, kind)}  # type: ignore[attr-defined]


def get(path: str) -> list[tuple[str, str]]:
    return [(":method", "GET"), (":path", path), (":scheme", "https"), (":authority", "127.0.0.1")]


@contextlib.asynccontextmanager
async def h2_connection(app: ASGIApp, secret: str, alpn: str = "h2") -> AsyncIterator[tuple[ProtocolWrapper, Wire]]:
    """A connection as Hypercorn's TCPServer runs one, with config/hypercorn.toml as the gateway loads it;
    the client's preface and settings already went in. Leaving it is the peer going away."""
    use_streaming_h2()
    config = hypercorn_config(make_settings(secret), "127.0.0.1", 0, CONFIG / "hypercorn.toml")
    wire = Wire()
    async with TaskGroup(asyncio.get_running_loop()) as task_group:
        protocol = ProtocolWrapper(
            ASGIWrapper(app),  # type: ignore[arg-type]
            config,
            WorkerContext(None),
            task_group,
            ConnectionState({}),
            alpn == "h2",
            ("127.0.0.1", 50000),
            ("127.0.0.1", 8443),
            wire.send,
            alpn,
        )
        await protocol.initiate()
        await protocol.handle(RawData(wire.client.data_to_send()))
        yield protocol, wire
        await protocol.handle(Closed())


async def sse_until_disconnect(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()  # the request's (empty) body
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
    while (await receive())["type"] != "http.disconnect":
        pass


def test_the_committed_config_carries_300_streams_a_connection_and_never_ends_one_for_its_request_count(
    secret: str, tmp_path: Path
) -> None:
    config = hypercorn_config(make_settings(secret), "127.0.0.1", 0, CONFIG / "hypercorn.toml")
    assert config.h2_max_concurrent_streams >= 300
    # Hypercorn's GOAWAY at keep_alive_max_requests leaves h2 refusing to send on that connection at all.
    assert config.keep_alive_max_requests >= 2**62
    greedy = tmp_path / "greedy.toml"
    greedy.write_text("h2_max_concurrent_streams = 5000\n")
    assert hypercorn_config(make_settings(secret), "127.0.0.1", 0, greedy).h2_max_concurrent_streams == MAX_H2_STREAMS


async def test_hypercorn_builds_the_streaming_protocol_for_h2_and_for_h2c_by_prior_knowledge(secret: str) -> None:
    # ProtocolWrapper looks the class up as hypercorn.protocol.H2Protocol for ALPN h2, h2c by prior
    # knowledge and h2c by Upgrade alike; a Hypercorn that builds it some other way fails here.
    with anyio.fail_after(10):
        async with h2_connection(sse_until_disconnect, secret) as (over_tls, _):
            assert type(over_tls.protocol) is StreamingH2Protocol
        async with h2_connection(sse_until_disconnect, secret, alpn="http/1.1") as (cleartext, _):
            assert type(cleartext.protocol) is StreamingH2Protocol  # the preface switched it to HTTP/2
    assert vars(hypercorn.protocol)["H2Protocol"] is StreamingH2Protocol


async def test_300_streams_chained_by_priority_as_chromium_chains_them_are_all_answered(secret: str) -> None:
    # Chromium makes each request depend exclusively on the one before: Hypercorn's own priority
    # handling failed on this from the 101st stream (PriorityLoop), which froze the connection.
    with anyio.fail_after(30):
        async with h2_connection(sse_until_disconnect, secret) as (protocol, wire):
            previous = 0
            for n in range(300):
                stream_id = wire.client.get_next_available_stream_id()
                wire.client.send_headers(
                    stream_id,
                    get(f"/w{n}"),
                    end_stream=True,
                    priority_weight=147,
                    priority_depends_on=previous,
                    priority_exclusive=True,
                )
                previous = stream_id
            await protocol.handle(RawData(wire.client.data_to_send()))
            await wait_until(lambda: len(wire.streams_with(h2.events.DataReceived)) == 300 or wire.closed.is_set())
            assert not wire.closed.is_set()
            assert len(wire.streams_with(h2.events.ResponseReceived)) == 300


async def settle(connection: asyncio.Task[None], protocols: list[ProtocolWrapper]) -> bool:
    """Waits (10 s at most) for a connection driven by `connection`; whether it finished. One that did
    not has streams stuck for good (stock Hypercorn): they are released by hand, as StreamingH2Protocol
    releases them, so the task does not outlive the test (cancelling it would not end it)."""
    done, _ = await asyncio.wait({connection}, timeout=10)
    if connection in done:
        return True
    for protocol in protocols:
        for buffer in list(getattr(protocol.protocol, "stream_buffers", {}).values()):
            await buffer.close()
    await asyncio.wait({connection})
    return False


async def test_a_connection_whose_frames_fail_is_closed_and_its_streams_end(
    secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anything else a frame trips inside Hypercorn, h2 or priority: that one connection is closed
    (GOAWAY, then its streams get http.disconnect) and the error does not reach Hypercorn's read loop."""
    waiting, ended = asyncio.Event(), asyncio.Event()
    protocols: list[ProtocolWrapper] = []

    async def unanswered(scope: dict[str, Any], receive: Any, send: Any) -> None:
        waiting.set()  # like a stream still waiting for Redis: no response yet
        while (await receive())["type"] != "http.disconnect":
            pass
        ended.set()

    def broken(data: bytes) -> list[h2.events.Event]:
        raise RuntimeError("a frame this connection cannot handle")

    async def failing() -> None:
        async with h2_connection(unanswered, secret) as (protocol, wire):
            protocols.append(protocol)
            wire.client.send_headers(1, get("/w1"), end_stream=True)
            await protocol.handle(RawData(wire.client.data_to_send()))
            await waiting.wait()
            monkeypatch.setattr(protocol.protocol.connection, "receive_data", broken)
            await protocol.handle(RawData(b"\0"))
            assert wire.closed.is_set()
            goaway = [event for event in wire.events if isinstance(event, h2.events.ConnectionTerminated)]
            assert [event.error_code for event in goaway] == [h2.errors.ErrorCodes.INTERNAL_ERROR]
        await ended.wait()

    connection = asyncio.create_task(failing())
    assert await settle(connection, protocols), "the connection's tasks never finished"
    connection.result()


async def test_streams_of_a_connection_torn_down_under_them_end_instead_of_waiting_for_ever(secret: str) -> None:
    """An error that does leave Hypercorn's read loop makes the connection's task group cancel its
    tasks, the send task among them; a request cancelled before its response started then sends a
    500 and waits for the send task to drain it. Stock Hypercorn waited for ever there, and with it
    the connection (open, unread) and a SIGTERM's shutdown."""
    waiting = asyncio.Event()
    protocols: list[ProtocolWrapper] = []

    async def unanswered(scope: dict[str, Any], receive: Any, send: Any) -> None:
        waiting.set()
        await asyncio.Event().wait()  # until cancelled

    async def torn_down() -> None:
        async with h2_connection(unanswered, secret) as (protocol, wire):
            protocols.append(protocol)
            wire.client.send_headers(1, get("/w1"), end_stream=True)
            await protocol.handle(RawData(wire.client.data_to_send()))
            await waiting.wait()
            raise RuntimeError("the read loop failed")

    connection = asyncio.create_task(torn_down())
    assert await settle(connection, protocols), "the connection's tasks never finished"
    with pytest.raises(ExceptionGroup) as failed:
        connection.result()
    assert [str(error) for error in failed.value.exceptions] == ["the read loop failed"]


async def test_a_stream_whose_app_returns_before_ending_it_is_reset_not_left_open(secret: str) -> None:
    """A stream the gateway breaks off (a stuck send) returns without ending its response; over
    HTTP/2 Hypercorn would leave that stream open and silent, and the browser would say live."""
    released = asyncio.Event()

    async def broken_off(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await released.wait()  # then it returns, the response never ended

    with anyio.fail_after(10):
        async with h2_connection(broken_off, secret) as (protocol, wire):
            wire.client.send_headers(1, get("/w1"), end_stream=True)
            await protocol.handle(RawData(wire.client.data_to_send()))
            await wait_until(lambda: 1 in wire.streams_with(h2.events.DataReceived))
            released.set()
            await wait_until(lambda: 1 in wire.streams_with(h2.events.StreamReset))
            [reset] = [event for event in wire.events if isinstance(event, h2.events.StreamReset)]
            assert reset.error_code == h2.errors.ErrorCodes.CANCEL
            assert not wire.closed.is_set(), "only that stream ends; the connection carries on"


async def test_a_stream_given_no_flow_control_window_holds_its_app_at_hypercorns_buffer(secret: str) -> None:
    """A client that stops opening a stream's window (or the connection's) must hold the app's sends
    back, as a full socket does over HTTP/1.1: then the gateway sees a reading it cannot send and ends
    the stream within stream.stall_s. Stock Hypercorn, finding the window closed, popped 0 bytes from
    the stream's buffer and so released its high-water pause at every send: the app sent on into a
    buffer without bound, the stream stayed open, silent and counted live (issue 19)."""
    chunk, chunks = b"x" * 1024, 1000
    progress = {"sent": 0, "in_send": False}

    async def firehose(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for _ in range(chunks):
            progress["in_send"] = True
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            progress["in_send"] = False
            progress["sent"] += len(chunk)
        await send({"type": "http.response.body", "body": b""})

    def received() -> int:
        return sum(len(e.data) for e in wire.events if isinstance(e, h2.events.DataReceived))

    with anyio.fail_after(10):
        async with h2_connection(firehose, secret) as (protocol, wire):
            wire.client.send_headers(1, get("/w1"), end_stream=True)
            await protocol.handle(RawData(wire.client.data_to_send()))
            window = wire.client.local_settings.initial_window_size  # the server may send this much, no more
            await wait_until(lambda: received() == window and bool(progress["in_send"]))
            stuck_at = progress["sent"]
            for _ in range(1000):  # every task in this process gets its turns: nothing else is coming
                await asyncio.sleep(0)
            assert progress["sent"] == stuck_at
            assert stuck_at <= window + 2 * 2**14 + len(chunk)  # the window, then Hypercorn's high-water mark
            # The window opens: the app goes on. It was waiting for the client, not dead.
            wire.client.increment_flow_control_window(10 * window)
            wire.client.increment_flow_control_window(10 * window, 1)
            await protocol.handle(RawData(wire.client.data_to_send()))
            await wait_until(lambda: progress["sent"] > stuck_at)
