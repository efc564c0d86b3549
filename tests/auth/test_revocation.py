"""Sessions and tokens end everywhere: two real gateways on one Redis. A cookie deleted on one is
refused on the other and its live streams there end with `event: auth-expired`; a token revoked
by `jti` (with `wellstream revoke`, as an operator would) or with all of its subject's tokens
issued before a time is refused on every route and its streams end too."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import OctKey

from app.streams.redis import connect_redis
from tests.conftest import ROOT, RunningGateway, clean_env, make_settings, running_gateway
from tests.factories import make_reading
from tests.sse_client import SSEReader

pytestmark = pytest.mark.anyio

STREAM = "/tenants/acme/wells/w1/stream"
LATEST = "/tenants/acme/wells/w1/latest"
SESSION = "/auth/session"


def token(secret: str, subject: str = "op-1", **claims: Any) -> str:
    now = int(time.time())
    body = {"sub": subject, "tenant_id": "acme", "scope": "stream:read", "iat": now, "exp": now + 600, **claims}
    return jwt.encode({"alg": "HS256"}, body, OctKey.import_key(secret), algorithms=["HS256"])


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


@contextlib.asynccontextmanager
async def two_gateways(redis_url: str, secret: str) -> AsyncIterator[tuple[RunningGateway, RunningGateway]]:
    settings = make_settings(secret, redis_url=redis_url)
    async with connect_redis(redis_url) as publisher:
        await publisher.log.publish([make_reading(1.0)])
        async with running_gateway(settings) as first, running_gateway(settings) as second:
            yield first, second


@contextlib.asynccontextmanager
async def live(client: httpx.AsyncClient, url: str, **kwargs: Any) -> AsyncIterator[SSEReader]:
    async with client.stream("GET", url, **kwargs) as response:
        assert response.status_code == 200
        events = SSEReader(response)
        await events.next_event("snapshot")
        yield events


def run_revoke(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "app", "revoke", "--tenant", "acme", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=False)


def revoke(redis_url: str, *args: str) -> str:
    result = run_revoke(clean_env(WELLSTREAM_REDIS_URL=redis_url), *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


async def test_a_session_deleted_on_one_gateway_is_refused_and_its_streams_end_on_the_other(
    redis_url: str, secret: str
) -> None:
    with anyio.fail_after(30):
        async with (
            two_gateways(redis_url, secret) as (first, second),
            httpx.AsyncClient(timeout=10) as on_first,
            httpx.AsyncClient(timeout=10) as on_second,
        ):
            opened = await on_first.post(first.url + SESSION, headers=bearer(token(secret)))
            assert opened.status_code == 200
            cookie = opened.cookies["wellstream_session"]
            on_second.cookies.set("wellstream_session", cookie)
            assert (await on_second.get(second.url + LATEST)).status_code == 200, "one session, every gateway"

            async with live(on_second, second.url + STREAM) as events:
                assert (await on_first.delete(first.url + SESSION)).status_code == 204
                ended = await events.next_event("auth-expired")  # within the watcher's poll, bounded above
                assert ended.event == "auth-expired"
            refused = await on_second.get(second.url + LATEST)
            assert refused.status_code == 401
            assert refused.json() == {"error": "session ended or expired: sign in again"}
            assert second.running.revocations.ended == 1


async def test_a_token_revoked_by_jti_is_refused_everywhere_and_its_streams_end(redis_url: str, secret: str) -> None:
    revoked, kept = token(secret, jti="t-revoked"), token(secret, jti="t-kept")
    with anyio.fail_after(30):
        async with two_gateways(redis_url, secret) as (first, second), httpx.AsyncClient(timeout=10) as client:
            async with (
                live(client, first.url + STREAM, headers=bearer(revoked)) as doomed,
                live(client, second.url + STREAM, headers=bearer(kept)) as spared,
            ):
                printed = revoke(redis_url, "--jti", "t-revoked")
                assert "revoked token 't-revoked' of tenant acme" in printed
                assert (await doomed.next_event("auth-expired")).event == "auth-expired"
                for gateway in (first, second):
                    refused = await client.get(gateway.url + LATEST, headers=bearer(revoked))
                    assert refused.status_code == 401
                    assert refused.json() == {"error": "token revoked"}
                    assert (await client.get(gateway.url + LATEST, headers=bearer(kept))).status_code == 200
                    ticket = await client.post(
                        gateway.url + "/tenants/acme/stream-tickets", json={"wells": ["w1"]}, headers=bearer(revoked)
                    )
                    assert ticket.status_code == 401
                assert second.running.revocations.ended == 0, "the other token's stream goes on"
                async with connect_redis(redis_url) as publisher:
                    [stream_id] = await publisher.log.publish([make_reading(2.0)])
                assert (await spared.next_event("reading")).id == str(stream_id)


async def test_a_subject_s_tokens_issued_before_a_time_are_revoked_and_later_ones_are_not(
    redis_url: str, secret: str
) -> None:
    now = int(time.time())
    old, new = token(secret, iat=now - 120), token(secret, iat=now)
    other = token(secret, subject="op-2", iat=now - 120)
    cut_off = datetime.fromtimestamp(now - 60, UTC).isoformat()
    with anyio.fail_after(30):
        async with two_gateways(redis_url, secret) as (first, _), httpx.AsyncClient(timeout=10) as client:
            async with live(client, first.url + STREAM, headers=bearer(old)) as doomed:
                revoke(redis_url, "--subject", "op-1", "--before", cut_off)
                assert (await doomed.next_event("auth-expired")).event == "auth-expired"
            assert (await client.get(first.url + LATEST, headers=bearer(old))).status_code == 401
            assert (await client.get(first.url + LATEST, headers=bearer(new))).status_code == 200
            assert (await client.get(first.url + LATEST, headers=bearer(other))).status_code == 200


def test_revoke_needs_redis_and_one_of_jti_or_subject() -> None:
    without_redis = run_revoke(clean_env(), "--jti", "x")
    assert without_redis.returncode != 0
    assert "WELLSTREAM_REDIS_URL" in without_redis.stderr
    neither = run_revoke(clean_env())
    assert neither.returncode == 2
    assert "one of the arguments --jti --subject is required" in neither.stderr
