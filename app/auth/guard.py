"""The one seam routes call: who is asking, and may they see this tenant and well."""

from __future__ import annotations

import logging

from starlette.requests import Request

from app.auth.tokens import TokenVerifier
from app.errors import AuthError
from app.models import Principal

logger = logging.getLogger(__name__)


class Guard:
    def __init__(self, verifier: TokenVerifier, allow_query_token: bool = False) -> None:
        self._verifier = verifier
        self._allow_query_token = allow_query_token

    def _token(self, request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
        if self._allow_query_token and request.query_params.get("access_token"):
            return request.query_params["access_token"]
        raise AuthError("missing bearer token")

    def authorize(self, request: Request, tenant: str, well: str | None = None) -> Principal:
        """Raises AuthError: 401 bad credentials, 403 another tenant, 404 a well outside the token's list."""
        try:
            principal = self._verifier.verify(self._token(request))
        except AuthError as exc:
            logger.info("auth failure from %s: %s", request.client.host if request.client else "?", exc.reason)
            raise
        if principal.tenant != tenant:
            logger.info(
                "auth denied: sub %s of tenant %s asked for tenant %s", principal.subject, principal.tenant, tenant
            )
            raise AuthError("token is for another tenant", status=403)
        if well is not None and not principal.may_see(well):
            raise AuthError("unknown well", status=404)
        return principal
