"""Request bodies bounded while they are read: past `server.max_body_bytes`, 413 and nothing more is read.

On every route, the stream route included (app.gateway.app puts this in front of both of the
app's halves), whatever the route itself does with a body, or does not:

- a declared Content-Length over the limit is answered at once, before the app runs and before
  a byte of the body is read (nor a `100 Continue` sent);
- any other request that may carry a body (a Content-Length within the limit, chunked, any
  HTTP/2 request) has it read, and counted, before the app runs: the `http.request` message
  that passes the limit is dropped and answered with the 413. A body within the limit reaches
  the app whole, as one message. So at most the limit, plus the one message the server read
  last, is ever held;
- an HTTP/1 request with neither Content-Length nor Transfer-Encoding has no body at all (RFC
  9112 6.3): it goes straight to the app, and a stream's request holds no frame of ours.

The 413 is `{"error": reason}` like every other refusal (app/gateway/errors.py), counted in
`wellstream_refusals_total{kind="limit",reason="body too large"}` with one `wellstream.audit`
line, and over HTTP/1 carries `Connection: close`: the server closes the connection after it
instead of reading, and discarding, the rest of the body to reuse the connection (under
Hypercorn, app.gateway.server.ClosingHTTPStream sees that it does). Over HTTP/2 the header is
not allowed; the server resets the stream instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth.audit import audit
from app.auth.guard import client_address

__all__ = ["BodyLimit"]


class BodyLimit:
    """ASGI middleware: no request body past `max_bytes` reaches the app, or is read at all.

    Args:
        app: the app to guard.
        max_bytes: the most a request body may carry (`server.max_body_bytes`).
        trusted_proxies: whose X-Forwarded-For names the client in the audit line (`auth.trusted_proxies`).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, trusted_proxies: Sequence[str] = ()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.trusted_proxies = trusted_proxies

    # A plain function that hands back the app's own coroutine when there is no body: a stream's
    # request then holds no frame of ours for the hours it lasts (docs/performance.md counts the
    # bytes a stream holds).
    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] != "http":
            return self.app(scope, receive, send)
        declared, has_body = framing(scope)
        if declared is not None and declared > self.max_bytes:
            return self.refuse(scope, receive, send, declared=declared)
        if not has_body and _http1(scope):
            return self.app(scope, receive, send)
        return self._read_first(scope, receive, send)

    async def _read_first(self, scope: Scope, receive: Receive, send: Send) -> None:
        message, received = await self._read_body(receive)
        if message is None:
            await self.refuse(scope, receive, send, received=received)
            return
        first = [message]

        async def replay() -> Message:
            return first.pop() if first else await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, receive: Receive) -> tuple[Message | None, int]:
        """(the whole body as one message, or None past the limit; the bytes received)."""
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return message, received  # the client left mid-body: the app hears that first
            body: bytes = message.get("body", b"")
            received += len(body)
            if received > self.max_bytes:
                return None, received  # dropped; the rest of the body is never read
            chunks.append(body)
            if not message.get("more_body", False):
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}, received

    async def refuse(self, scope: Scope, receive: Receive, send: Send, **fields: int) -> None:
        """Count, audit and answer one body over the limit; `fields` say how it was found."""
        client = client_address(Request(scope), self.trusted_proxies)
        audit("limit", status=413, reason="body too large", path=scope["path"], client=client, **fields)
        reason = f"request body larger than {self.max_bytes} bytes"
        headers = {"Connection": "close"} if _http1(scope) else None
        await JSONResponse({"error": reason}, status_code=413, headers=headers)(scope, receive, send)


def framing(scope: Scope) -> tuple[int | None, bool]:
    """(the declared Content-Length, or None; whether the request may carry a body at all)."""
    declared: int | None = None
    has_body = False
    for name, value in scope["headers"]:
        if name == b"content-length":
            has_body = True
            # Servers refuse a malformed length, or two that differ, before the app; if one did
            # not, the largest is the one to fear.
            if value.strip().isdigit():
                declared = max(declared or 0, int(value))
        elif name == b"transfer-encoding":
            has_body = True
    return declared, has_body


def _http1(scope: Scope) -> bool:
    return scope.get("http_version") in ("1.0", "1.1")
