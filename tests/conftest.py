"""Real servers on loopback: redis-server as a subprocess, the gateway under Hypercorn."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import anyio
import httpx
import pytest
import redis

from app.auth.tokens import mint_token
from app.gateway.app import GatewayApp, create_app
from app.gateway.context import Gateway
from app.gateway.hub import Hub
from app.gateway.server import serve_until
from app.settings import Settings
from app.streams.seams import Broker
from tests.cluster import LocalCluster


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any WELLSTREAM_ setting, plus `extra`: a child sees only
    what the test gives it."""
    return {k: v for k, v in os.environ.items() if not k.startswith("WELLSTREAM_")} | extra


def ingest_env(redis_url: str, spool: Path, **overrides: str) -> dict[str, str]:
    """The environment of a `wellstream ingest` child, with its own spool file (never the repo's
    var/: test runs may overlap)."""
    return clean_env() | {"WELLSTREAM_REDIS_URL": redis_url, "WELLSTREAM_SPOOL__PATH": str(spool)} | overrides


def ingest_command(site: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "app", "ingest", "--config", str(site), *args]


@contextlib.asynccontextmanager
async def ingest_worker(site: Path, redis_url: str, workdir: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """A real `wellstream ingest` on `site`, its spool and log (ingest.log) in `workdir`; killed at the end."""
    await anyio.Path(workdir).mkdir(parents=True, exist_ok=True)
    with (workdir / "ingest.log").open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            *ingest_command(site), cwd=ROOT, env=ingest_env(redis_url, workdir / "spool.sqlite3"), stderr=log
        )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            # Shielded: after a timeout the reap would be cancelled, and the leaked process fail a later test.
            with anyio.move_on_after(10, shield=True):
                await process.wait()


