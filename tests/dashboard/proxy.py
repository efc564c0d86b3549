"""A small HTTP/1.1 reverse proxy for the browser tests: answers 502 while the gateway is down.

That is what nginx or Caddy do during a gateway restart, and a 502 closes an EventSource for
good (docs: ../shared webstack notes, §5), so the page's own reconnect must bring it back.
It can also go silent (`freeze()`): connections stay open and pass nothing more, as a stuck
middlebox or a dead network path does, until `thaw()` lets new connections through again.
One request per connection (`Connection: close` both ways) keeps it simple and honest.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

BAD_GATEWAY = (
    b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: 11\r\nConnection: close\r\n\r\n"
    b"Bad Gateway"
)
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"upgrade"}


class Proxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.bad_gateways: list[bytes] = []  # the request lines answered with 502
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()
        self.frozen = False
        self._held: set[asyncio.StreamWriter] = set()  # connections that passed nothing since a freeze, for good
        self._never = asyncio.Event()

    def freeze(self) -> None:
        """From now on no connection passes a byte more to its client, and new ones pass none at all."""
        self.frozen = True

    def thaw(self) -> None:
        """New connections pass again; those held by the freeze stay silent until their client leaves."""
        self.frozen = False

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Proxy]:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            self._server.close()
            for writer in list(self._clients):
                writer.close()
            await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._clients.add(client_w)
        try:
            await self._proxy(client_r, client_w)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # either side went away: nothing to answer
        finally:
            self._clients.discard(client_w)
            self._held.discard(client_w)
            client_w.close()

    async def _proxy(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        head = await client_r.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head[:-4].split(b"\r\n")
        headers = [line for line in header_lines if line.split(b":", 1)[0].strip().lower() not in HOP_BY_HOP]
        length = next(
            (int(line.split(b":", 1)[1]) for line in headers if line.lower().startswith(b"content-length:")), 0
        )
        body = await client_r.readexactly(length) if length else b""
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            self.bad_gateways.append(request_line)
            client_w.write(BAD_GATEWAY)
            await client_w.drain()
            return
        try:
            up_w.write(b"\r\n".join([request_line, *headers, b"Connection: close", b"", b""]) + body)
            await up_w.drain()
            pump = asyncio.create_task(self._pump(up_r, client_w))
            # The client hanging up (an EventSource closed by the page) must reach the gateway.
            hangup = asyncio.create_task(client_r.read(1))
            await asyncio.wait([pump, hangup], return_when=asyncio.FIRST_COMPLETED)
            for task in (pump, hangup):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await task
        finally:
            up_w.close()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        # The browser must not try to reuse a connection this proxy is about to close.
        status_line, *header_lines = (await source.readuntil(b"\r\n\r\n"))[:-4].split(b"\r\n")
        kept = [line for line in header_lines if line.split(b":", 1)[0].strip().lower() not in HOP_BY_HOP]
        await self._pass(sink, b"\r\n".join([status_line, *kept, b"Connection: close", b"", b""]))
        while chunk := await source.read(65536):
            await self._pass(sink, chunk)

    async def _pass(self, sink: asyncio.StreamWriter, data: bytes) -> None:
        if self.frozen:
            self._held.add(sink)
        if sink in self._held:
            await self._never.wait()  # silent, open, until the client hangs up
        sink.write(data)
        await sink.drain()
