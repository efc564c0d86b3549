"""The security cases of the auth issue, each against a real gateway on loopback with a real redis-server.

Every test checks the status, the reason in the JSON body and the audit line, that no token or ticket
is ever echoed or logged, and that no reading crosses tenants: each test publishes a canary reading
(LEAK_VALUE) to the *other* tenant's same-named wells and asserts it never appears in a body it read.
Token-level rules (every claim, every key source) are in test_tokens.py; here they are seen over HTTP.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, OctKey, RSAKey

from app.auth.tokens import mint_token
from app.logs import JsonFormatter
from app.streams.redis import connect_redis
from app.streams.seams import Broker
from tests.auth.test_keys import rsa_key
from tests.auth.test_tokens import b64
from tests.conftest import RunningGateway, make_settings, running_gateway, wait_until
from tests.factories import make_reading
from tests.sse_client import Event, SSEReader

pytestmark = pytest.mark.anyio

STREAM = "/tenants/acme/wells/w1/stream"
LATEST = "/tenants/acme/wells/w1/latest"
WELLS = "/tenants/acme/wells"
TICKETS = "/tenants/acme/stream-tickets"
SESSION = "/auth/session"

OWN_VALUE = 42.5  # the caller's own tenant's reading: shows data does flow where it should
LEAK_VALUE = 666.0  # published to the other tenant: must never be seen
LEAK_TAG = "leakcanary"
OTHER_ONLY_WELL = "gx-only"  # a well only the other tenant has (created by publishing to it)

ISSUER = "https://idp.example/"
AUDIENCE = "wellstream"
MISSING = "missing credentials: send a Bearer token, the session cookie or a stream ticket"
UNKNOWN_WELL = {"error": "unknown well"}
ANOTHER_TENANT = {"error": "token is for another tenant"}
WWW_AUTHENTICATE = 'Bearer realm="wellstream"'
ALG_NONE = b'{"alg":"none"}'


# --- keys and tokens, made at test time ---


def claims(tenant: str = "acme", **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    body: dict[str, Any] = {
        "sub": "tester",
        "tenant_id": tenant,
        "scope": "stream:read",
        "iat": now,
        "exp": now + 600,
        **overrides,
    }
    return {name: value for name, value in body.items() if value is not None}


def hs256(secret: str, body: dict[str, Any]) -> str:
    return jwt.encode({"alg": "HS256"}, body, OctKey.import_key(secret), algorithms=["HS256"])


def rs256(key: RSAKey, body: dict[str, Any]) -> str:
    return jwt.encode({"alg": "RS256", "kid": key.kid}, body, key, algorithms=["RS256"])


def hmac_forged(secret: bytes, header: dict[str, Any], body: dict[str, Any]) -> str:
    """Signed by hand, as an attacker would, with any bytes as the HMAC secret."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}"
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def public_pem_file(tmp_path: Path, key: RSAKey) -> Path:
    path = tmp_path / "public.pem"
    path.write_bytes(key.as_pem(private=False))
    return path


def jwks_file(tmp_path: Path, *keys: RSAKey) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(KeySet(list(keys)).as_dict(private=False)))
    return path


# --- a gateway, a publisher, a recording client ---


class RecordingReader(SSEReader):
    """An SSEReader that keeps every line it reads, for the leak check."""

    def __init__(self, response: httpx.Response, sink: list[str]) -> None:
        super().__init__(response)
        lines = self._lines

        async def record() -> AsyncIterator[str]:
            async for line in lines:
                sink.append(line)
                yield line

        self._lines = record()


