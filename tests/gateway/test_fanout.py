"""Hub accounting and slow subscribers, through a real gateway on a real redis-server."""

from __future__ import annotations

import asyncio
import socket

import anyio
import httpx
import pytest

from app.settings import StreamSettings
from app.streams.redis import connect_redis
from app.streams.redis.keys import channel_name
from tests.conftest import RedisServer, make_settings, running_gateway, wait_until
from tests.factories import make_reading as reading
from tests.sse_client import SSEReader

pytestmark = pytest.mark.anyio


def numsub(server: RedisServer, tenant: str) -> int:
    with server.client() as client:
        [_, count] = client.execute_command("PUBSUB", "SHARDNUMSUB", channel_name(tenant))  # a sharded channel
    return int(count)


async def test_200_streams_on_20_wells_share_one_subscription_per_tenant_and_leave_none(
    redis_server: RedisServer, redis_url: str, secret: str, token
) -> None:
    wells = [f"w{i:02d}" for i in range(20)]
    headers = {"Authorization": f"Bearer {token('acme')}"}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    with anyio.fail_after(60):
        async with running_gateway(make_settings(secret, redis_url=redis_url)) as gateway:
            hub = gateway.hub
            opened = asyncio.Event()
            release = asyncio.Event()
            got_live: list[int] = []
            snapshots: list[str] = []

            async def one_stream(client: httpx.AsyncClient, well: str) -> None:
                url = f"{gateway.url}/tenants/acme/wells/{well}/stream"
                async with client.stream("GET", url, headers=headers) as response:
                    events = SSEReader(response)
                    await events.next_event("snapshot")  # its subscription is confirmed by now
                    snapshots.append(well)
                    if len(snapshots) == len(wells) * 10:
                        opened.set()
                    got_live.append(int((await events.next_event("reading")).json()["value"]))
                    await release.wait()

            async with httpx.AsyncClient(limits=limits, timeout=30) as client:
                tasks = [asyncio.create_task(one_stream(client, w)) for w in wells for _ in range(10)]
                await opened.wait()
                assert hub.tenants == 1
                assert numsub(redis_server, "acme") == 1, "one subscription per tenant per process"
                async with connect_redis(redis_url) as publisher:
                    await publisher.log.publish([reading(7.0, well=w) for w in wells])
                    await wait_until(lambda: len(got_live) == 200)
                release.set()
                await asyncio.gather(*tasks)
            assert got_live == [7] * 200
            await wait_until(lambda: hub.open_streams == 0)
            assert hub.tenants == 0
            # UNSUBSCRIBE is confirmed by redis asynchronously
            await wait_until(lambda: numsub(redis_server, "acme") == 0)


async def test_a_stream_that_stops_reading_is_ended_while_others_keep_flowing(
    redis_url: str, secret: str, token
) -> None:
    headers = {"Authorization": f"Bearer {token('acme')}"}
    settings = make_settings(secret, redis_url=redis_url, stream=StreamSettings(queue_size=256, send_timeout_s=2))
    total = 20_000
    with anyio.fail_after(90):
        async with running_gateway(settings) as gateway, connect_redis(redis_url) as publisher:
            host, port = gateway.url.removeprefix("http://").split(":")
            stalled = socket.socket()
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled.connect((host, int(port)))
            auth = headers["Authorization"]
            stalled.sendall(
                f"GET /tenants/acme/wells/w1/stream HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\r\n".encode()
            )
            await wait_until(lambda: gateway.hub.open_streams == 1)

            async def publish() -> None:
                for start in range(0, total, 100):
                    await publisher.log.publish(
                        [reading(float(v), well="w1", connection="c" * 60) for v in range(start, start + 100)]
                    )
                    await asyncio.sleep(0.002)

            publishing: asyncio.Task[None] | None = None
            values: list[float] = []
            last_id: str | None = None
            url = f"{gateway.url}/tenants/acme/wells/w1/stream"
            async with httpx.AsyncClient(timeout=30) as client:
                while len(values) < total:  # a reader that falls behind is ended too, and resumes like EventSource
                    resume = {"Last-Event-ID": last_id} if last_id else {}
                    async with client.stream("GET", url, headers={**headers, **resume}) as response:
                        events = SSEReader(response)
                        if publishing is None:
                            await events.next_event("snapshot")
                            publishing = asyncio.create_task(publish())
                        async for event in events:
                            if event.event == "reading":
                                values.append(event.json()["value"])
                            last_id = events.last_id or last_id
                            if len(values) == total:
                                break
            assert publishing is not None
            await publishing
            assert values == [float(v) for v in range(total)], "the reading client got everything, in order, once"
            assert gateway.hub.stats.slow_disconnects + gateway.hub.stats.send_timeouts >= 1
            stalled.setblocking(False)
            loop = asyncio.get_running_loop()
            received = 0
            while chunk := await loop.sock_recv(stalled, 65536):
                received += len(chunk)
            stalled.close()
            assert received < total * 250, "the stalled stream was cut, not fed everything"
