"""Security issue 15, item 3: request bodies are bounded while they are read (413 before buffering), on every route.

Against a real `wellstream serve` process under each server. A 64 MiB body is refused with a 413
while the gateway's peak memory (VmHWM in /proc/<pid>/status, reset through clear_refs) stays
put, the connection is closed with the rest of the body unread, and the gateway goes on serving.

Refused bodies go over a raw socket that reads while it sends, as browsers and curl do. The
server closes the connection with the rest of the body unread, which resets it: a client that
reads only once it has sent everything (httpx) sees that reset, and not the 413 before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import anyio
import httpx
import pytest
from hypercorn.asyncio import serve
from hypercorn.config import Config
from starlette.types import Message, Receive, Scope, Send

from app.auth.tokens import mint_token
from app.gateway.bodylimit import BodyLimit
from app.gateway.server import use_closing_streams
from tests.conftest import free_port, gateway_process
from tests.prometheus import parse_samples, value

pytestmark = pytest.mark.anyio

SERVERS = ["hypercorn", "uvicorn", "granian"]
LIMIT = 16_384  # server.max_body_bytes's default
HUGE = 64 * 2**20
MiB = 2**20
MOST_GROWTH = 8 * MiB
REFUSAL = {"error": f"request body larger than {LIMIT} bytes"}
TICKETS = "/tenants/acme/stream-tickets"
# Every route, GET ones (which never read a body) and the stream route (outside Starlette's routing) too.
ROUTES = [
    ("POST", TICKETS),
    ("POST", "/auth/session"),
    ("GET", "/tenants/acme/wells"),
    ("GET", "/tenants/acme/wells/well-1/latest"),
    ("GET", "/tenants/acme/wells/well-1/stream"),
    ("GET", "/tenants/acme/stream"),
    ("GET", "/healthz"),
    ("GET", "/"),
]
BLOCK = 65536  # body bytes the client hands the socket at a time


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    sent: int  # body bytes the client got into the socket before the server closed it

    def json(self) -> object:
        return json.loads(self.body)


def parse(raw: bytes, sent: int) -> Answer:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    length = int(headers.get("content-length", len(body)))
    return Answer(int(status_line.split()[1]), headers, body[:length], sent)


async def send_body(
    base: str,
    method: str,
    path: str,
    size: int,
    chunked: bool,
    headers: dict[str, str] | None = None,
    piece: int = BLOCK,
) -> Answer:
    """`size` bytes of body (in chunks of `piece` bytes, or with a Content-Length), read back until the server closes.

    The answer is read while the body is being sent, and the connection must end: a server that
    answered but went on reading the body would have to take all of it first.
    """
    host, port = base.removeprefix("http://").rsplit(":", 1)
    framing = {"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": str(size)}
    head = [
        f"{method} {path} HTTP/1.1",
        f"Host: {host}",
        *(f"{k}: {v}" for k, v in {**framing, **(headers or {})}.items()),
    ]
    loop = asyncio.get_running_loop()
    sent = 0

    def encoded(part: int) -> bytes:
        if not chunked:
            return b"x" * part
        pieces = [min(piece, part - start) for start in range(0, part, piece)]
        return b"".join(b"%x\r\n%s\r\n" % (n, b"x" * n) for n in pieces)

    async def pump(sock: socket.socket) -> None:
        nonlocal sent
        block = encoded(BLOCK)
        with contextlib.suppress(OSError):  # the server closed the connection: what a refusal does
            while sent < size:
                part = min(BLOCK, size - sent)
                await loop.sock_sendall(sock, block if part == BLOCK else encoded(part))
                sent += part
            if chunked:
                await loop.sock_sendall(sock, b"0\r\n\r\n")

    with socket.create_connection((host, int(port))) as sock:
        sock.setblocking(False)
        await loop.sock_sendall(sock, ("\r\n".join(head) + "\r\n\r\n").encode())
        sending = asyncio.create_task(pump(sock))
        received = b""
        with contextlib.suppress(ConnectionResetError):  # after the answer: the unread body's reset
            while data := await loop.sock_recv(sock, 65536):
                received += data
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending
    return parse(received, sent)


def memory(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@contextlib.contextmanager
def peak_growth(pid: int) -> Iterator[list[int]]:
    """The most the process's resident memory rose above where it was, measured within the block."""
    before = memory(pid, "VmRSS")
    with open(f"/proc/{pid}/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM, the peak, to the current RSS
    growth: list[int] = []
    yield growth
    growth.append(memory(pid, "VmHWM") - before)


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(secret, 'acme', 'tester')}"}


