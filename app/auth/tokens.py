"""JWT verification (joserfc) -> Principal, and minting of development tokens.

HS256 only for now, with an explicit algorithm allow-list: `alg: none` and every other
algorithm are refused. exp is required; iss/aud are checked when configured.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import OctKey
from pydantic import ValidationError

from app.errors import AuthError
from app.models import Principal

ALGORITHMS = ["HS256"]


def _key(secret: str) -> OctKey:
    with warnings.catch_warnings():
        # joserfc warns on secrets under 112 bits; refusing them is the settings' job, not a warning's.
        warnings.simplefilter("ignore")
        return OctKey.import_key(secret)


class TokenVerifier:
    def __init__(self, secret: str, issuer: str | None = None, audience: str | None = None, leeway_s: int = 30):
        self._key = _key(secret)
        claims: dict[str, Any] = {"exp": {"essential": True}}
        if issuer:
            claims["iss"] = {"essential": True, "value": issuer}
        if audience:
            claims["aud"] = {"essential": True, "value": audience}
        self._registry = jwt.JWTClaimsRegistry(leeway=leeway_s, **claims)

    def verify(self, token: str) -> Principal:
        """Raises AuthError(401) with a reason that never contains the token."""
        if len(token) > 8192:
            raise AuthError("token too large")
        try:
            decoded = jwt.decode(token, self._key, algorithms=ALGORITHMS)
            self._registry.validate(decoded.claims)
        except JoseError as exc:
            raise AuthError(f"invalid token: {exc.error}") from exc
        except (ValueError, OverflowError) as exc:
            raise AuthError("malformed token") from exc
        return principal_from_claims(decoded.claims)


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    tenant = claims.get("tenant_id", claims.get("tenantId"))
    scope = claims.get("scope", "")
    wells = claims.get("wells")
    exp = claims.get("exp")
    if wells is not None and not (isinstance(wells, list) and all(isinstance(w, str) for w in wells)):
        raise AuthError("token claim wells must be a list of well ids")
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not 0 < exp < 2**40:
        raise AuthError("token claim exp must be a NumericDate")
    try:
        return Principal(
            subject=str(claims.get("sub") or "anonymous"),
            tenant=tenant,
            wells=frozenset(wells) if wells is not None else None,
            scopes=frozenset(scope.split()) if isinstance(scope, str) else frozenset(),
            expires_at=float(exp),
        )
    except (ValidationError, TypeError, ValueError) as exc:
        raise AuthError("token claims are not valid (tenant_id, wells)") from exc


def mint_token(
    secret: str, tenant: str, subject: str = "dev", wells: list[str] | None = None, ttl_s: int = 3600
) -> str:
    """A development token for `wellstream token`, the demo and tests."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": subject,
        "tenant_id": tenant,
        "iat": now,
        "exp": now + ttl_s,
        "scope": "stream:read",
    }
    if wells is not None:
        claims["wells"] = wells
    return jwt.encode({"alg": "HS256"}, claims, _key(secret), algorithms=ALGORITHMS)
