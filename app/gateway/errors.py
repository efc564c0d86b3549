"""How errors become HTTP answers: one handler per branch of the app/errors.py tree.

Handlers are found along the exception's class hierarchy (as Starlette does for its own
routes), so the stream route, which bypasses Starlette's routing, answers a subclass exactly
as everything else does, and nothing of ours becomes a 500.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from app.auth.audit import audit
from app.errors import AuthError, BrokerError, HTTPRefusal, LimitError
from app.gateway.context import client_of

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
