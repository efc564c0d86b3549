"""One JSON access line per request: method, path, status, duration, bytes, client.

Never the query string (it can hold a stream ticket, or a token where query tokens are
allowed) and never a header: what identifies a caller is in the audit lines, by subject.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("wellstream.access")


class AccessLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 0
        sent = 0

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            logger.info(
                "%s %s %d",
                scope["method"],
                scope["path"],
                status,
                extra={
                    "fields": {
                        "event": "access",
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status,
                        "duration_s": round(time.monotonic() - started, 3),
                        "bytes": sent,
                        "peer": (scope.get("client") or ("",))[0],  # the proxy, behind one: audit has the client
                        "http": scope.get("http_version"),
                    }
                },
            )
