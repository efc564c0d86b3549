"""/metrics through a scripted session: parsed with Prometheus's own text parser, counters checked as they move."""

from __future__ import annotations

import anyio
import httpx
import pytest

from app.settings import HistorySettings
from app.streams.redis import connect_redis
from tests.conftest import RedisServer, make_settings, running_gateway, wait_for_status, wait_until
from tests.factories import make_reading
from tests.prometheus import Samples, parse_samples, value
from tests.sse_client import SSEReader

pytestmark = pytest.mark.anyio


async def scrape(client: httpx.AsyncClient, base: str) -> Samples:
    response = await client.get(base + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse_samples(response.text)


async def test_counters_follow_a_scripted_session(own_redis: RedisServer, secret: str, token) -> None:
    settings = make_settings(
        secret,
        redis_url=own_redis.url,
        history=HistorySettings(max_len=10),
        redis={"ping_interval_s": 0.2, "timeout_s": 1},
    )
    acme = {"Authorization": f"Bearer {token('acme')}"}
    globex = {"Authorization": f"Bearer {token('globex')}"}
    with anyio.fail_after(60):
        async with (
            running_gateway(settings) as gateway,
            connect_redis(own_redis.url, max_len=10) as publisher,
            httpx.AsyncClient(timeout=10) as client,
        ):
            base = gateway.url
            before = await scrape(client, base)
            assert value(before, "wellstream_live") == 1
            path = "/tenants/{}/wells/w1/stream"
            async with (
                client.stream("GET", base + path.format("acme"), headers=acme) as one,
                client.stream("GET", base + path.format("acme"), headers=acme) as two,
                client.stream("GET", base + path.format("globex"), headers=globex) as three,
            ):
                readers = [SSEReader(one), SSEReader(two), SSEReader(three)]
                for reader in readers:
                    await reader.next_event("snapshot")
                during = await scrape(client, base)
                assert value(during, "wellstream_open_streams", tenant="acme") == 2
                assert value(during, "wellstream_open_streams", tenant="globex") == 1
                assert value(during, "wellstream_hub_subscriptions") == 2
                assert value(during, "wellstream_snapshots_total") - value(before, "wellstream_snapshots_total") == 3

                ids = await publisher.log.publish([make_reading(float(n)) for n in range(5)])
                for reader in readers[:2]:
                    for _ in range(5):
                        await reader.next_event("reading")
                after = await scrape(client, base)
                assert (
                    value(after, "wellstream_events_sent_total") - value(during, "wellstream_events_sent_total") == 10
                )
                assert value(after, "wellstream_bytes_sent_total") > value(during, "wellstream_bytes_sent_total")
                sent = value(after, "wellstream_delivery_latency_seconds_count")
                assert sent > value(during, "wellstream_delivery_latency_seconds_count")
                # The factory's readings carry an old device time: they land in the +Inf bucket.
                assert value(after, "wellstream_delivery_latency_seconds_bucket", le="+Inf") == sent

            # A resume within history, one from before it (history keeps about 10), one bad token.
            async with client.stream(
                "GET", base + path.format("acme"), headers={**acme, "Last-Event-ID": str(ids[2])}
            ) as r:
                await SSEReader(r).next_event("reading")
            await publisher.log.publish([make_reading(float(n)) for n in range(400)])  # MAXLEN ~ trims whole nodes
            async with client.stream(
                "GET", base + path.format("acme"), headers={**acme, "Last-Event-ID": str(ids[0])}
            ) as r:
                await SSEReader(r).next_event("reset")
            bad = await client.get(base + path.format("acme"), headers={"Authorization": "Bearer nope"})
            assert bad.status_code == 401
            await wait_until(lambda: gateway.hub.open_streams == 0)
            later = await scrape(client, base)
            assert value(later, "wellstream_replays_total") - value(before, "wellstream_replays_total") == 2
            assert value(later, "wellstream_resets_total") - value(before, "wellstream_resets_total") == 1
            assert value(later, "wellstream_open_streams", tenant="acme") == 0
            closed = value(later, "wellstream_streams_closed_total", reason="client-closed")
            assert closed - value(before, "wellstream_streams_closed_total", reason="client-closed") == 5
            reason = bad.json()["error"]
            refused = ("wellstream_refusals_total", {"kind": "auth-failure", "reason": reason})
            assert value(later, refused[0], **refused[1]) - value(before, refused[0], **refused[1]) == 1
            assert value(later, "process_open_fds") > 0

            own_redis.kill()
            await wait_for_status(base + "/readyz", status=503)
            assert value(await scrape(client, base), "wellstream_live") == 0
            own_redis.start()
            await wait_for_status(base + "/readyz")
            back = await scrape(client, base)
            assert value(back, "wellstream_live") == 1
            assert value(back, "wellstream_redis_reconnects_total") >= 1
            assert value(back, "wellstream_gap_fills_total") >= 1


async def test_metrics_answer_only_the_configured_peers(secret: str) -> None:
    settings = make_settings(secret, server={"metrics_allow": ["10.0.0.0/8"]})
    with anyio.fail_after(30):
        async with running_gateway(settings) as gateway, httpx.AsyncClient(timeout=10) as client:
            refused = await client.get(gateway.url + "/metrics")
    assert refused.status_code == 404, "it names tenants: a peer outside metrics_allow sees nothing"
    assert "wellstream_" not in refused.text
