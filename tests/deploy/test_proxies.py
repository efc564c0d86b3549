"""nginx and Caddy, from config/nginx.conf and config/Caddyfile, in front of two real gateways on one Redis."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import pytest

from app.gateway.devcert import DevCert
from app.streams.redis import connect_redis
from tests.conftest import gateway_process, wait_for_status, wait_until
from tests.deploy.processes import PROXIES, Proxy
from tests.factories import make_reading
from tests.sse_client import SSEReader

pytestmark = pytest.mark.anyio

PATH = "/tenants/acme/wells/w1/stream"


@contextlib.asynccontextmanager
async def two_gateways_behind(name: str, secret: str, redis_url: str, dev_cert: DevCert, workdir: Path):
    async with (
        gateway_process(secret, WELLSTREAM_REDIS_URL=redis_url) as first,
        gateway_process(secret, WELLSTREAM_REDIS_URL=redis_url) as second,
    ):
        upstreams = (first.url.removeprefix("http://"), second.url.removeprefix("http://"))
        with PROXIES[name](workdir, upstreams, dev_cert.cert, dev_cert.key) as proxy:
            tls = ssl.create_default_context(cafile=str(dev_cert.ca))
            await wait_for_status(proxy.https + "/readyz", proxy.process.poll, verify=tls)
            yield proxy, (first, second)


@contextlib.asynccontextmanager
async def clients(proxy: Proxy, tls: ssl.SSLContext) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """An HTTP/1.1 and an HTTP/2 client for the proxy's TLS port (nginx's cleartext port only redirects)."""
    limits = httpx.Limits(max_connections=None)
    async with (
        httpx.AsyncClient(base_url=proxy.https, timeout=10, limits=limits, verify=tls) as h1,
        httpx.AsyncClient(base_url=proxy.https, timeout=10, http2=True, verify=tls) as h2,
    ):
        yield h1, h2


@pytest.mark.parametrize("proxy_name", sorted(PROXIES))
async def test_events_arrive_one_by_one_over_http1_and_http2(
    proxy_name: str, secret: str, token, redis_url: str, dev_cert: DevCert, tls_context: ssl.SSLContext, tmp_path
) -> None:
    headers = {"Authorization": f"Bearer {token('acme')}"}
    with anyio.fail_after(40):
        async with (
            two_gateways_behind(proxy_name, secret, redis_url, dev_cert, tmp_path) as (proxy, gateways),
            clients(proxy, tls_context) as (h1, h2),
            connect_redis(redis_url) as publisher,
            h1.stream("GET", PATH, headers=headers) as over_h1,
            h2.stream("GET", PATH, headers=headers) as over_h2,
        ):
            assert (over_h1.status_code, over_h1.http_version) == (200, "HTTP/1.1")
            assert (over_h2.status_code, over_h2.http_version) == (200, "HTTP/2")
            readers = [SSEReader(over_h1), SSEReader(over_h2)]
            for reader in readers:
                assert reader.response.headers["content-type"].startswith("text/event-stream")
                await reader.next_event("snapshot")
            # Each reading must come through before the next is published: a proxy that held
            # small responses back would leave the reader waiting until fail_after.
            for value in (1.0, 2.0, 3.0):
                [stream_id] = await publisher.log.publish([make_reading(value)])
                for reader in readers:
                    event = await reader.next_event("reading")
                    assert (event.id, event.json()["value"]) == (str(stream_id), value)
            # Metrics are scraped from each gateway, never served to the internet by the proxy.
            assert (await h1.get("/metrics")).status_code == 404
            assert (await h2.get("/metrics")).status_code == 404
            assert (await h1.get(gateways[0].url + "/metrics")).status_code == 200


async def test_nginx_sends_plain_http_to_https_and_proxies_nothing_over_it(
    secret: str, token, redis_url: str, dev_cert: DevCert, tmp_path
) -> None:
    with anyio.fail_after(30):
        async with (
            two_gateways_behind("nginx", secret, redis_url, dev_cert, tmp_path) as (proxy, _),
            httpx.AsyncClient(base_url=proxy.http, timeout=10) as plain,
        ):
            cookie = {"Cookie": "wellstream_session=x", "Authorization": f"Bearer {token('acme')}"}
            for method, path in [("GET", PATH + "?lastEventId=1-0"), ("POST", "/tenants/acme/stream-tickets")]:
                response = await plain.request(method, path, headers=cookie)
                assert response.status_code == 308, "a redirect that keeps the method, never an answer"
                assert response.headers["location"] == proxy.https + path


@dataclass
class Follower:
    """One client's stream through the proxy, resumed with Last-Event-ID whenever it ends."""

    client: httpx.AsyncClient
    headers: dict[str, str]
    statuses: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    opened: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, last_value: float, resume: asyncio.Event) -> None:
        last_id: str | None = None
        while True:
            headers = self.headers | ({"Last-Event-ID": last_id} if last_id else {})
            async with self.client.stream("GET", PATH, headers=headers) as response:
                self.statuses.append(response.status_code)
                if response.status_code != 200:
                    return
                reader = SSEReader(response)
                if last_id is None:
                    await reader.next_event("snapshot")
                    self.opened.set()
                with contextlib.suppress(EOFError):
                    while True:
                        event = await reader.next_event("reading")
                        self.values.append(event.json()["value"])
                        last_id = event.id
                        if self.values[-1] == last_value:
                            return
            await resume.wait()  # its gateway said goodbye: come back once that gateway is gone


@pytest.mark.parametrize("proxy_name", sorted(PROXIES))
async def test_a_stopped_gateway_s_clients_resume_on_the_other_without_an_error(
    proxy_name: str, secret: str, token, redis_url: str, dev_cert: DevCert, tls_context: ssl.SSLContext, tmp_path
) -> None:
    resume = asyncio.Event()
    with anyio.fail_after(45):
        async with (
            two_gateways_behind(proxy_name, secret, redis_url, dev_cert, tmp_path) as (proxy, (first, _)),
            contextlib.AsyncExitStack() as stack,
            connect_redis(redis_url) as publisher,
        ):
            # Four browsers over HTTP/2; the proxy spreads their streams over both gateways. (One
            # connection each: httpx 0.28's HTTP/2 client can stall one of several streams sharing
            # a connection, which a raw h2 client against the same gateway never showed.)
            auth = {"Authorization": f"Bearer {token('acme')}"}
            h2 = [
                await stack.enter_async_context(
                    httpx.AsyncClient(base_url=proxy.https, timeout=10, http2=True, verify=tls_context)
                )
                for _ in range(4)
            ]
            followers = [Follower(client, auth) for client in h2]
            tasks = [asyncio.create_task(follower.run(4.0, resume)) for follower in followers]
            for follower in followers:
                await follower.opened.wait()
            await publisher.log.publish([make_reading(1.0)])
            await wait_until(lambda: all(f.values == [1.0] for f in followers))

            first.process.send_signal(signal.SIGTERM)
            assert await first.process.wait() == 0
            # Published while the first gateway's clients are away: they must get these from history.
            await publisher.log.publish([make_reading(2.0)])
            await publisher.log.publish([make_reading(3.0)])
            resume.set()
            await publisher.log.publish([make_reading(4.0)])
            await asyncio.gather(*tasks)

    for follower in followers:
        assert follower.values == [1.0, 2.0, 3.0, 4.0], "no reading lost or repeated"
        assert set(follower.statuses) == {200}, f"through {proxy_name}, every (re)connect got 200"
    resumed = sum(len(follower.statuses) - 1 for follower in followers)
    assert resumed >= 1, "some streams were on the stopped gateway and resumed through the proxy"
