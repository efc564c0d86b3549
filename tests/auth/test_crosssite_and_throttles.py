"""A real gateway against a browser-borne attacker and a guesser: cookie-authenticated POSTs need
our Origin and JSON, the cookie is Secure behind a trusted TLS proxy, tickets and sessions are
rate limited per address and per subject, and failed authentication on any route is throttled."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import pytest

from app.auth.tokens import mint_token
from tests.conftest import RunningGateway, make_settings, running_gateway

pytestmark = pytest.mark.anyio

TICKETS = "/tenants/acme/stream-tickets"
SESSION = "/auth/session"
WELLS = "/tenants/acme/wells"
DASHBOARD = "https://dashboard.example"


@contextlib.asynccontextmanager
async def gateway_and_client(
    redis_url: str, secret: str, **auth: Any
) -> AsyncIterator[tuple[RunningGateway, httpx.AsyncClient]]:
    settings = make_settings(secret, redis_url=redis_url, auth=auth)
    async with running_gateway(settings) as gateway, httpx.AsyncClient(base_url=gateway.url, timeout=5) as client:
        yield gateway, client


async def open_cookie_session(client: httpx.AsyncClient, token: str) -> None:
    response = await client.post(SESSION, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    assert client.cookies.get("wellstream_session")


async def test_a_cookie_post_needs_our_origin_and_json(redis_url: str, secret: str, token: Callable[..., str]) -> None:
    with anyio.fail_after(20):
        async with gateway_and_client(redis_url, secret, cors_origins=[DASHBOARD]) as (gateway, client):
            await open_cookie_session(client, token("acme"))
            own = gateway.url  # http://127.0.0.1:port: the page this gateway serves
            body = '{"wells": ["w1"]}'
            refused = [
                ({"Content-Type": "application/json"}, "a cookie session needs an Origin header"),
                ({"Origin": "null", "Content-Type": "application/json"}, "a cookie session needs an Origin header"),
                ({"Origin": "https://evil.example", "Content-Type": "application/json"}, "Origin is not allowed"),
                ({"Origin": "http://127.0.0.1.evil.example", "Content-Type": "application/json"}, "not allowed"),
                ({"Origin": own, "Content-Type": "text/plain"}, "send Content-Type: application/json"),
                ({"Origin": own, "Content-Type": "application/x-www-form-urlencoded"}, "application/json"),
                ({"Origin": own}, "send Content-Type: application/json"),
            ]
            for headers, reason in refused:
                response = await client.post(TICKETS, content=body, headers=headers)
                assert response.status_code == 403, (headers, response.text)
                assert reason in response.json()["error"]
                assert "ticket" not in response.json()
            for origin in (own, DASHBOARD, "https://127.0.0.1:9"):  # scheme and port are not compared
                headers = {"Origin": origin, "Content-Type": "application/json; charset=utf-8"}
                response = await client.post(TICKETS, content=body, headers=headers)
                assert response.status_code == 200, (origin, response.text)
            # A cookie GET is not state-changing: no Origin needed (EventSource sends none).
            assert (await client.get(WELLS)).status_code == 200
            # A Bearer token is never sent by a browser on its own: no Origin check.
            client.cookies.clear()
            bearer = {"Authorization": f"Bearer {token('acme')}", "Origin": "https://evil.example"}
            response = await client.post(TICKETS, json={"wells": ["w1"]}, headers=bearer)
            assert response.status_code == 200


@pytest.mark.parametrize(
    ("trusted", "forwarded", "secure"),
    [
        (True, "https", True),
        (True, "http", False),
        (False, "https", False),  # anyone may write the header; only a trusted proxy is believed
        (True, None, False),
    ],
)
async def test_the_cookie_is_secure_when_a_trusted_proxy_says_https(
    redis_url: str, secret: str, token: Callable[..., str], trusted: bool, forwarded: str | None, secure: bool
) -> None:
    with anyio.fail_after(20):
        proxies = ["127.0.0.1"] if trusted else []
        async with gateway_and_client(redis_url, secret, trusted_proxies=proxies) as (_, client):
            headers = {"Authorization": f"Bearer {token('acme')}"}
            if forwarded is not None:
                headers["X-Forwarded-Proto"] = forwarded
            response = await client.post(SESSION, headers=headers)
            assert response.status_code == 200
            attributes = [part.strip().lower() for part in response.headers["set-cookie"].split(";")]
            assert ("secure" in attributes) is secure


async def test_tickets_and_sessions_are_rate_limited_per_subject_and_per_address(
    redis_url: str, secret: str, token: Callable[..., str]
) -> None:
    limits = {"connects_per_s": 0.001, "connect_burst": 3}
    with anyio.fail_after(20):
        async with gateway_and_client(redis_url, secret, limits=limits, trusted_proxies=["127.0.0.1"]) as (_, client):

            async def ticket(address: str, subject_token: str) -> httpx.Response:
                headers = {"Authorization": f"Bearer {subject_token}", "X-Forwarded-For": address}
                return await client.post(TICKETS, json={"wells": ["w1"]}, headers=headers)

            alice = token("acme")
            # Per subject: one subject from three addresses, one request each beyond the first.
            statuses = [(await ticket(f"10.0.0.{n}", alice)).status_code for n in (1, 2, 3, 4)]
            assert statuses == [200, 200, 200, 429]
            # Per address: many subjects (fresh tokens, fresh buckets) from one address.
            statuses = [
                (await ticket("10.0.1.1", mint_token(secret, "acme", f"user-{n}"))).status_code for n in range(4)
            ]
            assert statuses == [200, 200, 200, 429]
            over = await ticket("10.0.1.1", mint_token(secret, "acme", "user-9"))
            assert over.headers["retry-after"]
            assert over.json() == {"error": "too many connection attempts from this address"}
            # Sessions take from the same buckets.
            headers = {"Authorization": f"Bearer {alice}", "X-Forwarded-For": "10.0.2.1"}
            assert (await client.post(SESSION, headers=headers)).status_code == 429


async def test_failed_authentication_on_any_route_is_throttled_per_address(
    redis_url: str, secret: str, token: Callable[..., str]
) -> None:
    limits = {"auth_failures_per_s": 0.001, "auth_failure_burst": 3}
    with anyio.fail_after(20):
        async with gateway_and_client(redis_url, secret, limits=limits, trusted_proxies=["127.0.0.1"]) as (_, client):
            guesser = {"X-Forwarded-For": "10.9.9.9"}
            for path in (WELLS, "/tenants/acme/wells/w1/latest", WELLS):
                bad = {**guesser, "Authorization": f"Bearer not-a-token-{secrets.token_hex(4)}"}
                assert (await client.get(path, headers=bad)).status_code == 401
            good = {"Authorization": f"Bearer {token('acme')}"}
            blocked = await client.get(WELLS, headers={**guesser, **good})
            assert blocked.status_code == 429, "past the burst even a good token waits: nothing is verified"
            assert blocked.json() == {"error": "too many failed authentications from this address"}
            assert int(blocked.headers["retry-after"]) >= 1
            ticket = await client.post(TICKETS, json={"wells": ["w1"]}, headers={**guesser, **good})
            assert ticket.status_code == 429
            other = await client.get(WELLS, headers={"X-Forwarded-For": "10.9.9.10", **good})
            assert other.status_code == 200, "another address is not affected"
