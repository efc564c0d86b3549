"""`wellstream serve --workers N`: a supervisor and N gateway processes sharing one port
(app/gateway/workers.py), each with its own hub, Redis feed, drain and /metrics port. Real
processes on loopback with Redis, on each of the three servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import psutil
import pytest

from app.gateway.devcert import DevCert
from app.gateway.workers import worker_count
from app.streams.redis import connect_redis
from tests.conftest import ROOT, gateway_env, wait_until
from tests.deploy.processes import CONFIG, render
from tests.factories import make_reading
from tests.prometheus import parse_samples, value
from tests.sse_client import Event, SSEReader

pytestmark = pytest.mark.anyio

SERVERS = ["hypercorn", "uvicorn", "granian"]
WELLS = [f"w{n:02d}" for n in range(12)]  # in the test registry (tests/conftest.py)
STREAMS_PER_WELL = 2
ROUNDS = 5


def free_ports(count: int) -> int:
    """The first of `count` consecutive free loopback ports, below the ephemeral range (where a
    client's port could take one between this check and the server's bind)."""
    for _ in range(200):
        first = random.randrange(20_000, 32_000 - count)
        with contextlib.ExitStack() as stack:
            try:
                for port in range(first, first + count):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
            return first
    raise RuntimeError("no free ports")


@dataclass
class Unit:
    """A running `serve --workers N`: the supervisor's process and the ports it was given."""

    port: int
    metrics_port: int
    process: asyncio.subprocess.Process
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def workers(self) -> dict[int, psutil.Process]:
        """The supervisor's live workers, by --worker-index."""
        found = {}
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.process.pid).children():
                with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
                    command = child.cmdline()
                    if child.status() != psutil.STATUS_ZOMBIE and "--worker-index" in command:
                        found[int(command[command.index("--worker-index") + 1])] = child
        return found

    async def metrics(self, index: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{self.metrics_port + index}/metrics")
        assert response.status_code == 200
        return parse_samples(response.text)

    async def wait_all_live(self, count: int) -> None:
        """Every worker listens on the port and its hub's Redis feed is live (its own /metrics says so)."""
        while True:
            workers = self.workers()
            if len(workers) == count and all(listens(worker, self.port) for worker in workers.values()):
                with contextlib.suppress(httpx.TransportError, AssertionError):
                    samples = [await self.metrics(index) for index in range(count)]
                    if all(value(s, "wellstream_live") == 1 for s in samples):
                        return
            if self.process.returncode is not None:
                raise RuntimeError(f"the supervisor exited with {self.process.returncode}: {self.log.read_text()}")
            await asyncio.sleep(0.05)

    def log_lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]


def listens(process: psutil.Process, port: int) -> bool:
    with contextlib.suppress(psutil.NoSuchProcess):
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in process.net_connections(kind="tcp"))
    return False


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@contextlib.asynccontextmanager
async def unit(
    secret: str,
    redis_url: str,
    workdir: Path,
    *args: str,
    count: int = 2,
    wait: bool = True,
    ports: int | None = None,
    **env: str,
) -> AsyncIterator[Unit]:
    """`python -m app serve --workers count --port P --metrics-port P+1 <args>`, P the first of
    `ports` (count + 1 free ports in a row; found if None), its log in workdir/unit.log; once every
    worker is live unless `wait` is false. Killed if still running at the end."""
    port = free_ports(1 + count) if ports is None else ports
    metrics_port = port + 1
    log = workdir / "unit.log"
    command = [sys.executable, "-m", "app", "serve", "--port", str(port), "--workers", str(count)]
    command += ["--metrics-port", str(metrics_port), *args]
    environment = gateway_env(secret, redis_url, WELLSTREAM_STREAM__SHUTDOWN_GRACE_S="2", **env)
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(*command, cwd=ROOT, env=environment, stderr=out)
    running = Unit(port, metrics_port, process, log)
    try:
        if wait:
            await running.wait_all_live(count)
        yield running
    finally:
        if process.returncode is None:
            workers = list(running.workers().values())
            process.kill()
            await process.wait()
            for worker in workers:  # the kernel sends them SIGTERM (die_with); make sure
                with contextlib.suppress(psutil.NoSuchProcess):
                    worker.kill()


