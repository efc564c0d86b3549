"""Runs an app under Hypercorn with our own shutdown trigger.

Hypercorn's own SIGTERM handling would leave streams open until graceful_timeout and then cut
them; sse-starlette's drain hooks only uvicorn. Here SIGTERM first tells every stream to say
goodbye (a jittered retry hint, then a clean end), waits for them up to the grace period, and
only then lets Hypercorn stop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from pathlib import Path
from typing import Literal

from hypercorn.asyncio import serve
from hypercorn.config import Config
from starlette.applications import Starlette

from app.settings import Settings

logger = logging.getLogger(__name__)

HYPERCORN_CONFIG = Path("config/hypercorn.toml")


def hypercorn_config(settings: Settings, host: str, port: int) -> Config:
    config = Config.from_toml(HYPERCORN_CONFIG) if HYPERCORN_CONFIG.is_file() else Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.graceful_timeout = settings.stream.shutdown_grace_s + 2
    config.keep_alive_timeout = max(config.keep_alive_timeout, 75)
    config.read_timeout = None  # any read timeout kills live streams: clients send nothing while reading
    config.accesslog = None
    config.backlog = max(config.backlog, 4096)  # a reconnect storm must not overflow the accept queue
    config.errorlog = logging.getLogger("hypercorn.error")  # our JSON handler, not a second plain one
    return config


async def drain(app: Starlette, grace_s: float) -> None:
    """Ask every open stream to end, and wait for them up to `grace_s`."""
    gateway = getattr(app.state, "gateway", None)
    if gateway is None:
        return
    gateway.hub.drain()
    if not await gateway.hub.wait_idle(grace_s * 0.7):
        gateway.hub.abort()  # streams stuck sending to a peer that stopped reading get no goodbye
        await gateway.hub.wait_idle(grace_s * 0.3)
    logger.info("drained; %d streams still open", gateway.hub.open_streams)


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


async def run(app: Starlette, settings: Settings, host: str, port: int, server: ServerName = "hypercorn") -> None:
    """Serve until SIGTERM or SIGINT."""
    tune_gc(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if server == "uvicorn":
        await _serve_uvicorn(app, settings, host, port, stop)
    elif server == "granian":
        await _serve_granian(app, settings, host, port, stop)
    else:
        await serve_until(app, settings, host, port, stop)


async def _serve_uvicorn(app: Starlette, settings: Settings, host: str, port: int, stop: asyncio.Event) -> None:
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
        http="httptools",
        lifespan="on",
        log_config=None,
        access_log=False,
        backlog=4096,
        timeout_graceful_shutdown=int(settings.stream.shutdown_grace_s) + 2,
    )
    server = Server(config)

    async def stop_after_drain() -> None:
        await stop.wait()
        await drain(app, settings.stream.shutdown_grace_s)
        server.should_exit = True

    stopper = asyncio.create_task(stop_after_drain())
    logger.info("serving on http://%s:%d (uvicorn)", host, port)
    try:
        await server.serve()
    finally:
        stopper.cancel()


async def _serve_granian(app: Starlette, settings: Settings, host: str, port: int, stop: asyncio.Event) -> None:
    from granian.constants import HTTPModes, Interfaces
    from granian.server.embed import Server

    # HTTP/2 support costs granian about 10 KiB more per connection (docs/performance.md): opt in.
    http = HTTPModes.auto if settings.server.granian_http2 else HTTPModes.http1
    server = Server(
        app, address=host, port=port, interface=Interfaces.ASGI, backlog=4096, backpressure=65536, http=http
    )
    serving = asyncio.create_task(server.serve())
    logger.info("serving on http://%s:%d (granian, embedded)", host, port)
    waiting = asyncio.create_task(stop.wait())
    await asyncio.wait([serving, waiting], return_when=asyncio.FIRST_COMPLETED)
    if not serving.done():
        await drain(app, settings.stream.shutdown_grace_s)
        server.stop()  # type: ignore[no-untyped-call]
    waiting.cancel()
    await serving


async def serve_until(app: Starlette, settings: Settings, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve on Hypercorn until `stop` is set, then drain streams and stop."""

    async def shutdown_trigger() -> None:
        await stop.wait()
        logger.info("shutting down: draining streams")
        await drain(app, settings.stream.shutdown_grace_s)

    config = hypercorn_config(settings, host, port)
    logger.info("serving on http://%s:%d", host, port)
    await serve(app, config, shutdown_trigger=shutdown_trigger)  # type: ignore[arg-type]