@contextlib.asynccontextmanager
async def gateway(secret: str, server: str) -> AsyncIterator[tuple[str, int]]:
    async with gateway_process(secret, server) as process:
        yield process.url, process.process.pid


async def refusals(base: str) -> float:
    async with httpx.AsyncClient() as client:
        scraped = parse_samples((await client.get(base + "/metrics")).text)
    return value(scraped, "wellstream_refusals_total", kind="limit", reason="body too large")


@pytest.mark.parametrize("server", SERVERS)
async def test_a_64_mib_body_gets_413_without_the_gateway_holding_it(secret: str, server: str) -> None:
    with anyio.fail_after(60):
        async with gateway(secret, server) as (base, pid):
            await send_body(base, "POST", TICKETS, LIMIT + 1, chunked=True, headers=bearer(secret))  # warm-up
            for chunked in (True, False):
                with peak_growth(pid) as growth:
                    answer = await send_body(base, "POST", TICKETS, HUGE, chunked, bearer(secret))
                assert growth[0] < MOST_GROWTH, f"{server}, chunked={chunked}: RSS rose {growth[0] / MiB:.1f} MiB"
                assert (answer.status, answer.json()) == (413, REFUSAL), chunked
                assert answer.headers["connection"] == "close"
                # What the client got out fits in the kernel's socket buffers: the rest was never read.
                assert answer.sent < HUGE / 4, f"{answer.sent / MiB:.1f} MiB were taken before the connection closed"
            async with httpx.AsyncClient() as client:
                assert (await client.get(base + "/healthz")).status_code == 200
            assert await refusals(base) == 3


@pytest.mark.parametrize("server", SERVERS)
async def test_every_route_refuses_a_body_just_over_the_limit(secret: str, server: str) -> None:
    with anyio.fail_after(60):
        async with gateway(secret, server) as (base, _):
            for method, path in ROUTES:
                for chunked in (True, False):
                    answer = await send_body(base, method, path, LIMIT + 1, chunked, bearer(secret))
                    assert (answer.status, answer.json()) == (413, REFUSAL), (method, path, chunked)
            assert await refusals(base) == 2 * len(ROUTES)
            async with httpx.AsyncClient() as client:
                assert (await client.get(base + "/healthz")).status_code == 200


@pytest.mark.parametrize("server", SERVERS)
async def test_a_body_in_small_chunks_is_refused_and_its_connection_closed(secret: str, server: str) -> None:
    # 1 KiB chunks, as a hostile client may send them: many small messages to count, queued by the
    # server faster than they are read, and still refused with the connection closed after the 413.
    with anyio.fail_after(30):
        async with gateway(secret, server) as (base, _):
            for path in (TICKETS, "/healthz"):
                answer = await send_body(base, "POST", path, 256 * 1024, True, bearer(secret), piece=1024)
                assert (answer.status, answer.json()) == (413, REFUSAL), path
            async with httpx.AsyncClient() as client:
                assert (await client.get(base + "/healthz")).status_code == 200


async def test_hypercorn_closes_a_connection_whose_app_answered_without_reading_the_body() -> None:
    # Stock Hypercorn 0.18 kept this connection open for good, reading nothing: the app's queue
    # was full of the body's small chunks, and the disconnect it puts there at the end waited for room.
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":  # answers at once: a refusal before the body, as a 401 is
            await send({"type": "http.response.start", "status": 401, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})

    use_closing_streams()
    config = Config()
    config.bind = [f"127.0.0.1:{free_port()}"]
    config.graceful_timeout = 1
    stop = asyncio.Event()
    with anyio.fail_after(30):
        server = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
        try:
            base = f"http://{config.bind[0]}"
            await wait_for_listening(base)
            answer = await send_body(base, "POST", "/", HUGE, True, piece=1024)
            assert answer.status == 401
            assert answer.sent < HUGE / 4
        finally:
            stop.set()
            await server


