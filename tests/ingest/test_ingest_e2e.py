"""From a device to a browser: mosquitto -> `wellstream ingest` -> Redis -> gateway -> SSE."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import aiomqtt
import anyio
import httpx
import pytest

from tests.adapters.mosquitto import MosquittoBroker
from tests.conftest import ROOT, ingest_command, ingest_env, make_settings, running_gateway
from tests.sse_client import SSEReader

pytestmark = pytest.mark.anyio


async def test_an_mqtt_reading_reaches_the_stream_of_its_tenant_only(
    tmp_path: Path, redis_url: str, secret: str, token
) -> None:
    mqtt = MosquittoBroker(tmp_path)
    mqtt.start()
    site = tmp_path / "site.toml"
    site.write_text(
        f"""
[tenants.acme]
wells = ["well-01"]

[[connections]]
protocol = "mqtt"
id = "field"
tenant = "acme"
host = "127.0.0.1"
port = {mqtt.port}
tags = [{{ topic = "pads/7/tubing", well = "well-01", tag = "tubing_pressure", unit = "psi", scale = 2.0 }}]
"""
    )
    env = ingest_env(redis_url, tmp_path / "spool.sqlite3")
    worker = await asyncio.create_subprocess_exec(*ingest_command(site), cwd=ROOT, env=env)
    try:
        with anyio.fail_after(30):
            settings = make_settings(secret, redis_url=redis_url, wells={})
            async with (
                running_gateway(settings) as gateway,
                httpx.AsyncClient(timeout=20) as client,
                aiomqtt.Client("127.0.0.1", mqtt.port) as device,
            ):
                # ingest registers acme/well-01 at start: the gateway knows the well only from Redis
                url = f"{gateway.url}/tenants/acme/wells/well-01/stream"
                headers = {"Authorization": f"Bearer {token('acme')}"}
                for _ in range(400):
                    if (await client.get(url.replace("/stream", "/latest"), headers=headers)).status_code != 404:
                        break
                    await asyncio.sleep(0.05)
                async with client.stream("GET", url, headers=headers) as response:
                    assert response.status_code == 200
                    events = SSEReader(response)
                    await events.next_event("snapshot")

                    async def keep_publishing() -> None:  # until the worker's subscription is in place
                        while True:
                            await device.publish("pads/7/tubing", b"421.5", qos=1)
                            await asyncio.sleep(0.2)

                    publishing = asyncio.create_task(keep_publishing())
                    try:
                        reading = (await events.next_event("reading")).json()
                    finally:
                        publishing.cancel()
                assert reading["value"] == 843.0
                assert reading["sourceProtocol"] == "mqtt"
                assert reading["connectionId"] == "field"
                assert reading["unit"] == "psi"
                other = await client.get(
                    f"{gateway.url}/tenants/globex/wells/well-01/latest",
                    headers={"Authorization": f"Bearer {token('globex')}"},
                )
                assert other.status_code == 404, "globex has no well-01: nothing of acme's shows there"
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(worker.wait(), 10) == 0
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
        mqtt.stop()


async def test_opcua_values_and_statuses_reach_the_stream_and_survive_a_server_restart(
    redis_url: str, secret: str, token
) -> None:
    from datetime import UTC, datetime

    from asyncua.ua.status_codes import StatusCodes

    from app.ingest.sitefile import Site
    from app.ingest.worker import run_ingest
    from app.streams.redis import connect_redis
    from tests.adapters.test_opcua import Plc
    from tests.conftest import free_port

    first = Plc(free_port())
    await first.init()
    await first.server.start()
    second = Plc(first.port)
    site = Site.model_validate(
        {
            "tenants": {"acme": {"wells": ["well-01"]}},
            "connections": [
                {
                    "protocol": "opcua",
                    "id": "plc",
                    "tenant": "acme",
                    "endpoint": first.endpoint,
                    "sampling_interval_ms": 0,
                    "publishing_interval_ms": 50,
                    "nodes": [{"node_id": first.node_id("TubingPressure"), "well": "well-01", "tag": "tubing"}],
                }
            ],
        }
    )
    stop = asyncio.Event()
    stamp = datetime(2026, 11, 27, 6, 30, 0, 123456, tzinfo=UTC)
    try:
        with anyio.fail_after(40):
            async with connect_redis(redis_url) as broker:
                ingest = asyncio.create_task(run_ingest(site, broker, stop, {}))
                settings = make_settings(secret, redis_url=redis_url, wells={"acme": ["well-01"]})
                headers = {"Authorization": f"Bearer {token('acme')}"}
                async with running_gateway(settings) as gateway, httpx.AsyncClient(timeout=30) as client:
                    url = f"{gateway.url}/tenants/acme/wells/well-01/stream"
                    async with client.stream("GET", url, headers=headers) as response:
                        events = SSEReader(response)
                        await events.next_event("snapshot")

                        async def next_reading(value: float | None) -> dict[str, object]:
                            while True:
                                reading: dict[str, object] = (await events.next_event("reading")).json()
                                if reading["value"] == value:
                                    return reading

                        await first.write("TubingPressure", 10.0, source=stamp)
                        good = await next_reading(10.0)
                        assert good["quality"] == "GOOD"
                        assert good["timestamp"] == "2026-11-27T06:30:00.123456Z", "the source time is kept"
                        assert good["sourceProtocol"] == "opcua"
                        await first.write("TubingPressure", 11.0, StatusCodes.UncertainLastUsableValue)
                        assert (await next_reading(11.0))["quality"] == "UNCERTAIN"
                        await first.write("TubingPressure", 0.0, StatusCodes.BadSensorFailure)  # a Bad value is null
                        assert (await next_reading(None))["quality"] == "BAD"
                        await second.init()
                        await first.server.stop()
                        await second.server.start()
                        await second.write("TubingPressure", 12.0)
                        assert (await next_reading(12.0))["quality"] == "GOOD", "resumed without a worker restart"
                stop.set()
                await ingest
    finally:
        stop.set()
        for plc in (first, second):
            with contextlib.suppress(Exception):
                await plc.server.stop()