def stop_process(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM a server subprocess, SIGKILL it if it is still there after 5 s."""
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class RedisServer:
    """A redis-server subprocess on a free loopback port, data in a temp dir."""

    def __init__(
        self, workdir: Path, appendonly: bool = False, appendfsync: str = "everysec", replica_of: int | None = None
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run `make test`, which installs it")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self._cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        self._cmd += [
            "--appendonly",
            "yes" if appendonly else "no",
            "--appendfsync",
            appendfsync,
            "--dir",
            str(workdir),
        ]
        if replica_of is not None:  # a replica of the redis-server on that port
            self._cmd += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self._cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        stop_process(self.process)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final fsync, sockets reset by the kernel."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def freeze(self) -> None:
        """SIGSTOP: connections stay open and accept, nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, to kill, freeze or restart on the same port.

    AOF with appendfsync always: what Redis acknowledged survives a kill -9 and a restart.
    """
    workdir = tmp_path / "own-redis"
    workdir.mkdir()
    server = RedisServer(workdir, appendonly=True, appendfsync="always")
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.thaw()  # a frozen process cannot act on SIGTERM
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A clean database for each test."""
    with redis_server.client() as client:
        client.flushall()
    return redis_server.url


@pytest.fixture(scope="session")
def cluster_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One six-node Redis Cluster for the session (about 3-4 s to start); tests get it through `redis_cluster`."""
    cluster = LocalCluster(tmp_path_factory.mktemp("redis-cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_cluster(cluster_servers: LocalCluster) -> LocalCluster:
    """The session's cluster, healthy and empty: a node an earlier test killed is restarted (it
    rejoins as a replica, well under a second) and every primary is flushed. Slots may sit anywhere: a test
    asks `owner_of(key)` instead of assuming the initial layout."""
    cluster_servers.heal()
    cluster_servers.flushall()
    return cluster_servers


@pytest.fixture(params=["memory", "redis"])
def kind(request: pytest.FixtureRequest) -> str:
    """Run a test once on each broker."""
    return str(request.param)


@pytest.fixture
def url(kind: str, request: pytest.FixtureRequest) -> str:
    """The Redis URL for the redis variant; only that variant starts (and flushes) a redis-server."""
    return str(request.getfixturevalue("redis_url")) if kind == "redis" else ""


@pytest.fixture(scope="session")
def secret() -> str:
    """Made at test time; never stored anywhere."""
    return secrets.token_urlsafe(32)


@pytest.fixture
def token(secret: str):
    def make(tenant: str, wells: list[str] | None = None, ttl_s: int = 600) -> str:
        return mint_token(secret, tenant, "tester", wells, ttl_s)

    return make


# The registry of wells the tests stream from (a stream for any other well is a 404).
TEST_WELLS = ["w1", "w2", "w9", *(f"w{i:02d}" for i in range(20)), *(f"well-{i}" for i in range(10))]
REGISTRY = {"acme": TEST_WELLS, "globex": TEST_WELLS}


# Tests open hundreds of streams from one address at once; tests of the limits set their own.
ROOMY_LIMITS = {
    "connects_per_s": 100_000,
    "connect_burst": 100_000,
    "streams_per_subject": 100_000,
    "auth_failure_burst": 100_000,
}


def make_settings(secret: str, **overrides: object) -> Settings:
    """Test settings; an `auth` override keeps the roomy limits except those it sets itself."""
    auth: dict[str, Any] = dict(cast(Mapping[str, Any], overrides.pop("auth", {})))
    auth["limits"] = {**ROOMY_LIMITS, **auth.get("limits", {})}
    return Settings(jwt_secret=secret, **{"wells": REGISTRY, "auth": auth, **overrides})  # type: ignore[arg-type]


@dataclass
class RunningGateway:
    url: str
    app: GatewayApp

    @property
    def running(self) -> Gateway:
        gateway = self.app.gateway
        assert gateway is not None, "the gateway is not running"
        return gateway

    @property
    def hub(self) -> Hub:
        return self.running.hub


@contextlib.asynccontextmanager
async def running_gateway(settings: Settings, broker: Broker | None = None) -> AsyncIterator[RunningGateway]:
    """The real app under a real Hypercorn on 127.0.0.1."""
    app = create_app(settings, broker=broker)
    port = free_port()
    stop = asyncio.Event()
    task = asyncio.create_task(serve_until(app, settings, "127.0.0.1", port, stop))
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient() as client:
        for _ in range(500):
            if task.done():
                task.result()
            with contextlib.suppress(httpx.TransportError):
                if (await client.get(f"{base}/healthz")).status_code == 200:
                    break
            await asyncio.sleep(0.01)
        else:
            raise RuntimeError("gateway did not start")
    try:
        yield RunningGateway(base, app)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def wait_until(condition: Callable[[], bool], interval_s: float = 0.01) -> None:
    """Poll a condition the server changes asynchronously (the caller bounds the time)."""
    while not condition():  # noqa: ASYNC110 - there is no event to wait on for another process's state
        await asyncio.sleep(interval_s)


ROOT = Path(__file__).resolve().parent.parent


@dataclass
class GatewayProcess:
    url: str
    process: asyncio.subprocess.Process


def gateway_env(secret: str, redis_url: str = "", **overrides: str) -> dict[str, str]:
    """The environment of a `python -m app serve` child: the test registry and roomy limits, and
    none of the caller's WELLSTREAM_ settings."""
    env = clean_env()
    env |= {"WELLSTREAM_JWT_SECRET": secret, "WELLSTREAM_WELLS": json.dumps(REGISTRY)}
    env |= {f"WELLSTREAM_AUTH__LIMITS__{key.upper()}": str(value) for key, value in ROOMY_LIMITS.items()}
    if redis_url:
        env["WELLSTREAM_REDIS_URL"] = redis_url
    return env | overrides


async def wait_for_status(
    url: str, exited: Callable[[], int | None] | None = None, verify: ssl.SSLContext | bool = True, status: int = 200
) -> None:
    """Poll `url` until it answers `status` (the caller bounds the time); `exited` says if the server died."""
    async with httpx.AsyncClient(verify=verify) as client:
        while True:
            if exited is not None and exited() is not None:
                raise RuntimeError(f"process exited before {url} answered")
            with contextlib.suppress(httpx.TransportError):
                if (await client.get(url)).status_code == status:
                    return
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def gateway_process(
    secret: str, server: str = "hypercorn", **env_overrides: str
) -> AsyncIterator[GatewayProcess]:
    """`python -m app serve` as a real child process on a free port; killed if still running at the end."""
    port = free_port()
    env = gateway_env(secret, **env_overrides)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "serve", "--server", server, "--port", str(port), cwd=ROOT, env=env
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_for_status(url + "/readyz", lambda: process.returncode)
        yield GatewayProcess(url, process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
