"""Soak: the whole system under steady load while Redis and gateways are restarted at random.

    python -m bench.soak [--duration 300] [--gateways 2] [--wells 10] [--streams-per-well 5]
                         [--rate 200] [--chaos-every 20] [--seed 1] [--out FILE]

One redis-server (AOF, appendfsync always), N `wellstream serve` processes, a paced publisher
through wellstream's Redis broker, and clients that behave like EventSource: on any end or
error they come back with Last-Event-ID, to the next gateway in turn, after the server's
retry hint (capped). Every `--chaos-every` seconds (jittered) one of: Redis SIGKILLed and
restarted after 1-4 s, Redis SIGSTOPped for 1-4 s, or a gateway SIGTERMed and restarted.

At the end the publisher stops, clients catch up, and each stream's received ids are
compared with the well's stream log from the stream's first snapshot on: missing,
duplicated, out of order. Not part of the test suite (tests/faults/ is); results in docs/faults.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from app.auth.tokens import mint_token
from app.errors import BrokerError
from app.models import Reading, StreamId, Topic
from app.streams.redis import connect_redis
from app.streams.redis.keys import log_key
from app.streams.seams import Broker
from bench.run import ROOT, clean_env, free_port

TENANT = "soak"


class Redis:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        self.cmd += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(workdir)]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.ConnectionError, redis.BusyLoadingError):
                client.ping()
                client.close()
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(10)


class Gateway:
    def __init__(self, redis_url: str, secret: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = clean_env()
        self.env |= {
            "WELLSTREAM_JWT_SECRET": secret,
            "WELLSTREAM_REDIS_URL": redis_url,
            "WELLSTREAM_REDIS__PING_INTERVAL_S": "1",
            "WELLSTREAM_HISTORY__MAX_LEN": "10000000",
            "WELLSTREAM_STREAM__HEARTBEAT_S": "5",
            "WELLSTREAM_AUTH__LIMITS__CONNECTS_PER_S": "10000",
            "WELLSTREAM_AUTH__LIMITS__CONNECT_BURST": "10000",
            "WELLSTREAM_AUTH__LIMITS__STREAMS_PER_SUBJECT": "10000",
        }
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def start(self) -> None:
        cmd = [sys.executable, "-m", "app", "serve", "--port", str(self.port), "--log-level", "WARNING"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError("gateway did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Publisher:
    broker: Broker
    wells: list[str]
    rate: int
    acknowledged: dict[str, StreamId] = field(default_factory=dict)
    published: int = 0
    refused: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        tick, n = 0.05, 0
        per_tick = max(1, round(self.rate * tick))
        next_at = time.monotonic()
        while not stop.is_set():
            batch = []
            for _ in range(per_tick):
                well = self.wells[n % len(self.wells)]
                batch.append(_reading(well, float(n)))
                n += 1
            try:
                ids = await asyncio.wait_for(self.broker.log.publish(batch), 3)
            except (BrokerError, TimeoutError):
                self.refused += len(batch)  # never acknowledged; it may or may not be in the log
            else:
                self.published += len(batch)
                for reading, stream_id in zip(batch, ids, strict=True):
                    self.acknowledged[reading.well_id] = stream_id
            next_at += tick
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))


def _reading(well: str, value: float) -> Reading:
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    return Reading(
        tenant_id=TENANT,
        well_id=well,
        tag_name="pressure",
        value=value,
        quality="GOOD",
        timestamp=stamp,
        source_protocol="simulator",
        connection_id="soak",
        unit="psi",
    )


@dataclass
class Client:
    """An EventSource, as far as resuming goes: Last-Event-ID, the retry hint, the next gateway."""

    well: str
    first_snapshot: StreamId | None = None
    ids: list[StreamId] = field(default_factory=list)
    connects: int = 0
    errors: int = 0
    resets: int = 0
    retry_ms: int = 2000

    @property
    def position(self) -> StreamId | None:
        return self.ids[-1] if self.ids else self.first_snapshot

    async def run(self, http: httpx.AsyncClient, gateways: list[Gateway], token: str, stop: asyncio.Event) -> None:
        turn = random.randrange(len(gateways))
        while not stop.is_set():
            gateway = gateways[turn % len(gateways)]
            turn += 1
            headers = {"Authorization": f"Bearer {token}"}
            if self.position is not None:
                headers["Last-Event-ID"] = str(self.position)
            self.connects += 1
            try:
                url = f"{gateway.url}/tenants/{TENANT}/wells/{self.well}/stream"
                async with http.stream("GET", url, headers=headers) as response:
                    if response.status_code != 200:
                        self.errors += 1
                    else:
                        await self._read(response)
            except httpx.HTTPError:
                self.errors += 1
            await asyncio.sleep(min(self.retry_ms, 3000) / 1000 * random.uniform(0.5, 1.0))

    async def _read(self, response: httpx.Response) -> None:
        event, stream_id = "message", ""
        async for line in response.aiter_lines():
            if line.startswith("retry:"):
                self.retry_ms = int(line[6:].strip())
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("id:"):
                stream_id = line[3:].strip()
            elif line == "":
                if event == "snapshot" and self.first_snapshot is None and not self.ids:
                    self.first_snapshot = StreamId.parse(stream_id)
                elif event == "reset":
                    self.resets += 1
                elif event == "reading":
                    self.ids.append(StreamId.parse(stream_id))
                event, stream_id = "message", ""


async def chaos(
    rng: random.Random, every_s: float, redis_server: Redis, gateways: list[Gateway], stop: asyncio.Event
) -> list[str]:
    done: list[str] = []
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s * rng.uniform(0.5, 1.5))
            break
        kind = rng.choice(["redis-kill", "redis-freeze", "gateway-restart"])
        pause = rng.uniform(1, 4)
        started = time.monotonic()
        if kind == "redis-kill":
            redis_server.signal(signal.SIGKILL)
            await asyncio.sleep(pause)
            await asyncio.to_thread(redis_server.start)
        elif kind == "redis-freeze":
            redis_server.signal(signal.SIGSTOP)
            await asyncio.sleep(pause)
            redis_server.signal(signal.SIGCONT)
        else:
            gateway = rng.choice(gateways)
            await asyncio.to_thread(gateway.stop)
            await asyncio.to_thread(gateway.start)
            gateway.restarts += 1
        done.append(f"{kind} ({time.monotonic() - started:.1f} s)")
        print(f"  chaos: {done[-1]}", flush=True)
    return done


def check(client: Client, log: list[StreamId]) -> dict[str, int]:
    start = client.first_snapshot
    expected = [i for i in log if start is None or i > start]
    received = client.ids
    seen = set(received)
    return {
        "expected": len(expected),
        "received": len(received),
        "missing": len(set(expected) - seen),
        "not_in_log": len(seen - set(expected)),
        "duplicates": len(received) - len(seen),
        "out_of_order": sum(1 for a, b in itertools.pairwise(received) if b <= a),
    }


async def soak(args: argparse.Namespace) -> dict[str, object]:
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed (make test installs it)")
    rng = random.Random(args.seed)
    random.seed(args.seed)
    secret = secrets.token_urlsafe(32)
    token = mint_token(secret, TENANT, "soak", ttl_s=int(args.duration) + 3600)
    wells = [f"well-{i:02d}" for i in range(args.wells)]
    with tempfile.TemporaryDirectory(prefix="wellstream-soak-") as tmp:
        redis_server = Redis(Path(tmp))
        redis_server.start()
        gateways = [Gateway(redis_server.url, secret, Path(tmp) / f"gateway-{i}.log") for i in range(args.gateways)]
        try:
            for gateway in gateways:
                gateway.start()
            stop_load, stop_chaos, stop_clients = asyncio.Event(), asyncio.Event(), asyncio.Event()
            limits = httpx.Limits(max_connections=None)
            async with (
                # History long enough to hold the whole run, so every stream is checked from its start.
                connect_redis(redis_server.url, max_len=10_000_000, timeout_s=2) as broker,
                httpx.AsyncClient(timeout=httpx.Timeout(10, read=30), limits=limits) as http,
            ):
                await broker.registry.register(TENANT, wells)
                clients = [Client(well) for well in wells for _ in range(args.streams_per_well)]
                client_tasks = [asyncio.create_task(c.run(http, gateways, token, stop_clients)) for c in clients]
                publisher = Publisher(broker, wells, args.rate)
                publishing = asyncio.create_task(publisher.run(stop_load))
                chaos_task = asyncio.create_task(chaos(rng, args.chaos_every, redis_server, gateways, stop_chaos))
                print(f"soak: {args.duration:.0f} s, {len(clients)} streams, {args.rate} readings/s", flush=True)
                await asyncio.sleep(args.duration)
                stop_chaos.set()
                events = await chaos_task
                await asyncio.sleep(3)  # let the last fault settle before the load stops
                stop_load.set()
                await publishing
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    behind = [
                        c
                        for c in clients
                        if c.well in publisher.acknowledged
                        and (c.position is None or c.position < publisher.acknowledged[c.well])
                    ]
                    if not behind:
                        break
                    await asyncio.sleep(0.2)
                stop_clients.set()
                for task in client_tasks:
                    task.cancel()
                await asyncio.gather(*client_tasks, return_exceptions=True)
            with redis.Redis(port=redis_server.port, socket_timeout=10) as r:
                logs = {
                    well: [StreamId.parse(raw.decode()) for raw, _ in r.xrange(log_key(Topic(TENANT, well)))]
                    for well in wells
                }
        finally:
            for gateway in gateways:
                gateway.stop()
            redis_server.stop()
    per_stream = [check(c, logs[c.well]) for c in clients]
    totals = {key: sum(s[key] for s in per_stream) for key in per_stream[0]}
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "command": "python -m bench.soak " + " ".join(sys.argv[1:]),
        "duration_s": args.duration,
        "streams": len(clients),
        "gateways": args.gateways,
        "rate": args.rate,
        "published_acknowledged": publisher.published,
        "publish_refused": publisher.refused,
        "in_logs": sum(map(len, logs.values())),
        "faults": events,
        "reconnects": sum(c.connects - 1 for c in clients),
        "connect_errors": sum(c.errors for c in clients),
        "resets": sum(c.resets for c in clients),
        "streams_with_loss": sum(1 for s in per_stream if s["missing"]),
        "streams_with_duplicates": sum(1 for s in per_stream if s["duplicates"]),
        **{f"total_{k}": v for k, v in totals.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=300)
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--wells", type=int, default=10)
    parser.add_argument("--streams-per-well", type=int, default=5)
    parser.add_argument("--rate", type=int, default=200, help="readings/s over all wells")
    parser.add_argument("--chaos-every", type=float, default=20, help="mean seconds between faults")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the result as JSON here too")
    args = parser.parse_args()
    result = asyncio.run(soak(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
