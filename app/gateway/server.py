"""Runs an app under Hypercorn (or uvicorn, granian) with our own shutdown trigger.

Hypercorn's own SIGTERM handling would leave streams open until graceful_timeout and then cut
them; sse-starlette's drain hooks only uvicorn. Here SIGTERM first stops the server taking new
connections (so a proxy's next attempt fails fast and goes to another gateway, rather than getting
a 503 that would close a browser's EventSource for good), then tells every stream to say goodbye
(a jittered retry hint, then a clean end), waits for them up to the grace period, and exits.

Every listening socket gets TCP keepalive and TCP_USER_TIMEOUT (ServerSettings), which Linux
copies to each accepted connection, so a peer that vanished without a FIN is dropped by the kernel
instead of holding a stream open for the ~15 minutes of default retransmissions.

Hypercorn's HTTP/2 connections run as StreamingH2Protocol (below), which survives the hundreds of
long-lived streams a dashboard opens from Chromium; stock Hypercorn 0.18 freezes such a connection
past about 100 streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import signal
import socket
from pathlib import Path
from typing import Any, Literal

import h2.errors
import h2.events
import h2.exceptions
import hypercorn.protocol
import hypercorn.protocol.h2
import hypercorn.protocol.h11
from hypercorn.asyncio import serve
from hypercorn.config import Config, Sockets
from hypercorn.events import Closed as ConnectionClosed
from hypercorn.events import Event, RawData
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.http_stream import HTTPStream
from priority.priority import MissingStreamError

from app.gateway.app import GatewayApp
from app.gateway.metrics import serve_metrics
from app.gateway.sockets import GuardedConfig, connection_cap, httptools_protocol, use_hygienic_tcp_server
from app.settings import ServerSettings, Settings

logger = logging.getLogger(__name__)


def tune_socket(sock: socket.socket, options: ServerSettings) -> None:
    """Keepalive and user-timeout options on a (listening) TCP socket; accepted sockets inherit them."""
    if not options.tcp_keepalive or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, options.tcp_keepalive_idle_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, options.tcp_keepalive_interval_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, options.tcp_keepalive_count)
    if options.tcp_user_timeout_s > 0:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(options.tcp_user_timeout_s * 1000))


def listening_socket(host: str, port: int, options: ServerSettings, reuse_port: bool = False) -> socket.socket:
    """A bound TCP socket with our options, for servers that accept ready-made sockets (uvicorn).
    `reuse_port`: one of several workers on this port (app/gateway/workers.py)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tune_socket(sock, options)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


class TunedConfig(GuardedConfig):
    """Hypercorn's Config, whose sockets get our TCP options before Hypercorn listens on them."""

    socket_options: ServerSettings = ServerSettings()
    listening_ports: frozenset[int] = frozenset()  # filled once Hypercorn asked for its sockets
    reuse_port = False  # one of several workers on these binds (app/gateway/workers.py)

    def create_sockets(self) -> Sockets:
        sockets = super().create_sockets()
        listeners = (*sockets.secure_sockets, *sockets.insecure_sockets)
        for sock in listeners:
            tune_socket(sock, self.socket_options)
        self.listening_ports = frozenset(sock.getsockname()[1] for sock in listeners if sock.family != socket.AF_UNIX)
        return sockets

    def _create_sockets(self, binds: list[str], type_: int = socket.SOCK_STREAM) -> list[socket.socket]:
        if not self.reuse_port:
            return super()._create_sockets(binds, type_)
        # Hypercorn sets SO_REUSEPORT on its TCP binds exactly when it runs worker processes of its
        # own (`workers` > 1), which serve() never does (it warns if asked): ask for it for this call
        # only. tests/deploy/test_workers.py fails if a release stops doing so.
        workers, self.workers = self.workers, 2
        try:
            return super()._create_sockets(binds, type_)
        finally:
            self.workers = workers


# Hypercorn's priority tree (the `priority` package) refuses a 1,000th stream, and Hypercorn does
# not catch that: keep the streams a connection may hold (plus a few ending) below it.
MAX_H2_STREAMS = 900


