"""Thin HTTP handlers: validate, authorize, hand over to the hub or the broker."""

from __future__ import annotations

import logging
import math
import re
import time

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from app.auth.audit import audit
from app.auth.crosssite import request_scheme
from app.errors import AuthError, RequestError
from app.gateway.context import client_of, gateway_of
from app.gateway.errors import handler_for, in_band
from app.gateway.eventstream import EventStream, audit_fields
from app.gateway.metrics import CONTENT_TYPE, may_scrape, render
from app.models import Principal, Selection, StreamId, Topic, is_valid_id
from app.streams.codec import single_line_json

logger = logging.getLogger(__name__)

MAX_TAGS = 64


def _tenant(request: Request) -> str:
    tenant: str = request.path_params["tenant"]
    if not is_valid_id(tenant):
        raise RequestError("unknown tenant", 404)
    return tenant


def _topic(request: Request) -> Topic:
    tenant, well = request.path_params["tenant"], request.path_params["well"]
    if not (is_valid_id(tenant) and is_valid_id(well)):
        raise RequestError("unknown tenant or well", 404)
    return Topic(tenant, well)


def _last_event_id(request: Request) -> StreamId | None:
    raw = request.headers.get("last-event-id") or request.query_params.get("lastEventId")
    if not raw:
        return None
    try:
        return StreamId.parse(raw.strip())
    except ValueError:
        raise RequestError("malformed Last-Event-ID: expected <milliseconds>-<sequence>", 400) from None


def _tags(request: Request) -> frozenset[str] | None:
    return _ids(request, "tags", MAX_TAGS)


def _ids(request: Request, name: str, most: int) -> frozenset[str] | None:
    """A query parameter holding 1 to `most` comma-separated ids (`?tags=`, `?wells=`), or None."""
    raw = request.query_params.get(name)
    if raw is None:
        return None
    ids = frozenset(part.strip() for part in raw.split(",") if part.strip())
    if not ids or len(ids) > most or not all(is_valid_id(part) for part in ids):
        raise RequestError(f"{name} must be 1-{most} comma-separated {name.removesuffix('s')} ids", 400)
    return ids


