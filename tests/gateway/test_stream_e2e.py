"""The SSE endpoint end to end: a real Hypercorn on loopback, a real HTTP client, both brokers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import httpx
import pytest

from app.models import StreamId
from app.settings import HistorySettings, StreamSettings
from app.streams.memory import memory_broker
from app.streams.redis import connect_redis
from app.streams.seams import Broker
from tests.conftest import RunningGateway, make_settings, running_gateway
from tests.factories import make_reading as reading
from tests.sse_client import SSEReader

pytestmark = pytest.mark.anyio

STREAM = "/tenants/acme/wells/w1/stream"


@dataclass
class Site:
    gateway: RunningGateway
    publisher: Broker
    headers: dict[str, str]

    @property
    def url(self) -> str:
        return self.gateway.url


@contextlib.asynccontextmanager
async def site(kind: str, redis_url: str, secret: str, token: str, **overrides: object) -> AsyncIterator[Site]:
    headers = {"Authorization": f"Bearer {token}"}
    if kind == "memory":
        settings = make_settings(secret, **overrides)
        memory = memory_broker(settings.history.max_len)
        async with running_gateway(settings, memory) as gateway:
            yield Site(gateway, memory, headers)
    else:
        settings = make_settings(secret, redis_url=redis_url, **overrides)
        async with connect_redis(redis_url, settings.history.max_len) as broker:
            async with running_gateway(settings) as gateway:
                yield Site(gateway, broker, headers)


async def test_snapshot_first_then_live_readings_in_order(kind: str, url: str, secret: str, token) -> None:
    with anyio.fail_after(10):
        async with site(kind, url, secret, token("acme")) as s, httpx.AsyncClient(timeout=5) as client:
            await s.publisher.log.publish([reading(1.0, "p"), reading(2.0, "t"), reading(3.0, "p")])
            async with client.stream("GET", s.url + STREAM, headers=s.headers) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                assert response.headers["cache-control"] == "no-cache"
                assert response.headers["x-accel-buffering"] == "no"
                events = SSEReader(response)
                first = await anext(aiter(events))
                assert first.retry is not None, "the first frame carries retry:"
                snapshot = await events.next_event()
                assert snapshot.event == "snapshot"
                body = snapshot.json()
                assert {r["tagName"]: r["value"] for r in body["readings"]} == {"p": 3.0, "t": 2.0}
                assert snapshot.id == body["lastEventId"]
                ids = await s.publisher.log.publish([reading(float(i)) for i in range(20)])
                got = [await events.next_event("reading") for _ in range(20)]
                assert [e.id for e in got] == [str(i) for i in ids]
                assert [e.json()["value"] for e in got] == [float(i) for i in range(20)]
                assert got[0].json()["tenantId"] == "acme"
                assert got[0].json()["unit"] == "psi"


async def _publish_slowly(broker: Broker, values: range, every: int = 25) -> list[StreamId]:
    ids: list[StreamId] = []
    for start in range(values.start, values.stop, every):
        ids += await broker.log.publish([reading(float(v)) for v in range(start, min(start + every, values.stop))])
        await asyncio.sleep(0.002)
    return ids


@pytest.mark.parametrize("resume_by", ["header", "query"])
async def test_resume_after_a_dropped_connection_misses_nothing_and_repeats_nothing(
    kind: str, url: str, secret: str, token, resume_by: str
) -> None:
    with anyio.fail_after(30):
        async with site(kind, url, secret, token("acme")) as s, httpx.AsyncClient(timeout=10) as client:
            seen: list[float] = []
            async with client.stream("GET", s.url + STREAM, headers=s.headers) as response:
                events = SSEReader(response)
                await events.next_event("snapshot")
                publishing = asyncio.create_task(_publish_slowly(s.publisher, range(1000)))
                while len(seen) < 400:
                    seen.append((await events.next_event("reading")).json()["value"])
                last_id = events.last_id
            assert last_id is not None
            ids = await publishing  # the rest is published while nobody is connected
            headers, params = dict(s.headers), {}
            if resume_by == "header":
                headers["Last-Event-ID"] = last_id
            else:
                params["lastEventId"] = last_id
            async with client.stream("GET", s.url + STREAM, headers=headers, params=params) as response:
                assert response.status_code == 200
                events = SSEReader(response)
                while len(seen) < 1000:
                    event = await events.next_event()
                    assert event.event == "reading", "a resume replays, it sends no snapshot"
                    seen.append(event.json()["value"])
                assert events.last_id == str(ids[-1])
                await s.publisher.log.publish([reading(1000.0)])
                seen.append((await events.next_event()).json()["value"])
            assert seen == [float(v) for v in range(1001)]


async def test_resume_from_a_trimmed_id_gets_reset_and_snapshot(kind: str, url: str, secret: str, token) -> None:
    with anyio.fail_after(15):
        history = HistorySettings(max_len=10, max_age_s=0)
        async with site(kind, url, secret, token("acme"), history=history) as s, httpx.AsyncClient(timeout=5) as c:
            ids: list[StreamId] = []
            for i in range(300):
                ids += await s.publisher.log.publish([reading(float(i))])
            headers = {**s.headers, "Last-Event-ID": str(ids[0])}
            async with c.stream("GET", s.url + STREAM, headers=headers) as response:
                events = SSEReader(response)
                reset = await events.next_event()
                assert reset.event == "reset"
                assert reset.json()["reason"] == "history-truncated"
                snapshot = await events.next_event()
                assert snapshot.event == "snapshot"
                assert snapshot.id == str(ids[-1])
                assert snapshot.json()["readings"][0]["value"] == 299.0


async def test_tags_filter_applies_to_snapshot_and_live(kind: str, url: str, secret: str, token) -> None:
    with anyio.fail_after(10):
        async with site(kind, url, secret, token("acme")) as s, httpx.AsyncClient(timeout=5) as client:
            await s.publisher.log.publish([reading(1.0, "p"), reading(2.0, "t"), reading(3.0, "q")])
            params = {"tags": "p,q"}
            async with client.stream("GET", s.url + STREAM, headers=s.headers, params=params) as response:
                events = SSEReader(response)
                snapshot = await events.next_event("snapshot")
                assert sorted(r["tagName"] for r in snapshot.json()["readings"]) == ["p", "q"]
                await s.publisher.log.publish([reading(4.0, "t"), reading(5.0, "q"), reading(6.0, "p")])
                got = [(await events.next_event("reading")).json()["tagName"] for _ in range(2)]
                assert got == ["q", "p"]


async def test_heartbeat_comments_keep_an_idle_stream_alive(kind: str, url: str, secret: str, token) -> None:
    with anyio.fail_after(10):
        stream = StreamSettings(heartbeat_s=0.3)
        async with site(kind, url, secret, token("acme"), stream=stream) as s, httpx.AsyncClient(timeout=5) as c:
            async with c.stream("GET", s.url + STREAM, headers=s.headers) as response:
                events = SSEReader(response)
                await events.next_event("snapshot")
                block = await anext(aiter(events))
                assert block.comments
                assert not block.data


async def test_latest_endpoint_answers_json(kind: str, url: str, secret: str, token) -> None:
    with anyio.fail_after(10):
        async with site(kind, url, secret, token("acme")) as s, httpx.AsyncClient(timeout=5) as client:
            ids = await s.publisher.log.publish([reading(1.0, "p"), reading(2.0, "t")])
            response = await client.get(s.url + "/tenants/acme/wells/w1/latest", headers=s.headers)
            assert response.status_code == 200
            body = response.json()
            assert body["lastEventId"] == str(ids[-1])
            assert [(r["tagName"], r["value"]) for r in body["readings"]] == [("p", 1.0), ("t", 2.0)]
            wells = await client.get(s.url + "/tenants/acme/wells", headers=s.headers)
            assert wells.json()["tenantId"] == "acme"
            assert "w1" in wells.json()["wells"]


@pytest.mark.parametrize(
    ("path", "extra_headers", "status"),
    [
        (STREAM, {"Last-Event-ID": "not-an-id"}, 400),
        (STREAM, {"Last-Event-ID": "1-2-3"}, 400),
        (STREAM + "?lastEventId=99999999999999999999999-0", {}, 400),
        (STREAM + "?tags=a,b*", {}, 400),
        ("/tenants/acme/wells/w*/stream", {}, 404),
        ("/tenants/acme/wells/" + "x" * 65 + "/stream", {}, 404),
        ("/tenants/ac:me/wells/w1/stream", {}, 404),
        ("/tenants/acme/wells/.hidden/latest", {}, 404),
    ],
)
async def test_bad_input_gets_a_clear_4xx(redis_url: str, secret: str, token, path, extra_headers, status) -> None:
    with anyio.fail_after(10):
        async with site("redis", redis_url, secret, token("acme")) as s, httpx.AsyncClient(timeout=5) as client:
            response = await client.get(s.url + path, headers={**s.headers, **extra_headers})
            assert response.status_code == status
            assert response.json()["error"]
            ok = await client.get(s.url + "/healthz")
            assert ok.status_code == 200, "the process survives bad input"


async def test_a_token_of_another_tenant_is_refused(redis_url: str, secret: str, token) -> None:
    with anyio.fail_after(10):
        async with site("redis", redis_url, secret, token("globex")) as s, httpx.AsyncClient(timeout=5) as client:
            await s.publisher.log.publish([reading(1.0)])
            for path in (STREAM, "/tenants/acme/wells/w1/latest", "/tenants/acme/wells"):
                response = await client.get(s.url + path, headers=s.headers)
                assert response.status_code == 403, path
                assert "1.0" not in response.text
            own = await client.get(s.url + "/tenants/globex/wells/w1/latest", headers=s.headers)
            assert own.status_code == 200
            assert own.json()["readings"] == [], "same well id, other tenant: no data"


async def test_missing_expired_or_forged_tokens_get_401(redis_url: str, secret: str, token) -> None:
    from app.auth.tokens import mint_token

    with anyio.fail_after(10):
        async with site("redis", redis_url, secret, token("acme")) as s, httpx.AsyncClient(timeout=5) as client:
            response = await client.get(s.url + STREAM)
            assert response.status_code == 401
            assert response.headers["www-authenticate"].startswith("Bearer")
            for bad in (token("acme", ttl_s=-120), mint_token("another-secret-of-enough-length!", "acme"), "x.y.z"):
                response = await client.get(s.url + STREAM, headers={"Authorization": f"Bearer {bad}"})
                assert response.status_code == 401
            query = await client.get(s.url + STREAM, params={"access_token": token("acme")})
            assert query.status_code == 401, "query tokens are off unless enabled"


async def test_a_wells_claim_hides_other_wells(redis_url: str, secret: str, token) -> None:
    with anyio.fail_after(10):
        async with site("redis", redis_url, secret, token("acme", wells=["w2"])) as s, httpx.AsyncClient() as client:
            await s.publisher.log.publish([reading(1.0, well="w1"), reading(1.0, well="w2")])
            assert (await client.get(s.url + "/tenants/acme/wells/w1/latest", headers=s.headers)).status_code == 404
            assert (await client.get(s.url + "/tenants/acme/wells/w2/latest", headers=s.headers)).status_code == 200
            wells = await client.get(s.url + "/tenants/acme/wells", headers=s.headers)
            assert wells.json()["wells"] == ["w2"]