@dataclass
class Site:
    gateway: RunningGateway
    publisher: Broker
    client: httpx.AsyncClient
    caplog: pytest.LogCaptureFixture
    tenant: str
    other: str
    bodies: list[str] = field(default_factory=list)  # every response body read, streams included
    secrets: list[str] = field(default_factory=list)  # tokens and tickets: never logged, never echoed

    def token(self, secret: str, subject: str = "tester", wells: list[str] | None = None, ttl_s: int = 600) -> str:
        token = mint_token(secret, self.tenant, subject, wells, ttl_s)
        self.secrets.append(token)
        return token

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = await self.client.request(method, path, **kwargs)
        self.bodies.append(response.text)
        return response

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("GET", path, **kwargs)

    @contextlib.asynccontextmanager
    async def stream(self, path: str, **kwargs: Any) -> AsyncIterator[tuple[httpx.Response, RecordingReader]]:
        async with self.client.stream("GET", path, **kwargs) as response:
            if response.status_code != 200:
                await response.aread()
                self.bodies.append(response.text)
            yield response, RecordingReader(response, self.bodies)

    async def ticket(self, token: str, wells: list[str]) -> str:
        response = await self.request("POST", TICKETS, headers=bearer(token), json={"wells": wells})
        assert response.status_code == 200, response.text
        ticket: str = response.json()["ticket"]
        self.bodies.pop()  # the one body that must carry the ticket
        self.secrets.append(ticket)
        return ticket

    async def leak_then_own(self, events: SSEReader, well: str = "w1", value: float = 7.0) -> Event:
        """Publish a live canary to the other tenant's well, then a reading to ours; returns ours.

        Both go through the same Redis connection in order, so a leaked canary would arrive first.
        """
        await self.publisher.log.publish([make_reading(LEAK_VALUE, LEAK_TAG, tenant=self.other, well=well)])
        await self.publisher.log.publish([make_reading(value, "p", tenant=self.tenant, well=well)])
        event = await events.next_event("reading")
        assert event.json()["value"] == value
        assert event.json()["tenantId"] == self.tenant
        return event

    def audits(self, event: str | None = None) -> list[dict[str, Any]]:
        found = [getattr(r, "audit", None) for r in self.caplog.records if r.name == "wellstream.audit"]
        return [a for a in found if isinstance(a, dict) and (event is None or a["event"] == event)]

    def assert_audited(self, event: str, **fields: object) -> dict[str, Any]:
        for record in self.audits(event):
            if all(record.get(name) == value for name, value in fields.items()):
                return record
        raise AssertionError(f"no {event} audit line with {fields}; audit lines: {self.audits()}")

    def check_no_leak(self) -> None:
        text = "\n".join(self.bodies)
        assert str(LEAK_VALUE) not in text, "a reading of the other tenant reached this caller"
        assert LEAK_TAG not in text, "a reading of the other tenant reached this caller"
        assert f'"tenantId":"{self.other}"' not in text.replace(" ", "")
        formatter = JsonFormatter()
        lines = [formatter.format(record) for record in self.caplog.records]
        for credential in self.secrets:
            assert credential not in text, "a response echoes a credential"
            assert not [line for line in lines if credential in line], "a log line carries a credential"
        errors = [
            line for record, line in zip(self.caplog.records, lines, strict=True) if record.levelno >= logging.ERROR
        ]
        assert not errors, "the gateway logged an error"


@contextlib.asynccontextmanager
async def secure_site(
    redis_url: str,
    secret: str,
    caplog: pytest.LogCaptureFixture,
    *,
    tenant: str = "acme",
    leak_wells: tuple[str, ...] = ("w1", "w2", "w404", OTHER_ONLY_WELL),
    **overrides: object,
) -> AsyncIterator[Site]:
    """A gateway on Redis; `tenant`'s w1 and w2 hold OWN_VALUE, the other tenant's `leak_wells` the canary."""
    caplog.set_level("INFO", logger="wellstream.audit")
    caplog.set_level("INFO", logger="app")
    other = "globex" if tenant == "acme" else "acme"
    settings = make_settings(secret, redis_url=redis_url, **overrides)
    async with (
        connect_redis(redis_url, settings.history.max_len) as publisher,
        running_gateway(settings) as gateway,
        httpx.AsyncClient(base_url=gateway.url, timeout=5) as client,
    ):
        await publisher.log.publish([make_reading(OWN_VALUE, "p", tenant=tenant, well=well) for well in ("w1", "w2")])
        await publisher.log.publish(
            [make_reading(LEAK_VALUE, LEAK_TAG, tenant=other, well=well) for well in leak_wells]
        )
        site = Site(gateway, publisher, client, caplog, tenant, other)
        yield site
        site.check_no_leak()


def ticket_body(method: str) -> dict[str, list[str]] | None:
    return {"wells": ["w1"]} if method == "POST" else None


def values(body: dict[str, Any]) -> list[float]:
    return [reading["value"] for reading in body["readings"]]


# --- bad credentials: 401 with a reason, an audit line, and nothing echoed ---


