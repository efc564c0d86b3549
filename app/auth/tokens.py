"""JWT verification (joserfc) -> Principal, and minting of development tokens.

`TokenVerifier.verify` is the one door. In order, it:

1. refuses anything over 8 KiB, not ASCII, or not three dot-separated segments, before parsing;
2. decodes the header itself and reads only `alg` and `kid` (never `jku`/`jwk`/`x5u`/`x5c`: keys come
   from configuration, see keys.py); duplicate JSON members and NaN/Infinity are malformed;
3. asks the KeySource for the key, which also says which algorithms that key may verify; the header's
   `alg` must be one of them, so `none` and HS256-with-a-public-key are refused before joserfc runs,
   and joserfc is given only that one algorithm and re-checks it against the key type;
4. checks the signature, then `exp` (required), `nbf` and `iat` with leeway, and `iss`/`aud` when
   configured (an `aud` list must contain ours);
5. type-checks the claims the gateway uses (tenant, wells, scope, sub (required), times) into a Principal.

Every failure is AuthError(reason, 401). Reasons are fixed strings: they never contain the token or
any part of it, so they are safe to log and to send back.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import secrets
import time
import warnings
from collections.abc import Mapping
from typing import Any, NoReturn

from joserfc import jwt
from joserfc.errors import BadSignatureError, ClaimError, ExpiredTokenError, JoseError, MissingClaimError
from joserfc.jwk import OctKey
from pydantic import ValidationError

from app.auth.keys import KeySource, SharedSecret, TokenHeader, key_source_from_settings
from app.errors import AuthError
from app.models import Principal, is_valid_id
from app.settings import AuthSettings

logger = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 8 * 1024
SUPPORTED_ALGORITHMS = frozenset({"HS256", "RS256", "ES256"})
_MAX_HEADER_CHARS = 1024
_MAX_KID_CHARS = 256
_MAX_NUMERIC_DATE = 2**40  # year 36812: anything later is not a timestamp
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")
# Header parameters that change how the token is processed; we implement none of them.
_REFUSED_HEADERS = ("crit", "b64", "zip", "enc")


class TokenVerifier:
    """Verifies bearer JWTs against one KeySource. Safe to share between tasks."""

    def __init__(
        self, source: KeySource, issuer: str | None = None, audience: str | None = None, leeway_s: int = 30
    ) -> None:
        if leeway_s < 0:
            raise ValueError("leeway_s must not be negative")
        self._source = source
        claims: dict[str, jwt.ClaimsOption] = {"exp": {"essential": True}}
        if issuer:
            claims["iss"] = {"essential": True, "value": issuer}
        if audience:
            claims["aud"] = {"essential": True, "value": audience}
        self._registry = jwt.JWTClaimsRegistry(None, leeway_s, **claims)

    @classmethod
    def from_settings(cls, auth: AuthSettings, secret: str | None) -> TokenVerifier:
        """The verifier for the configured key source; raises ValueError on a configuration error."""
        source = key_source_from_settings(auth, secret)
        if not auth.audience and not isinstance(source, SharedSecret):
            # A public key or JWKS usually belongs to an identity provider that issues tokens for many
            # services: without an audience, a token minted for any of them would open our streams.
            if not auth.allow_any_audience:
                raise ValueError(
                    "auth.audience is not set: with a public key or JWKS, tokens the issuer made for other "
                    "services would be accepted; set auth.audience (or auth.allow_any_audience=true to accept that)"
                )
            logger.warning("auth.audience is not set: tokens the issuer made for other services are accepted")
        return cls(source, auth.issuer, auth.audience, auth.leeway_s)

    async def verify(self, token: str) -> Principal:
        """The Principal of a valid token.

        Raises:
            AuthError: status 401 and a short reason that never contains the token; no other
                exception leaves this method.
        """
        try:
            return await self._verify(token)
        except AuthError:
            raise
        except JoseError as exc:
            raise AuthError(_jose_reason(exc)) from exc
        except (ValueError, TypeError, KeyError, OverflowError, RecursionError) as exc:
            raise AuthError("malformed token") from exc
        except Exception as exc:  # fail closed: a bug here must deny, not crash the request or allow
            logger.exception("unexpected %s while verifying a token", type(exc).__name__)
            raise AuthError("token verification failed") from exc

    async def _verify(self, token: str) -> Principal:
        if not isinstance(token, str):
            raise AuthError("malformed token")
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError("token too large")
        header = _read_header(token)
        if header.alg not in SUPPORTED_ALGORITHMS:
            raise AuthError("algorithm not allowed")
        key, algorithms = await self._source.key_for(header)
        if header.alg not in algorithms:
            raise AuthError("algorithm not allowed")
        # One algorithm, never an empty list: joserfc reads an empty allow-list as "its defaults".
        decoded = jwt.decode(token, key, algorithms=[header.alg], decoder_cls=_StrictJSONDecoder)
        for name in ("exp", "nbf", "iat"):
            _numeric_date(decoded.claims, name)  # types first, so a string `nbf` is not "not yet valid"
        self._registry.validate(decoded.claims)
        return principal_from_claims(decoded.claims)


def principal_from_claims(claims: Mapping[str, object]) -> Principal:
    """A Principal from verified claims; raises AuthError(401) if a claim has the wrong type or range."""
    scope = claims.get("scope")
    if scope is not None and not isinstance(scope, str):
        raise AuthError("token claim scope must be a string")
    subject = claims.get("sub")
    # Required: limits and audit lines are per subject, and a shared fallback ("anonymous") would let
    # one caller's streams lock every other caller without `sub` out.
    if subject is None or subject == "":
        raise AuthError("missing claim sub")
    if not isinstance(subject, str):
        raise AuthError("token claim sub must be a string")
    expires_at = _numeric_date(claims, "exp")
    if expires_at is None:
        raise AuthError("missing claim exp")
    _numeric_date(claims, "nbf")
    issued_at = _numeric_date(claims, "iat")
    token_id = claims.get("jti")
    if token_id is not None and not isinstance(token_id, str):
        raise AuthError("token claim jti must be a string")
    try:
        return Principal(
            subject=subject,
            tenant=_tenant(claims),
            wells=_wells(claims.get("wells")),
            scopes=frozenset(scope.split()) if scope else frozenset(),
            expires_at=expires_at,
            token_id=token_id or None,
            issued_at=issued_at,
        )
    except ValidationError as exc:
        raise AuthError("token claims are not valid") from exc


def mint_token(
    secret: str, tenant: str, subject: str = "dev", wells: list[str] | None = None, ttl_s: int = 3600
) -> str:
    """A development token (HS256) for `wellstream token`, the demo and tests."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": subject,
        "tenant_id": tenant,
        "iat": now,
        "exp": now + ttl_s,
        "jti": secrets.token_urlsafe(12),
        "scope": "stream:read",
    }
    if wells is not None:
        claims["wells"] = wells
    return jwt.encode({"alg": "HS256"}, claims, _mint_key(secret), algorithms=["HS256"])


