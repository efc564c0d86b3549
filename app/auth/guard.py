"""The one seam routes call: who is asking, and may they see this tenant and well.

Credentials are looked for in this order: `Authorization: Bearer`, the session cookie (set by
POST /auth/session for the same-origin dashboard), a single-use stream ticket (`?ticket=`,
stream requests only), and `?access_token=` only where a setting allows it. Tickets are
stored by their SHA-256, so the ticket store never holds a redeemable ticket.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Sequence

import orjson
from pydantic import ValidationError
from starlette.requests import Request

from app.auth.admission import FailureThrottle
from app.auth.audit import audit
from app.auth.crosssite import check_cookie_request
from app.auth.revocation import subject_hash
from app.auth.tokens import TokenVerifier
from app.errors import AuthError
from app.models import Principal
from app.settings import AuthSettings
from app.streams.seams import Broker, Revocation


def client_address(request: Request, trusted: Sequence[str]) -> str:
    """The client's address; behind a trusted proxy, the last hop it appended to X-Forwarded-For.

    Only addresses in `trusted` (`auth.trusted_proxies`) are believed: anyone else could write
    the header themselves to dodge the per-address limits.
    """
    peer = request.client.host if request.client else "unknown"
    if peer not in trusted:
        return peer
    hops = [hop.strip() for hop in request.headers.get("x-forwarded-for", "").split(",") if hop.strip()]
    for hop in reversed(hops):
        if hop not in trusted:
            return hop[:64]
    return peer


def _stored_as(secret: str) -> str:
    """The key a ticket or session id is stored under: its SHA-256, so the store never holds one that works."""
    return hashlib.sha256(secret.encode()).hexdigest()


KNOWN_WELL_S = 10.0  # a registered well is asked about again after this long
KNOWN_WELLS_KEPT = 100_000


class Guard:
    def __init__(self, verifier: TokenVerifier, broker: Broker, settings: AuthSettings) -> None:
        self._verifier = verifier
        self._registry = broker.registry
        self._tickets = broker.tickets
        self._sessions = broker.sessions
        self._revocations = broker.revocations
        self._settings = settings
        self._failures = FailureThrottle(settings.limits.auth_failures_per_s, settings.limits.auth_failure_burst)
        # (tenant, well) -> until when it is known registered. Wells are only ever added, so a
        # "yes" stays true; asking Redis once per KNOWN_WELL_S instead of at every open takes
        # one of the four round trips off each stream's admission (a burst of 10,000 opens
        # spent 5 % of the gateway's CPU on it, py-spy). A "no" is never kept: a well registered
        # a moment ago is found at once.
        self._known_wells: dict[tuple[str, str], float] = {}

    async def verify(self, token: str) -> Principal:
        return await self._verifier.verify(token)

    async def principal(self, request: Request, *, tickets: bool = False, bearer_only: bool = False) -> Principal:
        """The caller, from the first credential present; AuthError(401) if none is valid.

        LimitError(429) first if this client address has failed too often (every route counts).
        """
        address = client_address(request, self._settings.trusted_proxies)
        self._failures.check(address)
        try:
            principal = await self._credentials(request, tickets=tickets, bearer_only=bearer_only)
            await self.check_revoked(principal)
        except AuthError as exc:
            if exc.status == 401:
                self._failures.record(address)
            raise
        return principal

    async def check_revoked(self, principal: Principal) -> None:
        """AuthError(401) if the token, or every token of its subject issued before a time, was revoked."""
        subject = subject_hash(principal.subject)
        if await self._revocations.is_revoked(principal.tenant, principal.token_id, subject, principal.issued_at):
            raise AuthError("token revoked")

    async def _credentials(self, request: Request, *, tickets: bool, bearer_only: bool) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return await self.verify(credentials.strip())
        if bearer_only:
            raise AuthError("send the token as Authorization: Bearer")
        cookie = request.cookies.get(self._settings.cookie_name)
        if cookie:
            principal = await self._session(cookie)
            check_cookie_request(request, self._settings.cors_origins)
            return principal
        ticket = request.query_params.get("ticket")
        if tickets and ticket:
            return await self.redeem_ticket(ticket)
        if self._settings.allow_query_token and request.query_params.get("access_token"):
            return await self.verify(request.query_params["access_token"])
        raise AuthError("missing credentials: send a Bearer token, the session cookie or a stream ticket")

    async def authorize(
        self, request: Request, tenant: str, well: str | None = None, *, tickets: bool = False
    ) -> Principal:
        """Raises AuthError: 401 bad credentials, 403 another tenant, 404 a well it may not see.

        An unknown well and a well of the tenant outside the token's `wells` claim get the same
        404, so well ids cannot be probed.
        """
        principal = await self.principal(request, tickets=tickets)
        self.check_scope(principal)
        if principal.tenant != tenant:
            raise AuthError("token is for another tenant", status=403)
        if well is not None and not (principal.may_see(well) and await self._registered(tenant, well)):
            raise AuthError("unknown well", status=404)
        return principal

    async def _registered(self, tenant: str, well: str) -> bool:
        now = time.monotonic()
        if self._known_wells.get((tenant, well), 0.0) > now:
            return True
        if not await self._registry.has_well(tenant, well):
            return False
        if len(self._known_wells) >= KNOWN_WELLS_KEPT:  # bounded: many tenants' wells, or a probe
            self._known_wells.clear()
        self._known_wells[(tenant, well)] = now + KNOWN_WELL_S
        return True

    def check_scope(self, principal: Principal) -> None:
        """AuthError(403) unless the token carries the read scope (`auth.read_scope`, if set)."""
        needed = self._settings.read_scope
        if needed and needed not in principal.scopes:
            raise AuthError(f"token lacks the scope {needed}", status=403)

    async def issue_ticket(self, principal: Principal, wells: Sequence[str] | None) -> str:
        """A random single-use ticket for these wells (None: every well the token may see, for a
        stream of many wells), bound to the caller and its token's expiry."""
        most = self._settings.limits.wells_per_stream
        if wells is not None:
            if not 1 <= len(wells) <= most:
                raise AuthError(f"ask for 1 to {most} wells", status=400)
            registered = set(await self._registry.wells(principal.tenant))
            if not all(principal.may_see(well) and well in registered for well in wells):
                raise AuthError("unknown well", status=404)
        # A ticket never outlives the token it came from.
        ttl_s = min(self._settings.ticket_ttl_s, int(principal.expires_at - time.time()))
        if ttl_s < 1:
            raise AuthError("token expired")
        ticket = secrets.token_urlsafe(32)
        bound = principal if wells is None else principal.model_copy(update={"wells": frozenset(wells)})
        await self._tickets.put(_stored_as(ticket), bound.model_dump_json().encode(), ttl_s)
        audit("ticket-issued", sub=principal.subject, tenant=principal.tenant, wells=sorted(wells or ["*"]))
        return ticket

    async def open_session(self, principal: Principal) -> str:
        """A new session for this caller until its token expires; returns the cookie's value, a
        random id the broker knows only by its hash."""
        ttl_s = principal.expires_at - time.time()
        if ttl_s < 1:
            raise AuthError("token expired")
        session_id = secrets.token_urlsafe(32)
        key = _stored_as(session_id)
        stored = principal.model_copy(update={"session": key})
        await self._sessions.put(key, stored.model_dump_json().encode(), ttl_s)
        return session_id

    async def close_session(self, session_id: str) -> Principal | None:
        """End the session on every gateway, its live streams included; its caller, if it was one."""
        if len(session_id) > 128:
            return None
        key = _stored_as(session_id)
        payload = await self._sessions.get(key)
        if payload is None:
            return None
        await self._sessions.delete(key)
        principal = _stored_principal(payload, "session")
        await self._revocations.revoke(Revocation("session", principal.tenant, key), 0)
        return principal

    async def _session(self, session_id: str) -> Principal:
        if len(session_id) > 128:
            raise AuthError("invalid session")
        payload = await self._sessions.get(_stored_as(session_id))
        if payload is None:
            raise AuthError("session ended or expired: sign in again")
        principal = _stored_principal(payload, "session")
        if principal.expires_at <= time.time():
            raise AuthError("token expired")
        return principal

    async def redeem_ticket(self, ticket: str) -> Principal:
        if len(ticket) > 128:
            raise AuthError("invalid ticket")
        payload = await self._tickets.take(_stored_as(ticket))
        if payload is None:
            raise AuthError("invalid, expired or already used ticket")
        principal = _stored_principal(payload, "ticket")
        if principal.expires_at <= time.time():
            raise AuthError("the token behind this ticket has expired")
        return principal


def _stored_principal(payload: bytes, what: str) -> Principal:
    try:
        return Principal.model_validate(orjson.loads(payload))
    except (ValidationError, ValueError) as exc:
        raise AuthError(f"invalid {what}") from exc