@dataclass
class Stream:
    """One stream's reading ids, after its snapshot, and its last block."""

    well: str
    ids: list[str] = field(default_factory=list)
    last: Event | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def follow(self, client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> None:
        async with client.stream("GET", f"{url}/tenants/acme/wells/{self.well}/stream", headers=headers) as response:
            assert response.status_code == 200
            reader = SSEReader(response)
            await reader.next_event("snapshot")
            self.ready.set()
            async for event in reader:  # until the server ends the stream
                if event.event == "reading" and event.id is not None:
                    self.ids.append(event.id)
                self.last = event


@pytest.mark.parametrize("server", SERVERS)
async def test_two_workers_share_the_port_deliver_every_reading_once_and_drain_on_sigterm(
    secret: str, token, redis_url: str, server: str, tmp_path: Path
) -> None:
    headers = {"Authorization": f"Bearer {token('acme')}"}
    streams = [Stream(well) for well in WELLS for _ in range(STREAMS_PER_WELL)]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    with anyio.fail_after(60):
        async with (
            unit(secret, redis_url, tmp_path, "--server", server) as running,
            connect_redis(redis_url) as publisher,
            httpx.AsyncClient(timeout=20, limits=limits) as client,
        ):
            workers = running.workers()
            tasks = [asyncio.create_task(stream.follow(client, running.url, headers)) for stream in streams]
            await asyncio.wait_for(asyncio.gather(*(stream.ready.wait() for stream in streams)), 20)

            # The kernel spread the connections: both workers hold streams, each counts its own.
            counts = [value(await running.metrics(i), "wellstream_open_streams", tenant="acme") for i in range(2)]
            assert sum(counts) == len(streams)
            assert all(count > 0 for count in counts), f"streams per worker: {counts}"
            for index, worker in workers.items():
                assert listens(worker, running.metrics_port + index), "each worker serves its own /metrics"

            published: dict[str, list[str]] = {well: [] for well in WELLS}
            for round_ in range(ROUNDS):
                readings = [make_reading(float(round_), well=well) for well in WELLS]
                for reading, stream_id in zip(readings, await publisher.log.publish(readings), strict=True):
                    published[reading.well_id].append(str(stream_id))
            await wait_until(lambda: all(len(s.ids) >= ROUNDS for s in streams))

            running.process.send_signal(signal.SIGTERM)
            await asyncio.gather(*tasks)  # every stream ends; a cut connection would raise here
            code = await asyncio.wait_for(running.process.wait(), 10)

    assert code == 0
    assert all(gone(worker) for worker in workers.values()), "the supervisor exits after its workers"
    for stream in streams:
        assert stream.ids == published[stream.well], "every reading of its well, once, in order"
        assert stream.last is not None
        assert stream.last.retry is not None, "a goodbye with a retry hint"
        assert "shutting down" in " ".join(stream.last.comments)
    assert {line.get("worker") for line in running.log_lines()} >= {0, 1}, "each worker's lines name it"


@pytest.mark.parametrize("server", SERVERS)
async def test_a_killed_worker_is_logged_and_started_again(
    secret: str, redis_url: str, server: str, tmp_path: Path
) -> None:
    with anyio.fail_after(60):
        async with unit(secret, redis_url, tmp_path, "--server", server) as running:
            victim = running.workers()[1]
            victim.kill()
            await wait_until(lambda: running.workers().get(1, victim).pid != victim.pid)
            await running.wait_all_live(2)  # the new worker on the port, live, with its metrics port
            running.process.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(running.process.wait(), 10)
    assert code == 0
    [died] = [line for line in running.log_lines() if f"(pid {victim.pid}) was killed by SIGKILL" in str(line["msg"])]
    assert died["level"] == "error"
    assert "starting it again in" in str(died["msg"])


async def test_a_worker_that_cannot_start_stops_the_unit(secret: str, redis_url: str, tmp_path: Path) -> None:
    with anyio.fail_after(30):
        async with unit(secret, redis_url, tmp_path, wait=False) as running:
            # Worker 1's metrics port is taken: it exits with an error at start, as on a bad config.
            with socket.socket() as squatter:
                squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                squatter.bind(("127.0.0.1", running.metrics_port + 1))
                squatter.listen()
                code = await asyncio.wait_for(running.process.wait(), 20)
    assert code == 1
    assert any("worker 1" in str(line["msg"]) and "failed to start" in str(line["msg"]) for line in running.log_lines())


async def test_a_worker_that_does_not_stop_is_killed_after_the_grace_period(
    secret: str, redis_url: str, tmp_path: Path
) -> None:
    with anyio.fail_after(40):
        async with unit(secret, redis_url, tmp_path) as running:
            stuck = running.workers()[0]
            stuck.suspend()  # SIGSTOP: the SIGTERM it is passed waits until it is killed
            running.process.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(running.process.wait(), 30)
    assert code == 1
    assert gone(stuck)
    [killed] = [line for line in running.log_lines() if "still running" in str(line["msg"])]
    assert f"(pid {stuck.pid})" in str(killed["msg"])


async def test_workers_drain_and_exit_when_the_supervisor_is_killed(
    secret: str, redis_url: str, tmp_path: Path
) -> None:
    with anyio.fail_after(30):
        async with unit(secret, redis_url, tmp_path) as running:
            workers = list(running.workers().values())
            try:
                running.process.kill()  # no chance to forward anything: the kernel tells the workers
                await wait_until(lambda: all(gone(worker) for worker in workers), interval_s=0.05)
            finally:
                for worker in workers:  # orphans no longer under the supervisor, should this fail
                    with contextlib.suppress(psutil.NoSuchProcess):
                        worker.kill()
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", running.port), timeout=1).close()


async def test_two_workers_serve_every_bind_of_a_hypercorn_file(
    secret: str, redis_url: str, dev_cert: DevCert, tls_context: ssl.SSLContext, tmp_path: Path
) -> None:
    tls_port, ports = free_ports(1), free_ports(3)
    toml = tmp_path / "hypercorn.toml"
    replacements = {
        "127.0.0.1:8443": f"127.0.0.1:{tls_port}",
        "127.0.0.1:8000": f"127.0.0.1:{ports}",  # the cleartext bind: the unit's own URL
        '"certs/server.pem"': json.dumps(str(dev_cert.cert)),
        '"certs/server.key"': json.dumps(str(dev_cert.key)),
    }
    toml.write_text(render(CONFIG / "hypercorn.toml", replacements))
    with anyio.fail_after(60):
        async with unit(secret, redis_url, tmp_path, "--hypercorn-config", str(toml), ports=ports) as running:
            workers = running.workers()
            assert all(listens(worker, tls_port) for worker in workers.values()), "TLS bind in every worker"
            async with httpx.AsyncClient(verify=tls_context) as client:
                assert (await client.get(f"https://127.0.0.1:{tls_port}/healthz")).status_code == 200
                assert (await client.get(f"{running.url}/healthz")).status_code == 200
            running.process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(running.process.wait(), 10) == 0


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--port", "0"], {}, "needs a fixed port"),
        (["--port", "{port}"], {"WELLSTREAM_REDIS_URL": ""}, "needs WELLSTREAM_REDIS_URL"),
        (["--port", "{busy}"], {}, "cannot listen on 127.0.0.1:{busy}"),
        (["--hypercorn-config", "{unix}"], {}, "needs TCP binds"),
    ],
)
def test_what_workers_cannot_do_is_refused_before_any_starts(
    secret: str, redis_url: str, tmp_path: Path, args: list[str], env: dict[str, str], says: str
) -> None:
    unix = tmp_path / "unix.toml"
    unix.write_text(f'bind = ["unix:{tmp_path}/gateway.sock"]\n')
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", free_ports(1)))
        busy.listen()
        names = {"port": str(free_ports(1)), "busy": str(busy.getsockname()[1]), "unix": str(unix)}
        command = [sys.executable, "-m", "app", "serve", "--workers", "2", *(a.format(**names) for a in args)]
        result = subprocess.run(
            command, cwd=ROOT, env=gateway_env(secret, redis_url, **env), capture_output=True, text=True, timeout=30
        )
    assert result.returncode == 1
    assert says.format(**names) in result.stderr
    assert "starting" not in result.stderr, "no worker was started"


def test_auto_is_one_worker_per_core_this_process_may_run_on() -> None:
    assert worker_count("auto") == len(os.sched_getaffinity(0))
    assert worker_count("3") == 3
    with pytest.raises(ValueError, match="at least 1"):
        worker_count("0")