def _mint_key(secret: str) -> OctKey:
    with warnings.catch_warnings():
        # joserfc warns on secrets under 112 bits; the verifier refuses secrets under 256 bits at start-up.
        warnings.simplefilter("ignore")
        return OctKey.import_key(secret)


def _read_header(token: str) -> TokenHeader:
    if token.count(".") != 2 or not token.isascii():
        raise AuthError("malformed token")
    segment = token.partition(".")[0]
    if len(segment) > _MAX_HEADER_CHARS or not _B64URL_RE.fullmatch(segment):
        raise AuthError("malformed token")
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)), cls=_StrictJSONDecoder)
    except (ValueError, RecursionError) as exc:
        raise AuthError("malformed token") from exc
    if not isinstance(header, dict):
        raise AuthError("malformed token")
    alg, kid = header.get("alg"), header.get("kid")
    if not isinstance(alg, str) or not (kid is None or (isinstance(kid, str) and 0 < len(kid) <= _MAX_KID_CHARS)):
        raise AuthError("malformed token")
    if any(name in header for name in _REFUSED_HEADERS):
        raise AuthError("unsupported token header")
    return TokenHeader(alg, kid)


class _StrictJSONDecoder(json.JSONDecoder):
    """JSON as RFC 7519 wants it: no duplicate member names (which copy would win?), no NaN/Infinity."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(object_pairs_hook=_unique_members, parse_constant=_no_constant)


def _unique_members(pairs: list[tuple[str, object]]) -> dict[str, object]:
    members = dict(pairs)
    if len(members) != len(pairs):
        raise ValueError("duplicate member name")
    return members


def _no_constant(name: str) -> NoReturn:
    raise ValueError("NaN and Infinity are not JSON")


def _numeric_date(claims: Mapping[str, object], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < _MAX_NUMERIC_DATE:
        raise AuthError(f"token claim {name} must be a NumericDate")
    return float(value)


def _tenant(claims: Mapping[str, object]) -> str:
    values = [claims[name] for name in ("tenant_id", "tenantId") if name in claims]
    if not values:
        raise AuthError("missing claim tenant_id")
    tenant = values[0]
    if any(value != tenant for value in values):
        raise AuthError("token claims tenant_id and tenantId disagree")
    if not isinstance(tenant, str) or not is_valid_id(tenant):
        raise AuthError("token claim tenant_id must be a valid id")
    return tenant


def _wells(value: object) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(well, str) and is_valid_id(well) for well in value):
        raise AuthError("token claim wells must be a list of well ids")
    return frozenset(value)


def _jose_reason(exc: JoseError) -> str:
    # Built from joserfc's fixed error codes and our own claim names: never from token content.
    if isinstance(exc, ExpiredTokenError):
        return "token expired"
    if isinstance(exc, MissingClaimError):
        return f"missing claim {exc.claim}"
    if isinstance(exc, ClaimError):
        return "token not yet valid" if exc.claim == "nbf" else f"invalid claim {exc.claim}"
    if isinstance(exc, BadSignatureError):
        return "bad signature"
    return f"invalid token: {exc.error}"
