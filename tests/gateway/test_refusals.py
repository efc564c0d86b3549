"""A stream refused for now (429, 503): a status for clients that read JSON errors, and a stream that
asks to come back for clients that read only event streams (a browser's EventSource closes for good
on any status but 200). Real gateway on loopback, real Redis."""

from __future__ import annotations

import anyio
import httpx
import pytest

from app.gateway.errors import reads_only_event_streams
from tests.conftest import RedisServer, make_settings, running_gateway
from tests.sse_client import SSEReader

pytestmark = pytest.mark.anyio

EVENTSOURCE = {"Accept": "text/event-stream"}  # what Chromium's and Firefox's EventSource send


@pytest.mark.parametrize(
    ("accept", "only"),
    [
        ("text/event-stream", True),
        ("Text/Event-Stream", True),
        ("text/event-stream; q=1", True),
        ("text/event-stream, text/plain", True),
        ("text/event-stream, application/json;q=0", True),
        ("text/event-stream, application/json", False),
        ("text/event-stream, */*;q=0.1", False),
        ("text/event-stream, application/*", False),
        ("*/*", False),
        ("", False),
        ("application/json", False),
        ("text/event-stream;q=0, application/json", False),
        ("text/event-stream;q=oops", True),
    ],
)
def test_who_reads_only_event_streams(accept: str, only: bool) -> None:
    assert reads_only_event_streams(accept) is only


async def test_a_limit_tells_an_eventsource_to_come_back_and_any_other_client_its_status(
    redis_url: str, secret: str, token
) -> None:
    settings = make_settings(secret, redis_url=redis_url, auth={"limits": {"streams_per_subject": 1}})
    headers = {"Authorization": f"Bearer {token('acme')}"}
    with anyio.fail_after(30):
        async with running_gateway(settings) as gateway, httpx.AsyncClient(timeout=10) as client:
            url = f"{gateway.url}/tenants/acme/wells/w1/stream"
            async with client.stream("GET", url, headers=headers) as held:
                assert held.status_code == 200
                holding = SSEReader(held)  # kept: a reader dropped closes its stream
                await holding.next_event("snapshot")

                async with client.stream("GET", url, headers=headers | EVENTSOURCE) as refused:
                    assert refused.status_code == 200, "any other status closes an EventSource for good"
                    assert refused.headers["content-type"].startswith("text/event-stream")
                    assert refused.headers["cache-control"] == "no-cache"
                    events = await SSEReader(refused).collect()  # and the stream ends
                retry_after = int(refused.headers["retry-after"])
                assert [e.event for e in events] == ["refused"]
                assert events[0].json() == {
                    "error": "too many open streams for this subject",
                    "status": 429,
                    "retryAfterS": retry_after,
                }
                assert events[0].id is None, "the client's Last-Event-ID stays what it was"
                retry = events[0].retry
                assert retry is not None
                assert retry_after * 1000 <= retry <= retry_after * 1500

                for accept in ("text/event-stream, application/json", "*/*"):
                    plain = await client.get(url, headers=headers | {"Accept": accept})
                    assert plain.status_code == 429, accept
                    assert plain.json() == {"error": "too many open streams for this subject"}
                    assert plain.headers["retry-after"] == str(retry_after)

            # Permanent refusals keep their status: coming back would not help.
            forbidden = await client.get(f"{gateway.url}/tenants/other/wells/w1/stream", headers=headers | EVENTSOURCE)
            assert forbidden.status_code == 403


async def test_redis_out_of_reach_tells_an_eventsource_to_come_back(own_redis: RedisServer, secret: str, token) -> None:
    settings = make_settings(secret, redis_url=own_redis.url, redis={"timeout_s": 0.5})
    headers = {"Authorization": f"Bearer {token('acme')}"}
    with anyio.fail_after(30):
        async with running_gateway(settings) as gateway, httpx.AsyncClient(timeout=10) as client:
            own_redis.freeze()
            try:
                url = f"{gateway.url}/tenants/acme/wells/w1/stream"
                async with client.stream("GET", url, headers=headers | EVENTSOURCE) as refused:
                    assert refused.status_code == 200
                    events = await SSEReader(refused).collect()
                assert [(e.event, e.json()["status"]) for e in events] == [("refused", 503)]
                assert events[0].json()["error"] == "broker unavailable"
                plain = await client.get(url, headers=headers)
                assert plain.status_code == 503
            finally:
                own_redis.thaw()
