"""What a served connection is held to before it has asked anything: a deadline, a cap per peer
address, and no file descriptor kept for a peer that has left.

Every accepted connection costs the process a file descriptor (20,000 with the LimitNOFILE of
docs/deploy.md), and the stream limits of app/auth/admission.py only count once a request is
parsed. So, from accept on:

- a peer address holds at most `server.connections_per_address` open connections (a proxy in
  front, which carries many clients, is exempt); one more is reset at once (`ConnectionCap`);
- a connection must send its first complete request head within `server.request_head_timeout_s`
  of being accepted (a silent peer, or one dribbling a request line, is closed), and the next one
  within `server.keep_alive_s` of its last response;
- a connection whose peer has closed is closed as soon as no request is in flight on it.

Each server needs its own hook: Hypercorn's per-connection TCPServer (`HygienicTCPServer`),
uvicorn's protocol class (`httptools_protocol`); granian accepts in Rust, out of our reach: it
gets only its header_read_timeout (app/gateway/server.py). tests/gateway/test_socket_hygiene.py
checks all three against real gateway processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any

import hypercorn.asyncio.run
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.asyncio.worker_context import AsyncioSingleTask
from hypercorn.config import Config
from hypercorn.typing import TaskGroup

from app.settings import Settings

logger = logging.getLogger(__name__)

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

# Refusals are logged at most this often: a peer at its cap may retry hundreds of times a second.
WARN_EVERY_S = 10.0


class ConnectionCap:
    """Open connections per peer address, for one process (used from its event loop only).

    `admit` at accept, `release` once closed, for every connection admitted. Peers in `exempt`,
    and peers without an IP address (a Unix socket), are admitted without being counted.
    """

    def __init__(self, per_address: int | None, exempt: Iterable[Network] = ()) -> None:
        self.per_address = per_address
        self.exempt = tuple(exempt)
        self.refused = 0
        self._open: dict[Address, int] = {}
        self._next_warning = 0.0

    def admit(self, peer: object) -> bool:
        address = self._counted(peer)
        if address is None:
            return True
        count = self._open.get(address, 0)
        if self.per_address is not None and count >= self.per_address:
            self._refuse(address)
            return False
        self._open[address] = count + 1
        return True

    def release(self, peer: object) -> None:
        address = self._counted(peer)
        if address is None:
            return
        count = self._open.pop(address, 0)
        if count > 1:
            self._open[address] = count - 1

    def open_from(self, peer: object) -> int:
        address = self._counted(peer)
        return self._open.get(address, 0) if address is not None else 0

    def _counted(self, peer: object) -> Address | None:
        if self.per_address is None:
            return None
        address = peer_address(peer)
        if address is None or any(address in network for network in self.exempt):
            return None
        return address

    def _refuse(self, address: Address) -> None:
        self.refused += 1
        now = time.monotonic()
        if now >= self._next_warning:
            self._next_warning = now + WARN_EVERY_S
            logger.warning(
                "%s holds %d connections, the cap per address; refusing more (%d refused since start)",
                address,
                self.per_address,
                self.refused,
            )


def peer_address(peer: object) -> Address | None:
    """The IP address of a transport's `peername` (an IPv4-mapped IPv6 address as IPv4)."""
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return None
    try:
        address = ip_address(peer[0])
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def connection_cap(settings: Settings) -> ConnectionCap:
    """The cap of `server.connections_per_address`, exempting `server.connection_cap_exempt` and
    `auth.trusted_proxies` (a proxy's connections are its clients')."""
    exempt: list[Network] = list(settings.server.connection_cap_exempt)
    for proxy in settings.auth.trusted_proxies:
        with contextlib.suppress(ValueError):
            exempt.append(ip_network(proxy, strict=False))
    return ConnectionCap(settings.server.connections_per_address, exempt)


def reset(transport: asyncio.WriteTransport) -> None:
    """Drop a connection with a RST: its descriptor is freed now, and no TIME-WAIT is left behind."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class GuardedConfig(Config):
    """Hypercorn's Config with what HygienicTCPServer holds its connections to."""

    connection_cap: ConnectionCap | None = None
    request_head_timeout: float | None = None  # None: keep_alive_timeout, as stock Hypercorn


