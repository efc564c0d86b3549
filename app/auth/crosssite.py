"""Cookie-authenticated requests that change something must come from our own pages.

A browser attaches the session cookie to any request for our host; SameSite=Strict keeps it off
cross-site requests in current browsers, but not off same-site ones (a sibling subdomain) nor in
every browser. So a state-changing request (anything but GET, HEAD, OPTIONS) that authenticates
by cookie needs an `Origin` that is ours or in `auth.cors_origins`, and a POST needs a JSON
content type, which a plain HTML form cannot send. Bearer tokens and tickets are not sent by the
browser on its own, so they need neither.

"Ours" is the host name of the request's Host header (which a proxy passes on); scheme and port
are not compared, as a cookie is not kept apart by them either, and a TLS-terminating proxy
that is not listed in `auth.trusted_proxies` would make every scheme look like http.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from starlette.requests import Request

from app.errors import AuthError

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def request_scheme(request: Request, trusted_proxies: Sequence[str]) -> str:
    """http or https as the client used it: a trusted proxy's X-Forwarded-Proto, else our own socket's."""
    peer = request.client.host if request.client else ""
    if peer in trusted_proxies:
        forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
        if forwarded in ("http", "https"):
            return forwarded
    return request.url.scheme


def check_cookie_request(request: Request, cors_origins: Sequence[str]) -> None:
    """AuthError(403) for a cookie-authenticated state-changing request from elsewhere."""
    if request.method in SAFE_METHODS:
        return
    origin = request.headers.get("origin")
    if not origin or origin == "null":
        raise AuthError("cross-site request refused: a cookie session needs an Origin header", status=403)
    if origin not in cors_origins and not _same_host(origin, request):
        raise AuthError("cross-site request refused: Origin is not allowed", status=403)
    if request.method == "POST":
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise AuthError("cross-site request refused: send Content-Type: application/json", status=403)


def _same_host(origin: str, request: Request) -> bool:
    try:
        ours = urlsplit(f"//{request.headers.get('host', '')}").hostname
        theirs = urlsplit(origin).hostname
    except ValueError:
        return False
    return bool(ours) and theirs == ours