def credentials(case: str, secret: str, tmp_path: Path) -> tuple[dict[str, object], str | None, str]:
    """(gateway auth settings, the token sent or None for none, a token the same gateway accepts)."""
    good = hs256(secret, claims())
    if case == "no-token":
        return {}, None, good
    if case == "garbage":
        return {}, f"this-is-not-a-jwt-{secrets.token_hex(8)}", good
    if case == "expired":
        return {}, hs256(secret, claims(exp=int(time.time()) - 120)), good
    if case == "not-yet-valid":
        return {}, hs256(secret, claims(nbf=int(time.time()) + 600)), good
    if case == "wrong-signature":
        return {}, hs256(secrets.token_urlsafe(32), claims()), good
    if case == "alg-none":
        return {}, f"{b64(ALG_NONE)}.{b64(json.dumps(claims()).encode())}.", good
    if case in ("wrong-issuer", "wrong-audience"):
        configured: dict[str, object] = {"issuer": ISSUER, "audience": AUDIENCE}
        wrong = {"iss": "https://evil.example/"} if case == "wrong-issuer" else {"aud": "another-service"}
        body = claims(**{"iss": ISSUER, "aud": AUDIENCE, **wrong})
        return configured, hs256(secret, body), hs256(secret, claims(iss=ISSUER, aud=AUDIENCE))
    key = rsa_key("k1")
    if case == "hs-rs-confusion":
        pem = key.as_pem(private=False)
        forged = hmac_forged(pem, {"alg": "HS256", "typ": "JWT"}, claims(aud=AUDIENCE))
        configured = {"public_key_file": str(public_pem_file(tmp_path, key)), "audience": AUDIENCE}
        return configured, forged, rs256(key, claims(aud=AUDIENCE))
    if case == "unknown-kid":
        forged = rs256(rsa_key("k2"), claims(aud=AUDIENCE))
        configured = {"jwks_file": str(jwks_file(tmp_path, key)), "audience": AUDIENCE}
        return configured, forged, rs256(key, claims(aud=AUDIENCE))
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("no-token", MISSING),
        ("garbage", "malformed token"),
        ("expired", "token expired"),
        ("not-yet-valid", "token not yet valid"),
        ("wrong-signature", "bad signature"),
        ("wrong-issuer", "invalid claim iss"),
        ("wrong-audience", "invalid claim aud"),
        ("alg-none", "algorithm not allowed"),
        ("hs-rs-confusion", "algorithm not allowed"),
        ("unknown-kid", "unknown key id"),
    ],
)
async def test_bad_credentials_get_401_with_a_reason_and_an_audit_line(
    redis_url: str, secret: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str, reason: str
) -> None:
    with anyio.fail_after(15):
        settings, sent, good = credentials(case, secret, tmp_path)
        async with secure_site(redis_url, secret, caplog, auth=settings) as s:
            s.secrets += [good] if sent is None else [good, sent]
            headers = {} if sent is None else bearer(sent)
            attempts = [("GET", STREAM), ("GET", LATEST), ("GET", WELLS), ("POST", TICKETS)]
            for method, path in attempts:
                response = await s.request(method, path, headers=headers, json=ticket_body(method))
                assert response.status_code == 401, (path, response.text)
                assert response.headers["www-authenticate"] == WWW_AUTHENTICATE
                assert response.json() == {"error": reason}
                s.assert_audited("auth-failure", status=401, reason=reason, path=path, client="127.0.0.1")
            assert not s.audits("connect")
            control = await s.get(LATEST, headers=bearer(good))
            assert control.status_code == 200, "the same gateway accepts a good token"
            assert values(control.json()) == [OWN_VALUE]


# --- authorization: another tenant 403; a well the caller may not see 404, always the same body ---


