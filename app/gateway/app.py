"""create_app(settings) -> Starlette: routes, static files, and the broker/hub lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from prometheus_client.registry import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from app.auth.admission import StreamLimits
from app.auth.guard import Guard
from app.auth.revocation import RevocationWatcher
from app.auth.tokens import TokenVerifier
from app.gateway.access import AccessLog
from app.gateway.bodylimit import BodyLimit
from app.gateway.context import Gateway
from app.gateway.errors import EXCEPTION_HANDLERS
from app.gateway.hub import Hub
from app.gateway.leasesweep import LeaseSweeper
from app.gateway.metrics import gateway_registry
from app.gateway.routes import ROUTES, STREAM_PATH, serve_stream
from app.settings import Settings
from app.streams.connect import open_broker
from app.streams.seams import Broker

logger = logging.getLogger(__name__)

Background = Callable[[Broker], Coroutine[Any, Any, None]]


class GatewayApp(Starlette):
    """Starlette, with the stream route taken before the middleware stack (routes.serve_stream).

    Every request on the stream path goes there, whatever its method; everything else goes
    through Starlette. CORS, the one middleware a stream needs, is applied to it directly.
    """

    gateway: Gateway | None = None  # set by the lifespan once the broker and hub are up
    metrics: CollectorRegistry  # this app's own registry: apps in one process (tests) never collide
    stream_app: ASGIApp  # set by create_app: serve_stream, wrapped in CORS when origins are configured
    # Everything else: Starlette, behind the access log when it is on. Streams are not
    # access-logged: their audit connect/disconnect lines say more, and a wrapper would cost
    # a coroutine frame on every send.
    other_app: ASGIApp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            match = STREAM_PATH.match(scope["path"])
            if match is not None:
                scope["app"] = self
                scope["path_params"] = {"tenant": match[1]} | ({"well": match[2]} if match[2] else {})
                await self.stream_app(scope, receive, send)
                return
        await self.other_app(scope, receive, send)

    async def starlette(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, send)

    def hub(self) -> Hub | None:
        return self.gateway.hub if self.gateway is not None else None


# The page is ES modules and a stylesheet from its own origin, canvas sparklines and a data: favicon,
# so anything else (an injected inline script or style, a foreign host, a plugin, a <base>, a form
# posted elsewhere) is refused; frame-ancestors and X-Frame-Options keep the wall out of other
# sites' frames (clickjacking the sign-out or the session switch).
DASHBOARD_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class DashboardFiles(StaticFiles):
    """static/, revalidated on every load (ETag: a 304 when unchanged), so a wall screen that
    reloads picks up a new module of the page instead of a heuristically cached one.

    Every file, its 304 and its HEAD included (all built by file_response), carries
    DASHBOARD_HEADERS.
    """

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        response.headers.update(DASHBOARD_HEADERS)
        return response


def create_app(
    settings: Settings, broker: Broker | None = None, background: list[Background] | None = None
) -> GatewayApp:
    """Build the gateway app.

    Args:
        settings: loaded once by the caller.
        broker: use this broker instead of opening one from settings (the demo shares one with
            its simulator; tests share one between app and publisher).
        background: coroutines started with the broker once the app is up (the demo's simulator).
    """
    verifier = build_verifier(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            active = broker if broker is not None else await stack.enter_async_context(open_broker(settings))
            stream = settings.stream
            hub = await stack.enter_async_context(
                Hub(
                    active.log,
                    stream.queue_size,
                    stream.heartbeat_s,
                    stream.send_timeout_s,
                    settings.history.replay_page,
                    stream.max_age_s,
                    stream.stall_s,
                )
            )
            for tenant, wells in settings.wells.items():
                await active.registry.register(tenant, wells)
            guard = Guard(verifier, active, settings.auth)
            limits = await stack.enter_async_context(StreamLimits(settings.auth.limits, active.leases))
            sweeper = await stack.enter_async_context(LeaseSweeper(active.workers, hub.tenant_names, hub.stats))
            revocations = await stack.enter_async_context(RevocationWatcher(active.revocations))
            gateway_app.gateway = Gateway(settings, active, hub, guard, limits, sweeper, revocations)
            stack.callback(setattr, gateway_app, "gateway", None)
            await _start_background(stack, active, background or [])
            logger.info("gateway ready on the %s broker", "redis" if settings.redis_url else "memory")
            yield

    routes: list[BaseRoute] = list(ROUTES)
    if settings.static_dir.is_dir():
        routes.append(Mount("/", DashboardFiles(directory=settings.static_dir, html=True), name="static"))
    cors = cors_options(settings) if settings.auth.cors_origins else None
    bounded = (settings.server.max_body_bytes, settings.auth.trusted_proxies)
    middleware = [Middleware(CORSMiddleware, **cors)] if cors else []
    middleware.append(Middleware(BodyLimit, *bounded))  # inside CORS: a cross-origin page can read its 413
    gateway_app = GatewayApp(
        routes=routes, exception_handlers=dict(EXCEPTION_HANDLERS), lifespan=lifespan, middleware=middleware
    )
    gateway_app.other_app = AccessLog(gateway_app.starlette) if settings.server.access_log else gateway_app.starlette
    gateway_app.metrics = gateway_registry(gateway_app.hub)
    stream_app = BodyLimit(serve_stream, *bounded)
    gateway_app.stream_app = CORSMiddleware(stream_app, **cors) if cors else stream_app
    return gateway_app


def cors_options(settings: Settings) -> dict[str, Any]:
    """Configured dashboard origins only, with credentials so the session cookie goes along."""
    return {
        "allow_origins": settings.auth.cors_origins,
        "allow_credentials": True,
        "allow_methods": ["GET", "POST", "DELETE"],
        "allow_headers": ["Authorization", "Content-Type", "Last-Event-ID"],
        "max_age": 600,
    }


def build_verifier(settings: Settings) -> TokenVerifier:
    """Raises ValueError naming the options when no key is configured."""
    return TokenVerifier.from_settings(settings.auth, settings.secret)


async def _start_background(stack: contextlib.AsyncExitStack, broker: Broker, jobs: list[Background]) -> None:
    tasks = [asyncio.create_task(job(broker), name=f"background-{i}") for i, job in enumerate(jobs)]

    async def stop() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    stack.push_async_callback(stop)