class StreamingH2Protocol(H2Protocol):
    """Hypercorn's HTTP/2 connection, changed where it breaks under many long-lived streams.

    Found with Chromium and 300 EventSources on one connection (tests/deploy/test_h2_chromium.py):
    Chromium sends RFC 7540 priorities in which every request depends exclusively on the one before
    it, so N open streams form a dependency chain N deep. Hypercorn feeds each into its
    `priority.PriorityTree`, whose loop guard refuses to reprioritise under a parent more than 100
    deep (PriorityLoop); Hypercorn does not catch it, the error leaves the connection's read loop,
    and its task group cancels the connection's tasks. A request still waiting for its response
    then waits, in cleanup, for a send task that was just cancelled, so the task group never
    finishes: the TCP connection stays open with nothing reading or writing it (the browser's
    streams hang with the gateway idle), and a SIGTERM never completes (Hypercorn waits for it).

    Found with a raw h2 client that stops opening a stream's window (tests/deploy/test_h2_many_streams.py):
    Hypercorn then let the app send on into that stream's buffer without bound, so the stream stayed
    open and silent while the gateway counted it live (`_send_data`).

    Each override leans on Hypercorn 0.18 internals (`_priority_updated`, `send_task`, `_send_data`,
    `stream_buffers` and their `buffer`, `priority`, `_flush`, and `hypercorn.protocol.H2Protocol` as
    the class its ProtocolWrapper builds); tests/deploy/test_http2.py checks them, so an upgrade that
    changes them fails there rather than in production.
    """

    async def _priority_updated(self, event: h2.events.PriorityUpdated) -> None:
        # RFC 7540 priorities are ignored: every stream stays a sibling with the default weight.
        # RFC 9113 (5.3.2) deprecated that scheme and lets a server ignore it, and SSE streams,
        # each a trickle, should share the connection equally anyway. It also keeps the tree
        # flat, where Chromium's chains made every send walk (recursively) down to the newest.
        return

    async def send_task(self) -> None:
        try:
            await super().send_task()
        finally:
            # The stream buffers' only reader is gone (connection closed, or this task cancelled):
            # release whoever waits on one (drain() at the end of a response, push() at the
            # high-water mark), or they wait forever and keep the connection's task group open.
            for buffer in list(self.stream_buffers.values()):
                await buffer.close()

    async def _send_data(self, stream_id: int) -> None:
        buffer = self.stream_buffers.get(stream_id)
        if buffer is not None and buffer.buffer and self._window(stream_id) <= 0:
            # Wait for the client's WINDOW_UPDATE without touching the buffer. Hypercorn popped
            # 0 bytes here, and any pop below its low-water mark releases the app's send waiting
            # at the high-water mark: with the window shut, the app sent on into a buffer without
            # bound, so a stream whose client stopped taking data stayed open, silent and counted
            # live, and the gateway's stall check (stream.stall_s) never saw a send wait.
            self.priority.block(stream_id)
            return
        await super()._send_data(stream_id)

    def _window(self, stream_id: int) -> int:
        try:
            return self.connection.local_flow_control_window(stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
            return 1  # a closed stream: Hypercorn's own send path cleans it up

    async def stream_send(self, event: StreamEvent) -> None:
        if isinstance(event, StreamClosed):
            await self._reset_unfinished(event.stream_id)
        await super().stream_send(event)

    async def _reset_unfinished(self, stream_id: int) -> None:
        # An app that returns without ending its response (a stream whose stuck send was broken
        # off) leaves Hypercorn's h2 stream open and silent: the browser keeps waiting on it, and
        # says live. Over HTTP/1.1 Hypercorn closes the connection; here the stream gets a
        # RST_STREAM (CANCEL), so the client sees the end at once and resumes.
        stream = self.connection.streams.get(stream_id)
        if stream is None or stream.closed:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
            self.connection.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        buffer = self.stream_buffers.pop(stream_id, None)
        if buffer is not None:
            await buffer.close()
        with contextlib.suppress(MissingStreamError):
            self.priority.remove_stream(stream_id)
        await self._flush()

    async def handle(self, event: Event) -> None:
        if not isinstance(event, RawData):
            await super().handle(event)
            return
        try:
            await super().handle(event)
        except Exception:
            # Whatever else a frame trips inside Hypercorn, h2 or priority: end this connection
            # the way Hypercorn ends one on an HTTP/2 protocol error (GOAWAY, close; every stream
            # then gets http.disconnect and the client reconnects) instead of letting the error
            # cancel the connection's tasks, which is what used to leave it open and dead.
            logger.exception("HTTP/2 connection from %s failed; closing it", self.client)
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.connection.close_connection(h2.errors.ErrorCodes.INTERNAL_ERROR)
            await self._flush()
            await self.send(ConnectionClosed())


class ClosingHTTPStream(HTTPStream):
    """Hypercorn's HTTP request stream, whose end never waits on an app that stopped reading its body.

    Hypercorn queues at most `max_app_queue_size` (10) request messages for an app, and when the
    stream closes it puts `http.disconnect` on that queue, waiting for room. An app that answers
    without reading the rest of a body (a refusal) never makes room, so once a client has filled
    the queue (a body in small chunks does it at once) that wait never ended in stock Hypercorn
    0.18: the connection stayed open, read nothing, never closed, and held the queued chunks and
    the request's task. Here the queued body is dropped first (a closed stream's app has no use for
    it); Hypercorn then closes the connection with the rest of the body unread, as a 413 from
    app.gateway.bodylimit asks. tests/gateway/test_body_limits.py checks it.
    """

    async def handle(self, event: StreamEvent) -> None:
        if isinstance(event, StreamClosed) and not self.closed:
            # spawn_app hands back the bound `put` of the app's queue: the queue is its __self__.
            queue = getattr(getattr(self, "app_put", None), "__self__", None)
            if isinstance(queue, asyncio.Queue):
                while not queue.empty():
                    queue.get_nowait()
        await super().handle(event)


def use_closing_streams() -> None:
    """Every HTTP/1.1 and HTTP/2 request Hypercorn serves in this process runs as a ClosingHTTPStream:
    its protocols build them from their modules' attribute `HTTPStream`, with no setting to choose."""
    hypercorn.protocol.h11.HTTPStream = ClosingHTTPStream  # type: ignore[attr-defined]
    hypercorn.protocol.h2.HTTPStream = ClosingHTTPStream  # type: ignore[attr-defined]


def use_streaming_h2() -> None:
    """Every HTTP/2 connection Hypercorn accepts in this process (ALPN h2, h2c by prior knowledge
    or Upgrade) becomes a StreamingH2Protocol: Hypercorn's ProtocolWrapper builds them from the
    module attribute `hypercorn.protocol.H2Protocol`, and offers no setting to choose the class."""
    hypercorn.protocol.H2Protocol = StreamingH2Protocol  # type: ignore[attr-defined]


def hypercorn_config(
    settings: Settings, host: str, port: int, toml: Path | None = None, reuse_port: bool = False
) -> TunedConfig:
    """Our Hypercorn config: from `toml` (binds, TLS, h2 limits) if given, else one cleartext bind
    on host:port. The settings streaming depends on are forced whatever the file says."""
    config = TunedConfig.from_toml(toml) if toml is not None else TunedConfig()
    assert isinstance(config, TunedConfig)
    if toml is None:
        config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.socket_options = settings.server
    config.reuse_port = reuse_port
    config.graceful_timeout = settings.stream.shutdown_grace_s + 2
    # Idle between requests: longer than a proxy keeps its idle upstream connections (nginx: 60 s),
    # or the proxy may send a request on a connection we are closing. A new connection gets the
    # head timeout instead (app/gateway/sockets.py). The file may only lengthen it.
    keep_alive = settings.server.keep_alive_s
    config.keep_alive_timeout = keep_alive if toml is None else max(config.keep_alive_timeout, keep_alive)
    config.request_head_timeout = settings.server.request_head_timeout_s
    config.ssl_handshake_timeout = min(config.ssl_handshake_timeout, settings.server.request_head_timeout_s)
    config.connection_cap = connection_cap(settings)
    config.read_timeout = None  # any read timeout kills live streams: clients send nothing while reading
    config.accesslog = None
    config.include_server_header = False  # no product and version for a scanner to match
    config.backlog = max(config.backlog, 4096)  # a reconnect storm must not overflow the accept queue
    # Past this many requests on one connection Hypercorn sends GOAWAY, after which h2 refuses to
    # send anything more on it: every stream still open there freezes (and still counts as live
    # here). A dashboard's reconnects (max stream age, auth-expired) reach the default 1,000.
    config.keep_alive_max_requests = 2**62
    config.h2_max_concurrent_streams = min(config.h2_max_concurrent_streams, MAX_H2_STREAMS)
    config.errorlog = logging.getLogger("hypercorn.error")  # our JSON handler, not a second plain one
    return config


async def drain(app: GatewayApp, grace_s: float) -> None:
    """Ask every open stream to end, and wait for them up to `grace_s`."""
    hub = app.hub()
    if hub is None:
        return
    hub.drain()
    if not await hub.wait_idle(grace_s * 0.7):
        hub.abort()  # streams stuck sending to a peer that stopped reading get no goodbye
        await hub.wait_idle(grace_s * 0.3)
    logger.info("drained; %d streams still open", hub.open_streams)


ServerName = Literal["hypercorn", "uvicorn", "granian"]
SERVERS: tuple[ServerName, ...] = ("hypercorn", "uvicorn", "granian")


def tune_gc(settings: Settings) -> None:
    """Fewer, cheaper cyclic collections: at 10,000 open streams Python's defaults make the
    collector the largest single cost of the fan-out path (docs/performance.md). Almost
    everything on the hot path is freed by reference counting; the collector only has to
    catch rare cycles, so it can run far less often."""
    if settings.server.gc_freeze:
        gc.freeze()
    if settings.server.gc_threshold is not None:
        gc.set_threshold(*settings.server.gc_threshold)
    logger.info("gc thresholds %s, %d objects frozen", gc.get_threshold(), gc.get_freeze_count())


async def run(
    app: GatewayApp,
    settings: Settings,
    host: str,
    port: int,
    server: ServerName = "hypercorn",
    hypercorn_toml: Path | None = None,
    *,
    reuse_port: bool = False,
    metrics_port: int = 0,
) -> None:
    """Serve until SIGTERM or SIGINT. `hypercorn_toml` (Hypercorn only) replaces host and port.
    `reuse_port`: one of several workers sharing the port (app/gateway/workers.py); `metrics_port`:
    also serve /metrics alone on host:metrics_port (a worker's own, where a scrape of the shared
    port would reach any worker)."""
    tune_gc(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    allow = settings.server.metrics_allow
    metrics = await serve_metrics(app.metrics, host, metrics_port, allow) if metrics_port else None
    try:
        if server == "uvicorn":
            await _serve_uvicorn(app, settings, host, port, stop, reuse_port)
        elif server == "granian":
            # granian's listener always has SO_REUSEPORT (its Rust ListenerSpec sets it): nothing to ask.
            await _serve_granian(app, settings, host, port, stop)
        else:
            await serve_until(app, settings, host, port, stop, hypercorn_toml, reuse_port)
    finally:
        if metrics is not None:
            metrics.close()


async def _serve_uvicorn(
    app: GatewayApp, settings: Settings, host: str, port: int, stop: asyncio.Event, reuse_port: bool = False
) -> None:
    import uvicorn

    loop = asyncio.get_running_loop()

    class Server(uvicorn.Server):
        # uvicorn installs its own signal handlers while it serves; route them to our drain first.
        def handle_exit(self, sig: int, frame: object) -> None:
            loop.call_soon_threadsafe(stop.set)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=httptools_protocol(connection_cap(settings), settings.server.request_head_timeout_s),
        lifespan="on",
        log_config=None,
        access_log=False,
        backlog=4096,
        timeout_graceful_shutdown=int(settings.stream.shutdown_grace_s) + 2,
        timeout_keep_alive=math.ceil(settings.server.keep_alive_s),
        server_header=False,
    )
    server = Server(config)

    async def stop_then_drain() -> None:
        await stop.wait()
        server.should_exit = True  # uvicorn closes its listener, then waits for the streams we drain
        await drain(app, settings.stream.shutdown_grace_s)

    stopper = asyncio.create_task(stop_then_drain())
    logger.info("serving on http://%s:%d (uvicorn)", host, port)
    sock = listening_socket(host, port, settings.server, reuse_port)
    try:
        await server.serve(sockets=[sock])
    finally:
        stopper.cancel()
        sock.close()


async def _serve_granian(app: GatewayApp, settings: Settings, host: str, port: int, stop: asyncio.Event) -> None:
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings

    # HTTP/2 support costs granian about 10 KiB more per connection (docs/performance.md): opt in.
    http = HTTPModes.auto if settings.server.granian_http2 else HTTPModes.http1
    # granian accepts in Rust, beyond app/gateway/sockets.py: no cap per address. Its one header
    # timeout also bounds idle time between requests (hyper has no other), so both get the shorter.
    head = HTTP1Settings(header_read_timeout=math.ceil(settings.server.request_head_timeout_s * 1000))
    server = _granian_server(settings.server)(
        app,
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        backlog=4096,
        backpressure=65536,
        http=http,
        http1_settings=head,
    )
    serving = asyncio.create_task(server.serve())
    logger.info("serving on http://%s:%d (granian, embedded)", host, port)
    waiting = asyncio.create_task(stop.wait())
    await asyncio.wait([serving, waiting], return_when=asyncio.FIRST_COMPLETED)
    if not serving.done():
        await drain(app, settings.stream.shutdown_grace_s)
        server.stop()
    waiting.cancel()
    await serving


def _granian_server(options: ServerSettings) -> Any:
    """granian's embedded Server, building its listening socket where we can set options on it.

    On Linux granian hands each worker a socket *spec* and the Rust side binds it, out of our reach.
    Its other code path (used on every other platform) binds once and shares the socket; we take
    that path so the options land on the listener. This leans on granian's private
    `_init_shared_socket` (checked against granian 2.8): if a release renames it, the server still
    runs, only without the options, and tests/deploy/test_keepalive.py fails.
    """
    from granian._granian import ListenerSpec
    from granian.server.embed import Server

    class TunedServer(Server):
        def _init_shared_socket(self) -> None:
            if self.bind_uds:
                super()._init_shared_socket()  # type: ignore[no-untyped-call]
                return
            holder = ListenerSpec(self.bind_addr, self.bind_port, self.backlog).build()
            fd: int = holder.get_fd()
            self._ssp, self._shd, self._sfd = None, holder, fd  # type: ignore[assignment]
            # A second descriptor for the same socket: options set through it apply to the listener.
            with socket.socket(fileno=os.dup(fd)) as listener:
                tune_socket(listener, options)

    return TunedServer


async def serve_until(
    app: GatewayApp,
    settings: Settings,
    host: str,
    port: int,
    stop: asyncio.Event,
    hypercorn_toml: Path | None = None,
    reuse_port: bool = False,
) -> None:
    """Serve on Hypercorn until `stop` is set, then stop listening, drain streams and stop.

    The trigger returns at once, so Hypercorn closes its listeners and idle keep-alive connections
    (a proxy's retry then goes to another gateway); the drain runs while Hypercorn waits up to
    graceful_timeout for the open connections, which the drained streams end.
    """
    config = hypercorn_config(settings, host, port, hypercorn_toml, reuse_port)
    use_streaming_h2()
    use_hygienic_tcp_server()
    use_closing_streams()
    shutdown: list[asyncio.Task[None]] = []

    async def shutdown_trigger() -> None:
        await stop.wait()
        logger.info("shutting down: no new connections, draining streams")
        shutdown.append(asyncio.create_task(drain(app, settings.stream.shutdown_grace_s)))
        ports = set(config.listening_ports)
        shutdown.append(asyncio.create_task(_abort_stuck_connections(config.graceful_timeout + 1, ports)))

    logger.info("serving on %s", ", ".join(_urls(config)))
    try:
        await serve(app, config, shutdown_trigger=shutdown_trigger)  # type: ignore[arg-type]
    finally:
        for task in shutdown:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _abort_stuck_connections(after_s: float, ports: set[int]) -> None:
    """Shut down the connections still open `after_s` into a shutdown, so the process exits.

    Hypercorn waits for every connection to close before it finishes (uvloop's Server.wait_closed
    waits for them), and closing a TLS connection waits up to 30 s for the peer's close_notify,
    which a vanished client, or one that keeps an idle connection without reading, never sends.
    Their streams have ended by now. Hypercorn keeps no list of its connections we could use,
    so they are found as this process's accepted sockets on our listening ports and shut down at
    the socket: the transport then sees the end of the stream and closes itself.
    """
    await asyncio.sleep(after_s)
    aborted = shut_down_accepted(ports)
    if aborted:
        logger.warning("aborted %d connections still open %.0f s into the shutdown", aborted, after_s)


def shut_down_accepted(ports: set[int]) -> int:
    """shutdown(SHUT_RDWR) every accepted TCP socket of this process whose local port is in `ports`."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except (OSError, ValueError):
            continue  # not a socket (or already gone)
        with sock:
            if _is_accepted_tcp(sock, ports):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                    count += 1
    return count


def _is_accepted_tcp(sock: socket.socket, ports: set[int]) -> bool:
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        return False
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        port: int = sock.getsockname()[1]
    except OSError:
        return False
    return not listening and port in ports


def _urls(config: Config) -> list[str]:
    if config.ssl_enabled:
        return [f"https://{bind}" for bind in config.bind] + [f"http://{bind}" for bind in config.insecure_bind]
    return [f"http://{bind}" for bind in config.bind]
