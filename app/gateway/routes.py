"""Thin HTTP handlers: validate, authorize, hand over to the hub or the broker."""

from __future__ import annotations

import logging
import re
import time
from ipaddress import ip_address
from typing import TYPE_CHECKING

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from app.auth.audit import audit
from app.auth.guard import client_address
from app.errors import AuthError, BrokerError, LimitError
from app.gateway.eventstream import EventStream
from app.gateway.metrics import CONTENT_TYPE, render
from app.models import StreamId, Topic, is_valid_id
from app.streams.codec import single_line_json

if TYPE_CHECKING:
    from app.gateway.app import Gateway

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


def _tenant(request: Request) -> str:
    tenant: str = request.path_params["tenant"]
    if not is_valid_id(tenant):
        raise BadRequest(404, "unknown tenant")
    return tenant


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
    client = client_address(request)
    gateway.limits.check_attempt(client)
    topic = _topic(request)
    last_id, tags = _last_event_id(request), _tags(request)
    # HEAD answers headers only: it must not use up a single-use ticket.
    principal = await gateway.guard.authorize(request, topic.tenant, topic.well, tickets=request.method == "GET")
    if principal.expires_at <= time.time():
        # Accepted within the clock leeway, but a stream would end at once: ask for a fresh token.
        raise AuthError("token expired")
    if gateway.hub.draining:
        return JSONResponse({"error": "server shutting down"}, status_code=503, headers={"Retry-After": "1"})
    if request.method == "HEAD":
        return Response(headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"})
    lease = await gateway.limits.admit(principal)
    audit("connect", sub=principal.subject, tenant=topic.tenant, well=topic.well, client=client)
    settings = gateway.settings
    return EventStream(
        gateway.hub, gateway.broker.log, topic, last_id, tags, settings.stream, settings.history, principal, lease
    )


async def stream_tickets(request: Request) -> Response:
    """POST /tenants/{tenant}/stream-tickets {"wells": [...]} -> {"ticket", "expiresIn"}."""
    gateway = _gateway(request)
    tenant = _tenant(request)
    principal = await gateway.guard.authorize(request, tenant)
    wells = _wells_body(await _json_body(request))
    ticket = await gateway.guard.issue_ticket(principal, wells)
    expires_in = gateway.settings.auth.ticket_ttl_s
    return JSONResponse({"ticket": ticket, "expiresIn": expires_in}, headers={"Cache-Control": "no-store"})


async def _json_body(request: Request) -> object:
    body = await request.body()
    if len(body) > 16_384:
        raise BadRequest(413, "body too large")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest(400, "body must be JSON") from None


def _wells_body(body: object) -> list[str]:
    wells = body.get("wells") if isinstance(body, dict) else None
    if not isinstance(wells, list) or not all(isinstance(w, str) and is_valid_id(w) for w in wells):
        raise BadRequest(400, 'body must be {"wells": [well ids]}')
    return list(dict.fromkeys(wells))


async def open_session(request: Request) -> Response:
    """POST /auth/session with a Bearer token -> the HttpOnly session cookie for the dashboard."""
    gateway = _gateway(request)
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("send the token as Authorization: Bearer")
    principal = await gateway.guard.verify(token.strip())
    max_age = max(1, int(principal.expires_at - time.time()))
    response = JSONResponse({"tenantId": principal.tenant, "expiresIn": max_age}, headers={"Cache-Control": "no-store"})
    response.set_cookie(
        gateway.settings.auth.cookie_name,
        token.strip(),
        max_age=max_age,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    audit("session-opened", sub=principal.subject, tenant=principal.tenant, client=client_address(request))
    return response


async def close_session(request: Request) -> Response:
    response = Response(status_code=204)
    response.delete_cookie(_gateway(request).settings.auth.cookie_name, path="/", httponly=True, samesite="strict")
    return response


async def latest(request: Request) -> Response:
    gateway = _gateway(request)
    topic = _topic(request)
    tags = _tags(request)
    await gateway.guard.authorize(request, topic.tenant, topic.well)
    snapshot = await gateway.broker.log.snapshot(topic)
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
    tenant = _tenant(request)
    principal = await gateway.guard.authorize(request, tenant)
    names = [name for name in await gateway.broker.registry.wells(tenant) if principal.may_see(name)]
    return JSONResponse({"tenantId": tenant, "wells": names})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    gateway = _gateway(request)
    if gateway.hub.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not await gateway.broker.health.ready():
        return JSONResponse({"status": "broker unreachable"}, status_code=503)
    if not gateway.hub.live:
        return JSONResponse({"status": "live feed reconnecting"}, status_code=503)
    return JSONResponse({"status": "ready"})


async def metrics(request: Request) -> Response:
    # No token (a scraper has none), but only for the configured peers: it names tenants.
    peer = request.client.host if request.client else ""
    try:
        address = ip_address(peer)
    except ValueError:
        address = None
    allowed = _gateway(request).settings.server.metrics_allow
    if address is None or not any(address in network for network in allowed):
        logger.info("GET /metrics -> 404: peer %s is not in server.metrics_allow", peer)
        return JSONResponse({"error": "not found"}, status_code=404)
    return Response(render(request.app.state.metrics), media_type=CONTENT_TYPE)


async def on_bad_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BadRequest)
    logger.info("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.reason)
    return JSONResponse({"error": exc.reason}, status_code=exc.status)


async def on_auth_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AuthError)
    audit("auth-failure", status=exc.status, reason=exc.reason, path=request.url.path, client=client_address(request))
    headers = {"WWW-Authenticate": 'Bearer realm="wellstream"'} if exc.status == 401 else None
    return JSONResponse({"error": exc.reason}, status_code=exc.status, headers=headers)


async def on_limit_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LimitError)
    audit("limit", status=exc.status, reason=exc.reason, path=request.url.path, client=client_address(request))
    headers = {"Retry-After": str(exc.retry_after_s)}
    return JSONResponse({"error": exc.reason}, status_code=exc.status, headers=headers)


async def on_broker_error(request: Request, exc: Exception) -> Response:
    logger.warning("%s %s -> 503: %s", request.method, request.url.path, exc)
    return JSONResponse({"error": "broker unavailable"}, status_code=503, headers={"Retry-After": "2"})


EXCEPTION_HANDLERS = {
    BadRequest: on_bad_request,
    AuthError: on_auth_error,
    LimitError: on_limit_error,
    BrokerError: on_broker_error,
}

STREAM_PATH = re.compile(r"^/tenants/([^/]+)/wells/([^/]+)/stream$")


async def serve_stream(scope: Scope, receive: Receive, send: Send) -> None:
    """The stream route, called by app.gateway.app.GatewayApp without Starlette's middleware and routing.

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
    Route("/metrics", metrics),
    Route("/tenants/{tenant}/wells", wells),
    Route("/tenants/{tenant}/wells/{well}/latest", latest),
    Route("/tenants/{tenant}/wells/{well}/stream", stream),
    Route("/tenants/{tenant}/stream-tickets", stream_tickets, methods=["POST"]),
    Route("/auth/session", open_session, methods=["POST"]),
    Route("/auth/session", close_session, methods=["DELETE"]),
]
