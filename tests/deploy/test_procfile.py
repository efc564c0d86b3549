"""The Procfile's own commands: three `web` gateways and two `ingest` workers on one Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import pytest

from app.models import StreamId
from app.streams.redis import connect_redis
from tests.conftest import ROOT, RedisServer, clean_env, free_port, wait_for_status, wait_until
from tests.factories import make_reading
from tests.sse_client import SSEReader

pytestmark = pytest.mark.anyio

SITE = """
[tenants.acme]
wells = ["{well}"]

[[connections]]
protocol = "simulator"
id = "{connection}"
tenant = "acme"
wells = ["{well}"]
interval_s = 0.2
"""
# Each worker reads its own site file: its own connections, its own well.
WORKERS = {"pf-a": "sim-a", "pf-b": "sim-b"}


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip() and not line.startswith("#"))


@contextlib.asynccontextmanager
async def procfile_process(command: str, env: dict[str, str]) -> AsyncIterator[asyncio.subprocess.Process]:
    """The Procfile line as a process manager runs it: through sh, in its own process group."""
    process = await asyncio.create_subprocess_exec("sh", "-c", command, cwd=ROOT, env=env, start_new_session=True)
    try:
        yield process
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                os.killpg(process.pid, signal.SIGKILL)
                await process.wait()


@dataclass
class Collector:
    """Every reading event of one stream, as it arrives."""

    gateway: int
    well: str
    events: list[tuple[str, dict[str, object]]] = field(default_factory=list)

    async def run(self, response: httpx.Response) -> None:
        reader = SSEReader(response)
        await reader.next_event("snapshot")
        self.events.append(("snapshot", {}))
        async for event in reader:
            if event.event == "reading":
                self.events.append((event.id or "", event.json()))

    def after(self, stream_id: StreamId) -> list[tuple[str, dict[str, object]]]:
        ids = [event_id for event_id, _ in self.events]
        return self.events[ids.index(str(stream_id)) :] if str(stream_id) in ids else []


async def test_a_reading_published_once_reaches_every_gateway_exactly_once(
    redis_server: RedisServer, redis_url: str, secret: str, token, tmp_path: Path
) -> None:
    lines = procfile()
    base = clean_env()
    base |= {"PATH": f"{Path(sys.executable).parent}:{base.get('PATH', '')}", "REDIS_URL": redis_url}
    base |= {"WELLSTREAM_JWT_SECRET": secret, "HOST": "127.0.0.1"}
    ports = [free_port() for _ in range(3)]
    for well, connection in WORKERS.items():
        (tmp_path / f"{well}.toml").write_text(SITE.format(well=well, connection=connection))
    headers = {"Authorization": f"Bearer {token('acme')}"}
    with anyio.fail_after(60):
        async with contextlib.AsyncExitStack() as stack:
            workers: list[asyncio.subprocess.Process] = []
            for well in WORKERS:
                env = base | {"SITE_CONFIG": str(tmp_path / f"{well}.toml")}
                env["WELLSTREAM_SPOOL__PATH"] = str(tmp_path / f"{well}.spool.sqlite3")  # one per worker
                workers.append(await stack.enter_async_context(procfile_process(lines["ingest"], env)))
            gateways = [
                (await stack.enter_async_context(procfile_process(lines["web"], base | {"PORT": str(port)})), port)
                for port in ports
            ]
            for process, port in gateways:
                await wait_for_status(f"http://127.0.0.1:{port}/readyz", lambda: process.returncode)  # noqa: B023 - awaited in this iteration
            with redis_server.client() as client:
                wells = {well.encode() for well in WORKERS}
                await wait_until(lambda: _alive(workers) and client.smembers("scada:{acme}:wells") >= wells)
            client_ = await stack.enter_async_context(httpx.AsyncClient(timeout=20))
            publisher = await stack.enter_async_context(connect_redis(redis_url))
            collectors = [Collector(n, well) for n in range(len(ports)) for well in WORKERS]
            tasks = []
            for collector in collectors:
                url = f"http://127.0.0.1:{ports[collector.gateway]}/tenants/acme/wells/{collector.well}/stream"
                response = await stack.enter_async_context(client_.stream("GET", url, headers=headers))
                assert response.status_code == 200
                tasks.append(asyncio.create_task(collector.run(response)))
            stack.callback(lambda: [task.cancel() for task in tasks])
            await wait_until(lambda: all(c.events for c in collectors))

            probe = make_reading(1.0, "probe", well="pf-a", connection="test")
            [probe_id] = await publisher.log.publish([probe])
            # Both workers' readings keep arriving at every gateway after the probe.
            await wait_until(lambda: all(len(c.after(probe_id)) >= 4 for c in collectors if c.well == "pf-a"))
            await wait_until(lambda: all(len(c.events) >= 4 for c in collectors if c.well == "pf-b"))
            [last_id] = await publisher.log.publish([make_reading(2.0, "probe", well="pf-a", connection="test")])
            await wait_until(lambda: all(c.after(last_id) for c in collectors if c.well == "pf-a"))
            history = await asyncio.to_thread(_history, redis_server, "pf-a", str(probe_id), str(last_id))

    for collector in collectors:
        readings = [data for _, data in collector.events[1:]]
        assert {data["connectionId"] for data in readings} == {WORKERS[collector.well]} | (
            {"test"} if collector.well == "pf-a" else set()
        )
        ids = [StreamId.parse(event_id) for event_id, _ in collector.events[1:]]
        assert ids == sorted(set(ids)), "no reading twice, none out of order"
        if collector.well == "pf-a":
            window = collector.after(probe_id)
            window = window[: [event_id for event_id, _ in window].index(str(last_id)) + 1]
            assert [event_id for event_id, _ in window] == history, "exactly what Redis holds, once each"
            assert sum(1 for _, data in window if data["connectionId"] == "test" and data["value"] == 1.0) == 1


def _alive(processes: list[asyncio.subprocess.Process]) -> bool:
    exited = [process.returncode for process in processes if process.returncode is not None]
    if exited:
        raise RuntimeError(f"an ingest worker exited with {exited[0]}")
    return True


def _history(redis_server: RedisServer, well: str, first: str, last: str) -> list[str]:
    with redis_server.client() as client:
        return [entry_id.decode() for entry_id, _ in client.xrange(f"scada:{{acme}}:log:{well}", first, last)]
