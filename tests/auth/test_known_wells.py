"""The guard asks Redis whether a well is registered once per KNOWN_WELL_S, not at every open, and
never keeps a "no": a real gateway on loopback, a real Redis, its command counts."""

from __future__ import annotations

import anyio
import httpx
import pytest
import redis

from app.streams.redis.keys import wells_key
from tests.conftest import make_settings, running_gateway

pytestmark = pytest.mark.anyio


def sismember_calls(admin: redis.Redis) -> int:
    stats = admin.info("commandstats")
    return int(stats.get("cmdstat_sismember", {}).get("calls", 0))


async def test_a_registered_well_is_asked_about_once_and_a_new_one_is_found_at_once(
    redis_url: str, secret: str, token
) -> None:
    headers = {"Authorization": f"Bearer {token('acme')}"}
    with anyio.fail_after(30), redis.Redis.from_url(redis_url) as admin:
        async with (
            running_gateway(make_settings(secret, redis_url=redis_url)) as gateway,
            httpx.AsyncClient() as client,
        ):
            admin.config_resetstat()
            for _ in range(20):  # HEAD: the stream's checks without a stream
                answer = await client.head(f"{gateway.url}/tenants/acme/wells/w1/stream", headers=headers)
                assert answer.status_code == 200
            assert sismember_calls(admin) == 1

            new = f"{gateway.url}/tenants/acme/wells/w-new/stream"
            assert (await client.head(new, headers=headers)).status_code == 404
            admin.sadd(wells_key("acme"), "w-new")  # as an ingest worker registers it
            assert (await client.head(new, headers=headers)).status_code == 200, "a 'no' is never kept"