async def wait_for_listening(base: str) -> None:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    while True:
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection(host, int(port))
            writer.close()
            await writer.wait_closed()
            return
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("server", SERVERS)
async def test_a_body_within_the_limit_gets_its_normal_answer(secret: str, server: str) -> None:
    body = json.dumps({"wells": ["well-1"], "padding": ""}).encode()
    body = body.replace(b'""', b'"' + b" " * (LIMIT - len(body)) + b'"')  # exactly the limit
    assert len(body) == LIMIT

    async def in_pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    with anyio.fail_after(60):
        async with gateway(secret, server) as (base, _), httpx.AsyncClient(headers=bearer(secret)) as client:
            for content in (body, in_pieces()):  # Content-Length, then chunked
                response = await client.post(base + TICKETS, content=content)
                assert response.status_code == 200, response.text
                assert set(response.json()) == {"ticket", "expiresIn"}
            empty = await client.request("GET", base + "/tenants/acme/wells", content=b"")  # Content-Length: 0
            assert empty.status_code == 200
            assert await refusals(base) == 0


# --- the middleware on its own: what it reads, and what the app gets ---


def scope(http_version: str = "1.1", **headers: str) -> Scope:
    raw = [(name.replace("_", "-").encode(), value.encode()) for name, value in headers.items()]
    return {"type": "http", "http_version": http_version, "method": "POST", "path": "/x", "headers": raw}


class Recorder:
    """An app that keeps what it received, and a server side that counts what was read."""

    def __init__(self, messages: list[Message]) -> None:
        self.messages = messages
        self.reads = 0
        self.got: list[Message] = []
        self.sent: list[Message] = []

    async def receive(self) -> Message:
        self.reads += 1
        return self.messages.pop(0) if self.messages else {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.got.append(await receive())


def chunk(size: int, more: bool = True) -> Message:
    return {"type": "http.request", "body": b"x" * size, "more_body": more}


async def test_reading_stops_at_the_message_that_passes_the_limit() -> None:
    side = Recorder([chunk(10_000), chunk(10_000), chunk(10_000), chunk(10, more=False)])
    await BodyLimit(side.app, LIMIT)(scope(transfer_encoding="chunked"), side.receive, side.send)

    assert side.reads == 2
    assert side.got == []
    assert side.sent[0]["status"] == 413
    assert (b"connection", b"close") in side.sent[0]["headers"]


async def test_a_declared_length_over_the_limit_is_refused_before_anything_is_read() -> None:
    side = Recorder([chunk(10, more=False)])
    await BodyLimit(side.app, LIMIT)(scope(content_length=str(LIMIT + 1)), side.receive, side.send)

    assert side.reads == 0
    assert json.loads(side.sent[1]["body"]) == REFUSAL


async def test_the_app_gets_a_body_within_the_limit_whole_then_the_server_again() -> None:
    side = Recorder([chunk(LIMIT - 10), chunk(10, more=False), {"type": "http.disconnect"}])

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        side.got += [await receive(), await receive()]

    await BodyLimit(app, LIMIT)(scope("2"), side.receive, side.send)  # HTTP/2: no header says there is no body

    assert side.got == [{"type": "http.request", "body": b"x" * LIMIT, "more_body": False}, {"type": "http.disconnect"}]


async def test_a_request_without_a_body_reaches_the_app_without_a_frame_of_ours() -> None:
    side = Recorder([])
    called = BodyLimit(side.app, LIMIT)(scope(), side.receive, side.send)

    assert getattr(called, "cr_code", None) is Recorder.app.__code__  # the app's own coroutine, not a wrapper
    await called