async def stream(request: Request) -> Response | EventStream:
    """GET /tenants/{tenant}/wells/{well}/stream, and GET /tenants/{tenant}/stream (many wells)."""
    gateway = gateway_of(request)
    client = client_of(request)
    gateway.limits.check_attempt(client)
    tenant, well = _tenant(request), _well(request)
    last_id, tags = _last_event_id(request), _tags(request)
    asked = _ids(request, "wells", gateway.settings.auth.limits.wells_per_stream) if well is None else None
    # HEAD answers headers only: it must not use up a single-use ticket.
    principal = await gateway.guard.authorize(request, tenant, well, tickets=request.method == "GET")
    if principal.expires_at <= time.time():
        # Accepted within the clock leeway, but a stream would end at once: ask for a fresh token.
        raise AuthError("token expired")
    if well:
        selection = Selection(tenant, frozenset({well}), tags, _max_rate(request))
    else:
        selection = await _selection(request, principal, asked, tags)
    if gateway.hub.draining:
        return JSONResponse({"error": "server shutting down"}, status_code=503, headers={"Retry-After": "1"})
    if request.method == "HEAD":
        return Response(headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"})
    lease = await gateway.limits.admit(principal)
    audit("connect", sub=principal.subject, **audit_fields(selection), client=client)
    settings = gateway.settings
    return EventStream(
        gateway.hub,
        gateway.broker.log,
        selection,
        last_id,
        settings.stream,
        settings.history,
        principal,
        lease,
        gateway.revocations,
    )


MAX_RATE = 100.0


def _max_rate(request: Request) -> float | None:
    """`?mode=latest&maxRate=N`: the newest value per tag at most N times a second (conflated)."""
    mode = request.query_params.get("mode", "all")
    if mode == "all":
        return None
    if mode != "latest":
        raise RequestError("mode must be all or latest", 400)
    try:
        rate = float(request.query_params.get("maxRate", "1"))
    except ValueError:
        rate = math.nan
    if not 0 < rate <= MAX_RATE:
        raise RequestError(f"maxRate must be a number of updates per second, above 0 and at most {MAX_RATE:g}", 400)
    return rate


def _well(request: Request) -> str | None:
    well: str | None = request.path_params.get("well")
    if well is not None and not is_valid_id(well):
        raise RequestError("unknown tenant or well", 404)
    return well


async def _selection(
    request: Request, principal: Principal, asked: frozenset[str] | None, tags: frozenset[str] | None
) -> Selection:
    """The wells of a stream of many: those asked for (each registered and allowed, else 404 as for one
    well), else the token's `wells` claim, else every well of the tenant, now and later."""
    gateway = gateway_of(request)
    tenant = principal.tenant
    most = gateway.settings.auth.limits.wells_per_stream
    registered = set(await gateway.broker.registry.wells(tenant))
    if asked is not None:
        unknown = sorted(well for well in asked if well not in registered or not principal.may_see(well))
        if unknown:
            raise RequestError(f"unknown wells: {', '.join(unknown[:20])}", 404)
        return Selection(tenant, asked, tags, _max_rate(request))
    if principal.wells is not None:
        return Selection(tenant, principal.wells, tags, _max_rate(request))
    if len(registered) > most:
        raise RequestError(
            f"the tenant has {len(registered)} wells, more than one stream carries ({most}): ask for ?wells=", 400
        )
    return Selection(tenant, None, tags, _max_rate(request))


async def stream_tickets(request: Request) -> Response:
    """POST /tenants/{tenant}/stream-tickets {"wells": [...]} -> {"ticket", "expiresIn"}."""
    gateway = gateway_of(request)
    gateway.limits.check_attempt(client_of(request))
    tenant = _tenant(request)
    principal = await gateway.guard.authorize(request, tenant)
    gateway.limits.check_subject(principal)
    wells = _wells_body(await _json_body(request))
    ticket = await gateway.guard.issue_ticket(principal, wells)
    expires_in = gateway.settings.auth.ticket_ttl_s
    return JSONResponse({"ticket": ticket, "expiresIn": expires_in}, headers={"Cache-Control": "no-store"})


async def _json_body(request: Request) -> object:
    body = await request.body()
    if len(body) > 16_384:
        raise RequestError("body too large", 413)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise RequestError("body must be JSON", 400) from None


def _wells_body(body: object) -> list[str] | None:
    """{"wells": [ids]}, or {"wells": null} for every well the token may see (a stream of many wells)."""
    if not isinstance(body, dict) or "wells" not in body:
        raise RequestError('body must be {"wells": [well ids] or null}', 400)
    wells = body["wells"]
    if wells is None:
        return None
    if not isinstance(wells, list) or not all(isinstance(w, str) and is_valid_id(w) for w in wells):
        raise RequestError('body must be {"wells": [well ids] or null}', 400)
    return list(dict.fromkeys(wells))


async def open_session(request: Request) -> Response:
    """POST /auth/session with a Bearer token -> the HttpOnly session cookie for the dashboard."""
    gateway = gateway_of(request)
    gateway.limits.check_attempt(client_of(request))
    principal = await gateway.guard.principal(request, bearer_only=True)
    gateway.guard.check_scope(principal)
    gateway.limits.check_subject(principal)
    session_id = await gateway.guard.open_session(principal)
    max_age = max(1, int(principal.expires_at - time.time()))
    response = JSONResponse({"tenantId": principal.tenant, "expiresIn": max_age}, headers={"Cache-Control": "no-store"})
    response.set_cookie(
        gateway.settings.auth.cookie_name,
        session_id,
        max_age=max_age,
        httponly=True,
        samesite="strict",
        secure=request_scheme(request, gateway.settings.auth.trusted_proxies) == "https",
        path="/",
    )
    audit("session-opened", sub=principal.subject, tenant=principal.tenant, client=client_of(request))
    return response


async def close_session(request: Request) -> Response:
    """DELETE /auth/session: the session ends on every gateway (its streams too), and the cookie goes."""
    gateway = gateway_of(request)
    name = gateway.settings.auth.cookie_name
    session_id = request.cookies.get(name)
    principal = await gateway.guard.close_session(session_id) if session_id else None
    if principal is not None:
        audit("session-closed", sub=principal.subject, tenant=principal.tenant, client=client_of(request))
    response = Response(status_code=204)
    response.delete_cookie(name, path="/", httponly=True, samesite="strict")
    return response


async def latest(request: Request) -> Response:
    gateway = gateway_of(request)
    topic = _topic(request)
    tags = _tags(request)
    await gateway.guard.authorize(request, topic.tenant, topic.well)
    await gateway.sweeper.sweep(topic.tenant)  # nobody may be streaming this tenant: the verdict first
    read = await gateway.broker.log.read(topic.tenant, [topic.well], None, 0)
    latest = read.wells[topic.well].latest or {}
    readings = [single_line_json(data) for tag, data in sorted(latest.items()) if tags is None or tag in tags]
    body = b'{"tenantId":"%s","wellId":"%s","lastEventId":"%s","readings":[%s]}' % (
        topic.tenant.encode(),
        topic.well.encode(),
        str(read.clock).encode(),
        b",".join(readings),
    )
    return Response(body, media_type="application/json", headers={"Cache-Control": "no-cache"})


async def wells(request: Request) -> Response:
    gateway = gateway_of(request)
    tenant = _tenant(request)
    principal = await gateway.guard.authorize(request, tenant)
    names = [name for name in await gateway.broker.registry.wells(tenant) if principal.may_see(name)]
    return JSONResponse({"tenantId": tenant, "wells": names})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    gateway = gateway_of(request)
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
    if not may_scrape(peer, gateway_of(request).settings.server.metrics_allow):
        return JSONResponse({"error": "not found"}, status_code=404)
    return Response(render(request.app.metrics), media_type=CONTENT_TYPE)


# /tenants/{tenant}/wells/{well}/stream and /tenants/{tenant}/stream: the only routes outside Starlette's.
STREAM_PATH = re.compile(r"^/tenants/([^/]+)(?:/wells/([^/]+))?/stream$")
STREAM_METHODS = ("GET", "HEAD")


async def serve_stream(scope: Scope, receive: Receive, send: Send) -> None:
    """The stream route, the only one outside Starlette's routing (app.gateway.app.GatewayApp
    sends every request on STREAM_PATH here, whatever its method).

    A stream's request task stays suspended for hours; under the usual stack it would hold a
    dozen coroutine frames and their objects per connection (docs/performance.md). Errors are
    answered by the same handlers as everywhere else.
    """
    request = Request(scope, receive)
    try:
        if request.method not in STREAM_METHODS:
            raise RequestError("method not allowed", 405)
        response: Response | EventStream = await stream(request)
    except Exception as exc:
        handler = handler_for(exc)
        if handler is None:
            logger.exception("%s %s failed", request.method, request.url.path)
            response = JSONResponse({"error": "internal error"}, status_code=500)
        else:
            response = await handler(request, exc)
        if isinstance(exc, RequestError) and exc.status == 405:
            response.headers["Allow"] = ", ".join(STREAM_METHODS)
    if isinstance(response, Response):
        response = in_band(request, response)
    await response(scope, receive, send)


ROUTES = [
    Route("/healthz", healthz),
    Route("/readyz", readyz),
    Route("/metrics", metrics),
    Route("/tenants/{tenant}/wells", wells),
    Route("/tenants/{tenant}/wells/{well}/latest", latest),
    Route("/tenants/{tenant}/stream-tickets", stream_tickets, methods=["POST"]),
    Route("/auth/session", open_session, methods=["POST"]),
    Route("/auth/session", close_session, methods=["DELETE"]),
]