async def test_a_token_of_another_tenant_gets_403(
    redis_url: str, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(15):
        async with secure_site(redis_url, secret, caplog, tenant="globex", leak_wells=("w1", "w2")) as s:
            token = s.token(secret)  # globex's
            for method, path in [("GET", STREAM), ("GET", LATEST), ("GET", WELLS), ("POST", TICKETS)]:
                response = await s.request(method, path, headers=bearer(token), json=ticket_body(method))
                assert response.status_code == 403, path
                assert response.json() == ANOTHER_TENANT
                assert "www-authenticate" not in response.headers
                s.assert_audited("auth-failure", status=403, reason=ANOTHER_TENANT["error"], path=path)
            own = await s.get("/tenants/globex/wells/w1/latest", headers=bearer(token))
            assert own.status_code == 200
            assert values(own.json()) == [OWN_VALUE], "same well id, own tenant: only its own data"


async def test_a_token_without_the_read_scope_gets_403_everywhere(
    redis_url: str, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    lacks = {"error": "token lacks the scope telemetry:read"}
    with anyio.fail_after(15):
        async with secure_site(redis_url, secret, caplog, auth={"read_scope": "telemetry:read"}) as s:
            for scope in (None, "stream:read", "telemetry:write openid"):
                token = hs256(secret, claims(scope=scope))
                s.secrets.append(token)
                attempts = [("GET", STREAM), ("GET", LATEST), ("GET", WELLS), ("POST", TICKETS), ("POST", SESSION)]
                for method, path in attempts:
                    response = await s.request(method, path, headers=bearer(token), json=ticket_body(method))
                    assert response.status_code == 403, (scope, path, response.text)
                    assert response.json() == lacks
                    assert "set-cookie" not in response.headers
                    s.assert_audited("auth-failure", status=403, reason=lacks["error"], path=path)
            assert not s.audits("connect")
            granted = hs256(secret, claims(scope="openid telemetry:read"))
            s.secrets.append(granted)
            assert (await s.get(LATEST, headers=bearer(granted))).status_code == 200


async def test_read_scope_null_reads_with_any_scope(
    redis_url: str, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(15):
        async with secure_site(redis_url, secret, caplog, auth={"read_scope": None}) as s:
            token = hs256(secret, claims(scope=None))
            s.secrets.append(token)
            response = await s.get(LATEST, headers=bearer(token))
            assert response.status_code == 200
            assert values(response.json()) == [OWN_VALUE]


async def test_a_well_of_another_tenant_or_unregistered_is_the_same_404(
    redis_url: str, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(15):
        async with secure_site(redis_url, secret, caplog) as s:
            token = s.token(secret)
            assert await s.publisher.registry.has_well("globex", OTHER_ONLY_WELL)
            for well in ("w404", OTHER_ONLY_WELL):
                for kind in ("latest", "stream"):
                    response = await s.get(f"/tenants/acme/wells/{well}/{kind}", headers=bearer(token))
                    assert response.status_code == 404, (well, kind)
                    assert response.json() == UNKNOWN_WELL, "no way to tell another tenant's well from none"
                response = await s.request("POST", TICKETS, headers=bearer(token), json={"wells": [well]})
                assert response.status_code == 404
                assert response.json() == UNKNOWN_WELL
            s.assert_audited("auth-failure", status=404, reason="unknown well", path="/tenants/acme/wells/w404/stream")
            listed = (await s.get(WELLS, headers=bearer(token))).json()["wells"]
            assert "w1" in listed
            assert OTHER_ONLY_WELL not in listed
            assert "w404" not in listed
            assert not await s.publisher.registry.has_well("acme", "w404"), "asking must not create the well"


async def test_a_well_outside_the_wells_claim_is_the_same_404(
    redis_url: str, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(15):
        async with secure_site(redis_url, secret, caplog) as s:
            token = s.token(secret, wells=["w1"])
            for kind in ("latest", "stream"):
                response = await s.get(f"/tenants/acme/wells/w2/{kind}", headers=bearer(token))
                assert response.status_code == 404
                assert response.json() == UNKNOWN_WELL
            for wells in (["w2"], ["w1", "w2"]):
                response = await s.request("POST", TICKETS, headers=bearer(token), json={"wells": wells})
                assert response.status_code == 404
                assert response.json() == UNKNOWN_WELL
            s.assert_audited("auth-failure", status=404, reason="unknown well", path="/tenants/acme/wells/w2/latest")
            allowed = await s.get(LATEST, headers=bearer(token))
            assert values(allowed.json()) == [OWN_VALUE]
            assert (await s.get(WELLS, headers=bearer(token))).json()["wells"] == ["w1"]


HOSTILE_PATHS = [
    ("GET", "/tenants/acme/wells/w*/stream"),
    ("GET", "/tenants/acme/wells/w%2A/stream"),
    ("GET", "/tenants/acme/wells/*/latest"),
    ("GET", "/tenants/acme/wells/w%3F/stream"),
    ("GET", "/tenants/acme/wells/w[1]/stream"),
    ("GET", "/tenants/acme/wells/w%5B1%5D/latest"),
    ("GET", "/tenants/acme/wells/w1:x/stream"),
    ("GET", "/tenants/acme/wells/w1%3Ax/latest"),
    ("GET", "/tenants/acme/wells/w1%2Fx/stream"),
    ("GET", "/tenants/acme/wells/w1%0D%0Aevent:%20reading/stream"),
    ("GET", "/tenants/acme/wells/w1%0A/stream"),
    ("GET", "/tenants/acme/wells/w1%0D/latest"),
    ("GET", "/tenants/ac*me/wells/w1/stream"),
    ("GET", "/tenants/*/wells/w1/latest"),
    ("GET", "/tenants/acme%3A*/wells/w1/stream"),
    ("GET", "/tenants/acme%0A/wells"),
    ("GET", "/tenants/%2A/wells"),
    ("POST", "/tenants/ac*me/stream-tickets"),
    ("POST", "/tenants/acme%0D%0A/stream-tickets"),
]


async def test_hostile_ids_in_the_path_get_4xx_never_500(
    redis_url: str, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(15):
        async with secure_site(redis_url, secret, caplog) as s:
            token = s.token(secret)
            for method, path in HOSTILE_PATHS:
                response = await s.request(method, path, headers=bearer(token), json=ticket_body(method))
                assert response.status_code in (400, 404), (path, response.status_code, response.text)
                if response.headers.get("content-type", "").startswith("application/json"):
                    assert response.json()["error"], path
                assert "event: reading" not in response.text
                assert (await s.get("/healthz")).status_code == 200, f"the process survives {path}"
            for wells in (["w*"], ["w1:x"], ["w1\r\n"], ["*"]):
                response = await s.request("POST", TICKETS, headers=bearer(token), json={"wells": wells})
                assert response.status_code == 400, wells
            assert not s.audits("connect"), "no hostile id opened a stream"


# --- stream tickets ---


async def test_a_ticket_opens_one_stream_once(redis_url: str, secret: str, caplog: pytest.LogCaptureFixture) -> None:
    with anyio.fail_after(15):
        async with secure_site(redis_url, secret, caplog) as s:
            token = s.token(secret)
            issued = await s.request("POST", TICKETS, headers=bearer(token), json={"wells": ["w1"]})
            assert issued.status_code == 200
            assert issued.headers["cache-control"] == "no-store"
            assert issued.json()["expiresIn"] == 60
            ticket = issued.json()["ticket"]
            s.bodies.pop()
            s.secrets.append(ticket)
            s.assert_audited("ticket-issued", sub="tester", tenant="acme", wells=["w1"])
            async with s.stream(STREAM, params={"ticket": ticket}) as (response, events):
                assert response.status_code == 200
                snapshot = await events.next_event("snapshot")
                assert snapshot.json()["tenantId"] == "acme"
                assert values(snapshot.json()) == [OWN_VALUE]
                await s.leak_then_own(events)
            s.assert_audited("connect", sub="tester", tenant="acme", well="w1")
            replay = await s.get(STREAM, params={"ticket": ticket})
            assert replay.status_code == 401
            assert replay.headers["www-authenticate"] == WWW_AUTHENTICATE
            assert replay.json() == {"error": "invalid, expired or already used ticket"}
            s.assert_audited("auth-failure", status=401, reason="invalid, expired or already used ticket", path=STREAM)


async def test_an_expired_ticket_is_refused(redis_url: str, secret: str, caplog: pytest.LogCaptureFixture) -> None:
    with anyio.fail_after(15):
        async with secure_site(redis_url, secret, caplog, auth=dict(ticket_ttl_s=5)) as s:
            token = s.token(secret)
            issued = await s.request("POST", TICKETS, headers=bearer(token), json={"wells": ["w1"]})
            assert issued.json()["expiresIn"] == 5
            ticket = issued.json()["ticket"]
            s.bodies.pop()
            s.secrets.append(ticket)
            await anyio.sleep(5.1)  # the shortest TTL AuthSettings allows, and a little
            response = await s.get(STREAM, params={"ticket": ticket})
            assert response.status_code == 401
            assert response.json() == {"error": "invalid, expired or already used ticket"}
            s.assert_audited("auth-failure", status=401, reason="invalid, expired or already used ticket", path=STREAM)


async def test_a_ticket_is_bound_to_its_wells_its_tenant_and_streams(
    redis_url: str, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(15):
        async with secure_site(redis_url, secret, caplog) as s:
            token = s.token(secret)
            another_well = await s.get(
                "/tenants/acme/wells/w2/stream", params={"ticket": await s.ticket(token, ["w1"])}
            )
            assert another_well.status_code == 404
            assert another_well.json() == UNKNOWN_WELL
            other_tenant = await s.get(
                "/tenants/globex/wells/w1/stream", params={"ticket": await s.ticket(token, ["w1"])}
            )
            assert other_tenant.status_code == 403
            assert other_tenant.json() == ANOTHER_TENANT
            not_a_stream = await s.get(LATEST, params={"ticket": await s.ticket(token, ["w1"])})
            assert not_a_stream.status_code == 401, "tickets open streams, nothing else"
            assert not_a_stream.json() == {"error": MISSING}
            for ticket, reason in (
                ("x" * 129, "invalid ticket"),
                ("not-a-ticket", "invalid, expired or already used ticket"),
            ):
                response = await s.get(STREAM, params={"ticket": ticket})
                assert response.status_code == 401
                assert response.json() == {"error": reason}
            assert not s.audits("connect")


async def test_ticket_requests_are_validated(redis_url: str, secret: str, caplog: pytest.LogCaptureFixture) -> None:
    with anyio.fail_after(15):
        async with secure_site(redis_url, secret, caplog) as s:
            token = s.token(secret, wells=["w1"])
            for wells in (["w2"], ["w404"], [OTHER_ONLY_WELL]):
                response = await s.request("POST", TICKETS, headers=bearer(token), json={"wells": wells})
                assert response.status_code == 404, wells
                assert response.json() == UNKNOWN_WELL
            bad_bodies: list[dict[str, Any]] = [
                {"content": b"not json"},
                {"content": b""},
                {"json": ["w1"]},
                {"json": {}},
                {"json": {"wells": "w1"}},
                {"json": {"wells": [1]}},
                {"json": {"wells": ["w1", None]}},
            ]
            for body in bad_bodies:
                response = await s.request("POST", TICKETS, headers=bearer(token), **body)
                assert response.status_code == 400, body
                assert response.json()["error"]
            empty = await s.request("POST", TICKETS, headers=bearer(token), json={"wells": []})
            assert empty.status_code == 400
            assert empty.json() == {"error": "ask for 1 to 2000 wells"}
            every = await s.request("POST", TICKETS, headers=bearer(token), json={"wells": None})
            assert every.status_code == 200, "null: every well the token may see, for a stream of many wells"
            huge = await s.request("POST", TICKETS, headers=bearer(token), content=b" " * 20_000)
            assert huge.status_code == 413
            assert (await s.request("POST", TICKETS, json={"wells": ["w1"]})).status_code == 401


# --- transport: oversized headers, session cookie, query tokens, CORS ---


async def test_oversized_authorization_headers_get_4xx_and_the_process_lives(
    redis_url: str, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(15):
        async with secure_site(redis_url, secret, caplog) as s:
            just_over = "Bearer " + "a" * (10 * 1024)  # under the server's header limit: the app refuses it
            response = await s.get(LATEST, headers={"Authorization": just_over})
            assert response.status_code == 401
            assert response.json() == {"error": "token too large"}
            for path, size in ((STREAM, 20_000), (LATEST, 20_000), (STREAM, 100_000), (LATEST, 100_000)):
                huge = {"Authorization": "Bearer " + "a" * size}
                try:
                    response = await s.get(path, headers=huge)
                except httpx.RemoteProtocolError:
                    pass  # the server may also just close the connection
                else:
                    assert response.status_code in (400, 401, 413, 431), response.status_code
                assert (await s.get("/healthz")).status_code == 200
            assert (await s.get(LATEST, headers=bearer(s.token(secret)))).status_code == 200


async def test_a_session_cookie_authorizes_streams_until_it_is_cleared(
    redis_url: str, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(15):
        async with secure_site(redis_url, secret, caplog) as s:
            token = s.token(secret)
            refused = await s.request("POST", SESSION, headers=bearer(hs256(secrets.token_urlsafe(32), claims())))
            assert refused.status_code == 401
            assert "set-cookie" not in refused.headers
            no_bearer = await s.request("POST", SESSION, headers={"Authorization": f"Basic {token}"})
            assert no_bearer.status_code == 401
            assert "set-cookie" not in no_bearer.headers

            opened = await s.request("POST", SESSION, headers=bearer(token))
            assert opened.status_code == 200
            assert opened.json()["tenantId"] == "acme"
            assert opened.headers["cache-control"] == "no-store"
            cookie = opened.headers["set-cookie"]
            attributes = [part.strip().lower() for part in cookie.split(";")]
            session_id = cookie.partition(";")[0].removeprefix("wellstream_session=")
            assert re.fullmatch(r"[A-Za-z0-9_-]{43}", session_id), "an opaque random id, never the token"
            assert token not in cookie
            assert "httponly" in attributes
            assert "samesite=strict" in attributes
            assert "path=/" in attributes
            assert "secure" not in attributes, "plain http on loopback"
            s.assert_audited("session-opened", sub="tester", tenant="acme")
            assert s.client.cookies.get("wellstream_session") == session_id
            s.secrets.append(session_id)

            async with s.stream(STREAM) as (response, events):  # no Authorization header: the cookie
                assert response.status_code == 200
                assert values((await events.next_event("snapshot")).json()) == [OWN_VALUE]
                await s.leak_then_own(events)
            assert (await s.get(LATEST)).status_code == 200
            on_other_tenant = await s.get("/tenants/globex/wells/w1/latest")
            assert on_other_tenant.status_code == 403

            closed = await s.request("DELETE", SESSION)
            assert closed.status_code == 204
            cleared = closed.headers["set-cookie"].lower()
            assert cleared.startswith('wellstream_session="";') or cleared.startswith("wellstream_session=;")
            assert "max-age=0" in cleared
            assert "wellstream_session" not in s.client.cookies
            after = await s.get(STREAM)
            assert after.status_code == 401
            assert after.json() == {"error": MISSING}


@pytest.mark.parametrize("allowed", [False, True], ids=["default", "allow_query_token"])
async def test_access_token_query_parameter_only_when_allowed(
    redis_url: str, secret: str, caplog: pytest.LogCaptureFixture, allowed: bool
) -> None:
    with anyio.fail_after(15):
        async with secure_site(redis_url, secret, caplog, auth=dict(allow_query_token=allowed)) as s:
            params = {"access_token": s.token(secret)}
            if not allowed:
                for path in (STREAM, LATEST):
                    response = await s.get(path, params=params)
                    assert response.status_code == 401
                    assert response.json() == {"error": MISSING}
                    s.assert_audited("auth-failure", status=401, reason=MISSING, path=path)
                return
            assert values((await s.get(LATEST, params=params)).json()) == [OWN_VALUE]
            async with s.stream(STREAM, params=params) as (response, events):
                assert response.status_code == 200
                assert values((await events.next_event("snapshot")).json()) == [OWN_VALUE]
                await s.leak_then_own(events)


async def test_cors_allows_only_configured_origins_on_every_route(
    redis_url: str, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    dash, evil = "https://dash.example", "https://evil.example"
    with anyio.fail_after(15):
        async with secure_site(redis_url, secret, caplog, auth=dict(cors_origins=[dash])) as s:
            token = s.token(secret)
            latest = await s.get(LATEST, headers={**bearer(token), "Origin": dash})
            assert latest.status_code == 200
            assert latest.headers["access-control-allow-origin"] == dash
            assert latest.headers["access-control-allow-credentials"] == "true"
            async with s.stream(STREAM, headers={**bearer(token), "Origin": dash}) as (response, events):
                assert response.status_code == 200
                assert response.headers["access-control-allow-origin"] == dash
                assert response.headers["access-control-allow-credentials"] == "true"
                await events.next_event("snapshot")
            refused = await s.get(STREAM, headers={"Origin": dash})
            assert refused.status_code == 401
            assert refused.headers["access-control-allow-origin"] == dash, "the dashboard may read the reason"
            preflight = await s.request(
                "OPTIONS",
                STREAM,
                headers={
                    "Origin": dash,
                    "Access-Control-Request-Method": "GET",
                    "Access-Control-Request-Headers": "authorization, last-event-id",
                },
            )
            assert preflight.status_code == 200
            assert preflight.headers["access-control-allow-origin"] == dash

            elsewhere = await s.get(LATEST, headers={**bearer(token), "Origin": evil})
            assert "access-control-allow-origin" not in elsewhere.headers
            async with s.stream(STREAM, headers={**bearer(token), "Origin": evil}) as (response, events):
                assert response.status_code == 200
                assert "access-control-allow-origin" not in response.headers
                await events.next_event("snapshot")
            evil_preflight = await s.request(
                "OPTIONS", STREAM, headers={"Origin": evil, "Access-Control-Request-Method": "GET"}
            )
            assert evil_preflight.status_code == 400
            assert "access-control-allow-origin" not in evil_preflight.headers


# --- limits: tripped and released ---


@pytest.mark.parametrize("scope", ["subject", "tenant"])
async def test_concurrent_stream_limits_trip_with_429_and_release(
    redis_url: str, secret: str, caplog: pytest.LogCaptureFixture, scope: str
) -> None:
    limits = {f"streams_per_{scope}": 2}
    reason = f"too many open streams for this {scope}"
    with anyio.fail_after(15):
        async with secure_site(redis_url, secret, caplog, auth={"limits": limits}) as s:
            # One subject for the subject limit; a subject each for the tenant limit.
            subjects = ["alice"] * 4 if scope == "subject" else ["alice", "bob", "carol", "dave"]
            tokens = [s.token(secret, subject) for subject in subjects]
            limits_state = s.gateway.running.limits
            async with contextlib.AsyncExitStack() as stack:
                opened = []
                for token in tokens[:2]:
                    response, events = await stack.enter_async_context(s.stream(STREAM, headers=bearer(token)))
                    assert response.status_code == 200
                    await events.next_event("snapshot")
                    opened.append(response)
                third = await s.get(STREAM, headers=bearer(tokens[2]))
                assert third.status_code == 429
                assert third.headers["retry-after"].isdigit()
                assert third.json() == {"error": reason}
                s.assert_audited("limit", status=429, reason=reason, path=STREAM)

                await opened[0].aclose()
                await wait_until(lambda: s.gateway.hub.open_streams == 1 and limits_state.open == 1)
                async with s.stream(STREAM, headers=bearer(tokens[3])) as (response, events):
                    assert response.status_code == 200, "a closed stream gives its place back"
                    await events.next_event("snapshot")
                    await s.leak_then_own(events)


async def test_a_full_process_answers_503_with_retry_after(
    redis_url: str, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    limits = {"streams_per_process": 1}
    with anyio.fail_after(15):
        async with secure_site(redis_url, secret, caplog, auth={"limits": limits}) as s:
            alice, bob = s.token(secret, "alice"), s.token(secret, "bob")
            async with s.stream(STREAM, headers=bearer(alice)) as (response, events):
                assert response.status_code == 200
                await events.next_event("snapshot")
                full = await s.get("/tenants/acme/wells/w2/stream", headers=bearer(bob))
                assert full.status_code == 503
                assert full.headers["retry-after"].isdigit()
                assert full.json() == {"error": "this gateway is full"}
                s.assert_audited("limit", status=503, reason="this gateway is full")
            await wait_until(lambda: s.gateway.hub.open_streams == 0 and s.gateway.running.limits.open == 0)
            async with s.stream(STREAM, headers=bearer(bob)) as (response, events):
                assert response.status_code == 200
                await events.next_event("snapshot")


async def test_rapid_connection_attempts_are_throttled_before_auth(
    redis_url: str, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    limits = {"connect_burst": 3, "connects_per_s": 0.01}
    with anyio.fail_after(15):
        async with secure_site(redis_url, secret, caplog, auth={"limits": limits}) as s:
            for _ in range(3):
                response = await s.get(STREAM, headers=bearer("not.a.token"))
                assert response.status_code == 401
            throttled = await s.get(STREAM, headers=bearer(s.token(secret)))
            assert throttled.status_code == 429, "even a good token waits once the address is over its burst"
            assert int(throttled.headers["retry-after"]) >= 1
            assert throttled.json() == {"error": "too many connection attempts from this address"}
            s.assert_audited("limit", status=429, reason="too many connection attempts from this address", path=STREAM)
            assert not s.audits("connect")


# --- a token that expires while its stream is open ---


async def test_a_stream_ends_with_auth_expired_when_its_token_expires(
    redis_url: str, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(15):
        async with secure_site(redis_url, secret, caplog) as s:
            token = s.token(secret, ttl_s=2)
            async with s.stream(STREAM, headers=bearer(token)) as (response, events):
                assert response.status_code == 200
                await events.next_event("snapshot")
                await s.leak_then_own(events)
                expired = await events.next_event("auth-expired")  # exp is 2 s away; the sweeper runs every second
                rest = await events.collect()
                assert expired.json() == {"tenantId": "acme", "wellId": "w1", "reason": "token expired"}
                assert not [event for event in rest if event.data], "nothing after auth-expired"
            await wait_until(lambda: bool(s.audits("disconnect")))
            s.assert_audited("disconnect", sub="tester", tenant="acme", well="w1", reason="auth-expired")


async def test_a_ticket_does_not_outlive_its_token(
    redis_url: str, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A ticket is "bound to the caller and its token's expiry" (guard.issue_ticket): once the token that got it
    is refused as expired, the ticket must be refused too, not open a stream that replays history."""
    with anyio.fail_after(15):
        async with secure_site(redis_url, secret, caplog, auth=dict(leeway_s=0)) as s:
            expires_at = int(time.time()) + 2
            token = hs256(secret, claims(exp=expires_at))
            s.secrets.append(token)
            ticket = await s.ticket(token, ["w1"])
            await wait_until(lambda: time.time() >= expires_at + 0.05)
            expired = await s.get(LATEST, headers=bearer(token))
            assert expired.status_code == 401
            assert expired.json() == {"error": "token expired"}
            async with s.stream(STREAM, params={"ticket": ticket, "lastEventId": "0-0"}) as (response, events):
                late = [event for event in await events.collect() if event.data]
                assert response.status_code == 401, f"the ticket outlived its token and streamed {late}"
                assert response.headers["www-authenticate"] == WWW_AUTHENTICATE
                assert response.json()["error"]
            s.assert_audited("auth-failure", status=401, path=STREAM)
            assert not s.audits("connect")


async def test_the_per_address_limit_sees_through_trusted_proxies_only(redis_url: str, secret: str, token) -> None:
    limits = {"connects_per_s": 0.001, "connect_burst": 2, "streams_per_subject": 100}
    auth = {"limits": limits, "trusted_proxies": ["127.0.0.1"]}
    with anyio.fail_after(15):
        async with running_gateway(make_settings(secret, redis_url=redis_url, auth=auth)) as gateway:
            url = gateway.url + "/tenants/acme/wells/w404/stream"  # a 404 after the attempt is counted
            async with httpx.AsyncClient(timeout=5) as client:
                statuses = []
                for client_ip in ("10.0.0.1", "10.0.0.1", "10.0.0.1", "10.0.0.2"):
                    headers = {"Authorization": f"Bearer {token('acme')}", "X-Forwarded-For": client_ip}
                    statuses.append((await client.get(url, headers=headers)).status_code)
            assert statuses == [404, 404, 429, 404], "each client behind the proxy has its own bucket"


async def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(redis_url: str, secret: str, token) -> None:
    auth = {"limits": {"connects_per_s": 0.001, "connect_burst": 2, "streams_per_subject": 100}}
    with anyio.fail_after(15):
        async with running_gateway(make_settings(secret, redis_url=redis_url, auth=auth)) as gateway:
            url = gateway.url + "/tenants/acme/wells/w404/stream"
            async with httpx.AsyncClient(timeout=5) as client:
                statuses = []
                for client_ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
                    headers = {"Authorization": f"Bearer {token('acme')}", "X-Forwarded-For": client_ip}
                    statuses.append((await client.get(url, headers=headers)).status_code)
            assert statuses == [404, 404, 429], "a forged header does not buy a fresh bucket"