class _IdleTimer(AsyncioSingleTask):
    """Hypercorn's idle timer, which Hypercorn starts whenever a connection has no request in flight
    and stops when one arrives; it remembers both, since its task cannot say which timeout applies."""

    def __init__(self) -> None:
        super().__init__()
        self.running = False
        self.requested = False

    async def restart(self, task_group: TaskGroup, action: Callable[..., Any]) -> None:
        await super().restart(task_group, action)
        self.running = True

    async def stop(self) -> None:
        await super().stop()
        self.requested = self.requested or self.running
        self.running = False


class HygienicTCPServer(TCPServer):
    """Hypercorn's TCPServer (one per connection), closing what stock Hypercorn 0.18 keeps open.

    When a peer closes a connection with no request in flight (before its first request, or
    between two), Hypercorn sees the end of the stream, tells the protocol, and then waits for its
    idle timer, keep_alive_timeout (75 s here), before it closes its own end: the socket sits in
    CLOSE-WAIT, holding its descriptor, for that long. About 270 connect-and-close a second used
    up 20,000 descriptors in a minute. Here the end of the stream closes the connection at once if
    it is idle, or as soon as its last request ends. A connection that has not yet sent a complete
    request gets `request_head_timeout` instead of keep_alive_timeout (which is long so that a
    proxy's idle upstream connections outlive the proxy's own timeout).

    Leans on Hypercorn 0.18 internals (`idle_task`, `_read_data`, `_idle_timeout`,
    `_initiate_server_close`, and `hypercorn.asyncio.run.TCPServer` as the class its accept callback
    builds); tests/gateway/test_socket_hygiene.py fails if an upgrade changes them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.idle_timer = _IdleTimer()
        self.idle_task = self.idle_timer
        self.peer_gone = False

    async def run(self) -> None:
        cap = self.config.connection_cap if isinstance(self.config, GuardedConfig) else None
        peer = self.writer.get_extra_info("peername")
        if cap is not None and not cap.admit(peer):
            reset(self.writer.transport)
            return
        try:
            await super().run()
        finally:
            if cap is not None:
                cap.release(peer)

    async def _read_data(self) -> None:
        await super()._read_data()
        self.peer_gone = True
        if self.idle_timer.running:
            await self.idle_task.restart(self._task_group, self._idle_timeout)
        # else a request is in flight: it has been told of the disconnect, and when it ends
        # Hypercorn restarts the idle timer, which then closes at once.

    async def _idle_timeout(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.context.terminated.wait(), self._idle_limit())
        await asyncio.shield(self._initiate_server_close())

    def _idle_limit(self) -> float:
        if self.peer_gone:
            return 0
        head_timeout = self.config.request_head_timeout if isinstance(self.config, GuardedConfig) else None
        if self.idle_timer.requested or head_timeout is None:
            return float(self.config.keep_alive_timeout)
        return head_timeout


def use_hygienic_tcp_server() -> None:
    """Every connection Hypercorn's asyncio worker accepts in this process is served by a
    HygienicTCPServer: its accept callback builds the module attribute
    `hypercorn.asyncio.run.TCPServer`, and Hypercorn offers no setting to choose the class. Its cap
    and head timeout come from each server's own GuardedConfig, so servers in one process differ."""
    hypercorn.asyncio.run.TCPServer = HygienicTCPServer  # type: ignore[attr-defined]


def httptools_protocol(cap: ConnectionCap, head_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, held to `cap` and to a deadline for each request head.

    uvicorn already closes a connection when its peer does, but puts no deadline on a request
    head: a peer that connects and says nothing, or sends a request line a byte at a time, kept
    its connection for good (and its keep-alive timer is cancelled by any byte received).
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HygienicHttpTools(HttpToolsProtocol):
        peer: object = None
        admitted = False
        deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.peer = transport.get_extra_info("peername")
            self.admitted = cap.admit(self.peer)
            if not self.admitted:
                reset(transport)
                return
            self._close_in(head_timeout_s)

        def on_headers_complete(self) -> None:
            self._cancel_deadline()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.timeout_keep_alive_task is not None:  # idle now: the next head is due in time too
                self._close_in(self.timeout_keep_alive)

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_deadline()
            if self.admitted:
                self.admitted = False
                cap.release(self.peer)
            super().connection_lost(exc)

        def _close_in(self, seconds: float) -> None:
            self._cancel_deadline()
            self.deadline = self.loop.call_later(seconds, self._expire)

        def _cancel_deadline(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def _expire(self) -> None:
            self.deadline = None
            if not self.transport.is_closing():
                self.transport.close()

    return HygienicHttpTools
