"""Thin HTTP handlers: validate, authorize, hand over to the hub or the broker."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from app.errors import AuthError, BrokerError
from app.eventstream import EventStream
from app.models import StreamId, Topic, is_valid_id
from app.streams.sse import single_line_json

if TYPE_CHECKING:
    from app.main import Gateway

logger = logging.getLogger(__name__)

MAX_TAGS = 64


class BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def _topic(request: Request) -> Topic:
    tenant, well = request.path_params["tenant"], request.path_params["well"]
    if not (is_valid_id(tenant) and is_valid_id(well)):
        raise BadRequest(404, "unknown tenant or well")
    return Topic(tenant, well)


def _last_event_id(request: Request) -> StreamId | None:
    raw = request.headers.get("last-event-id") or request.query_params.get("lastEventId")
    if not raw:
        return None
    try:
        return StreamId.parse(raw.strip())
    except ValueError:
        raise BadRequest(400, "malformed Last-Event-ID: expected <milliseconds>-<sequence>") from None


def _tags(request: Request) -> frozenset[str] | None:
    raw = request.query_params.get("tags")
    if raw is None:
        return None
    tags = frozenset(tag.strip() for tag in raw.split(",") if tag.strip())
    if not tags or len(tags) > MAX_TAGS or not all(is_valid_id(tag) for tag in tags):
        raise BadRequest(400, f"tags must be 1-{MAX_TAGS} comma-separated tag ids")
    return tags


async def stream(request: Request) -> Response | EventStream:
    gateway = _gateway(request)
    topic = _topic(request)
    last_id, tags = _last_event_id(request), _tags(request)
    gateway.guard.authorize(request, topic.tenant, topic.well)
    if gateway.hub.draining:
        return JSONResponse({"error": "server shutting down"}, status_code=503, headers={"Retry-After": "1"})
    if request.method == "HEAD":
        return Response(headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"})
    settings = gateway.settings
    return EventStream(gateway.hub, gateway.broker, topic, last_id, tags, settings.stream, settings.history)


async def latest(request: Request) -> Response:
    gateway = _gateway(request)
    topic = _topic(request)
    tags = _tags(request)
    gateway.guard.authorize(request, topic.tenant, topic.well)
    snapshot = await gateway.broker.snapshot(topic)
    readings = [
        single_line_json(data) for tag, data in sorted(snapshot.readings.items()) if tags is None or tag in tags
    ]
    body = b'{"tenantId":"%s","wellId":"%s","lastEventId":"%s","readings":[%s]}' % (
        topic.tenant.encode(),
        topic.well.encode(),
        str(snapshot.last_id).encode(),
        b",".join(readings),
    )
    return Response(body, media_type="application/json", headers={"Cache-Control": "no-cache"})


async def wells(request: Request) -> Response:
    gateway = _gateway(request)
    tenant = request.path_params["tenant"]
    if not is_valid_id(tenant):
        raise BadRequest(404, "unknown tenant")
    principal = gateway.guard.authorize(request, tenant)
    names = [name for name in await gateway.broker.wells(tenant) if principal.may_see(name)]
    return JSONResponse({"tenantId": tenant, "wells": names})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    gateway = _gateway(request)
    if gateway.hub.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not await gateway.broker.ready():
        return JSONResponse({"status": "broker unreachable"}, status_code=503)
    return JSONResponse({"status": "ready"})


async def on_bad_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BadRequest)
    logger.info("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.reason)
    return JSONResponse({"error": exc.reason}, status_code=exc.status)


async def on_auth_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AuthError)
    headers = {"WWW-Authenticate": 'Bearer realm="wellstream"'} if exc.status == 401 else None
    return JSONResponse({"error": exc.reason}, status_code=exc.status, headers=headers)


async def on_broker_error(request: Request, exc: Exception) -> Response:
    logger.warning("%s %s -> 503: %s", request.method, request.url.path, exc)
    return JSONResponse({"error": "broker unavailable"}, status_code=503, headers={"Retry-After": "2"})


EXCEPTION_HANDLERS = {BadRequest: on_bad_request, AuthError: on_auth_error, BrokerError: on_broker_error}

STREAM_PATH = re.compile(r"^/tenants/([^/]+)/wells/([^/]+)/stream$")


async def serve_stream(scope: Scope, receive: Receive, send: Send) -> None:
    """The stream route, called by app.main.GatewayApp without Starlette's middleware and routing.

    A stream's request task stays suspended for hours; under the usual stack it would hold a
    dozen coroutine frames and their objects per connection (docs/performance.md). Errors are
    answered by the same handlers as everywhere else.
    """
    request = Request(scope, receive)
    try:
        response: Response | EventStream = await stream(request)
    except Exception as exc:
        handler = EXCEPTION_HANDLERS.get(type(exc))
        if handler is None:
            logger.exception("%s %s failed", request.method, request.url.path)
            response = JSONResponse({"error": "internal error"}, status_code=500)
        else:
            response = await handler(request, exc)
    await response(scope, receive, send)


ROUTES = [
    Route("/healthz", healthz),
    Route("/readyz", readyz),
    Route("/tenants/{tenant}/wells", wells),
    Route("/tenants/{tenant}/wells/{well}/latest", latest),
    Route("/tenants/{tenant}/wells/{well}/stream", stream),
]
