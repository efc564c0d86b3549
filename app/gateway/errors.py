"""How errors become HTTP answers: one handler per branch of the app/errors.py tree.

Handlers are found along the exception's class hierarchy (as Starlette does for its own
routes), so the stream route, which bypasses Starlette's routing, answers a subclass exactly
as everything else does, and nothing of ours becomes a 500.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from app.auth.audit import audit
from app.errors import AuthError, BrokerError, HTTPRefusal, LimitError
from app.gateway.context import client_of
from app.gateway.sse import refused_frame

logger = logging.getLogger(__name__)

Handler = Callable[[Request, Exception], Awaitable[Response]]


async def on_refusal(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPRefusal)
    logger.info("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.reason)
    return JSONResponse({"error": exc.reason}, status_code=exc.status)


async def on_auth_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AuthError)
    audit("auth-failure", status=exc.status, reason=exc.reason, path=request.url.path, client=client_of(request))
    headers = {"WWW-Authenticate": 'Bearer realm="wellstream"'} if exc.status == 401 else None
    return JSONResponse({"error": exc.reason}, status_code=exc.status, headers=headers)


async def on_limit_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LimitError)
    audit("limit", status=exc.status, reason=exc.reason, path=request.url.path, client=client_of(request))
    headers = {"Retry-After": str(exc.retry_after_s)}
    return JSONResponse({"error": exc.reason}, status_code=exc.status, headers=headers)


async def on_broker_error(request: Request, exc: Exception) -> Response:
    logger.warning("%s %s -> 503: %s", request.method, request.url.path, exc)
    return JSONResponse({"error": "broker unavailable"}, status_code=503, headers={"Retry-After": "2"})


EXCEPTION_HANDLERS: dict[type[Exception], Handler] = {
    HTTPRefusal: on_refusal,
    AuthError: on_auth_error,
    LimitError: on_limit_error,
    BrokerError: on_broker_error,
}


def handler_for(exc: Exception) -> Handler | None:
    """The handler of the nearest class in `exc`'s hierarchy that has one."""
    for cls in type(exc).__mro__:
        handler = EXCEPTION_HANDLERS.get(cls)
        if handler is not None:
            return handler
    return None


TRANSIENT = frozenset({429, 503})
ERROR_MEDIA = frozenset({"application/json", "application/*", "*/*"})


def reads_only_event_streams(accept: str) -> bool:
    """`Accept` names text/event-stream and nothing an error document could be: what a browser's
    EventSource sends (and most SSE client libraries). Media ranges with q=0 are refused ones."""
    accepted = set()
    for media_range in accept.split(","):
        media, *params = (part.strip().lower() for part in media_range.split(";"))
        weights = [param.removeprefix("q=") for param in params if param.startswith("q=")]
        try:
            weight = float(weights[0]) if weights else 1.0
        except ValueError:
            weight = 1.0
        if media and weight > 0:
            accepted.add(media)
    return "text/event-stream" in accepted and not accepted & ERROR_MEDIA


def in_band(request: Request, response: Response) -> Response:
    """A stream refused for now (429, 503), answered so that an EventSource comes back.

    A browser's EventSource closes for good on any status but 200, so a refusal that only asks
    it to wait (a limit, a full or draining gateway, Redis out of reach) would leave the screen
    dead until someone reloads it. A client that reads only event streams gets the refusal as a
    200 stream of one `refused` event (the error, its status and Retry-After) with a `retry:`
    of Retry-After, spread up to half again so a refused crowd does not return at once; the
    stream then ends and EventSource reconnects, with its Last-Event-ID. Every other client
    (one that accepts JSON: curl, fetch readers such as the dashboard, integrators) gets the
    status itself, as proxies that retry another upstream on 503 need.
    """
    if (
        response.status_code not in TRANSIENT
        or request.method != "GET"
        or not reads_only_event_streams(request.headers.get("accept", ""))
    ):
        return response
    retry_after_s = int(response.headers.get("retry-after", "1"))
    reason = str(orjson.loads(response.body).get("error", "refused"))
    retry_ms = int(retry_after_s * 1000 * random.uniform(1.0, 1.5))
    frame = refused_frame(retry_ms, response.status_code, reason, retry_after_s)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Retry-After": str(retry_after_s)}
    return Response(frame, media_type="text/event-stream; charset=utf-8", headers=headers)
