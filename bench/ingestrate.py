"""Ingest publish throughput: readings/s `RedisStreamLog.publish` stores on one redis-server and on a Redis Cluster.

    python -m bench.ingestrate [--ingest T:K,...] [--ingest-duration S] [--ingest-rounds N] [--ingest-batch B]
    python -m bench --ingest T:K,...        # the same table after the fan-out benchmark's

Per case (T tenants, K concurrent publishers), three variants measured in the same way:

- `standalone`: one redis-server, no replica (the default `min_replicas_ack` finds none: no WAIT);
- `cluster-ack0`: a six-node Redis Cluster (three primaries, one replica each), no WAIT;
- `cluster`: the same cluster with the default `min_replicas_ack` (WAIT for 1 replica per batch).

Each variant's publisher process starts and warms up first; then the variants take turns,
`--ingest-rounds` windows each (the first of each round rotating), `--ingest-duration` seconds
in all: a neighbour's load that comes or goes mid-case (the machine is shared) lands on all three.

A publisher is what one ingest worker runs: its own broker (`connect_redis`, its own pool) and
one batch at a time, awaited, each with the next seqs of its own producer id (so the dedupe
key is written as in production). A batch is `--ingest-batch` readings (default 500: the ingest
worker's `Publisher(max_batch=500)`, the size it sends under load), spread round-robin over
T tenants x 10 wells; the readings are built once, so the publisher's CPU is publish() itself
(to_json, keys, the script call and the WAIT). The K publishers share one process and one event
loop: K > 1 overlaps round trips, it does not add a core.

Layout (2 cores): the publisher processes on core 1; every redis-server (the standalone and
all six cluster nodes) on core 0, each of their threads pinned. Redis gets the same one core
in every variant, so this machine cannot show a cluster adding server capacity, only what each
variant costs per reading on the client and on the servers (the µs/reading columns), from
which the capacity of real machines follows (a core per primary).

Everything listens on 127.0.0.1; every wait is bounded; the servers and publishers are stopped
on the way out, an interrupt included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import secrets
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

import psutil
import redis
from redis.crc import key_slot

from app.errors import BrokerError
from app.models import Origin, Reading, utc_now_iso
from app.streams.redis import connect_redis
from app.streams.redis.keys import clock_key
from app.streams.seams import StreamLog

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
WELLS_PER_TENANT = 10
BATCH = 500  # app/ingest/publisher.py: Publisher(max_batch=500), which the worker keeps
BATCHES_PER_PUBLISHER = 4  # distinct batches each publisher cycles through
PUBLISHER_CORE, REDIS_CORE = 1, 0
# T:K cases. Full: one tenant (one slot, so a cluster cannot spread it) against 30 (spread over
# the three primaries as their slots fall), each with one publisher (one ingest worker, whose
# round trip bounds it) and eight (round trips overlapped). Quick: the case a cluster is for.
FULL_CASES = [(1, 1), (1, 8), (30, 1), (30, 8)]
QUICK_CASES = [(30, 8)]
ROUNDS = 5  # windows per variant and case, taken in turns
READY_TIMEOUT_S = 60.0  # a publisher's connect and warm-up batch
RESULT_GRACE_S = 60.0  # past the window: the last batches, percentiles, a slow shared machine


@dataclass(frozen=True)
class Variant:
    name: str
    cluster: bool
    min_replicas_ack: int | None  # None: wellstream's default (1 where the primary has replicas)


VARIANTS = [
    Variant("standalone", cluster=False, min_replicas_ack=None),
    Variant("cluster-ack0", cluster=True, min_replicas_ack=0),
    Variant("cluster", cluster=True, min_replicas_ack=None),
]


@dataclass
class IngestResult:
    variant: str
    tenants: int
    publishers: int
    batch: int
    readings_per_s: float
    vs_standalone: float
    p50_ms: float
    p99_ms: float
    batches: int
    errors: int
    publisher_cpu_pct: float
    publisher_us_per_reading: float
    # Per primary (the standalone's one server), in port order; replicas summed: what the
    # servers cost, not what they could take (they all share one core here).
    primaries_cpu_pct: str
    replicas_cpu_pct: float
    redis_us_per_reading: float
    busiest_primary_us_per_reading: float
    tenants_per_primary: str


# -- the publisher process (`python -m bench.ingestrate publish ...`)


def tenant_names(count: int) -> list[str]:
    return [f"tenant-{n:02d}" for n in range(count)]


def build_batches(tenants: Sequence[str], batch: int, count: int) -> list[list[Reading]]:
    """`count` batches of `batch` readings, round-robin over every tenant and each tenant's wells."""
    stamp = utc_now_iso()
    wells = [f"well-{n:02d}" for n in range(1, WELLS_PER_TENANT + 1)]
    batches = []
    for b in range(count):
        readings = []
        for r in range(batch):
            g = b * batch + r
            readings.append(
                Reading(
                    tenant_id=tenants[g % len(tenants)],
                    well_id=wells[(g // len(tenants)) % len(wells)],
                    tag_name=f"tag{(g // (len(tenants) * len(wells))) % 4}",
                    value=float(g),
                    quality="GOOD",
                    timestamp=stamp,
                    source_protocol="simulator",
                    connection_id="bench",
                    unit="psi",
                )
            )
        batches.append(readings)
    return batches


class Producer:
    """One ingest worker's publishing: its producer id and its next seq."""

    def __init__(self, log: StreamLog, batches: list[list[Reading]]) -> None:
        self.log = log
        self.batches = batches
        self.producer = secrets.token_hex(8)
        self.next_seq = 1
        self.turn = 0

    async def publish_next(self) -> int:
        """Publish the next batch (fresh seqs, so none is skipped as a resend); readings stored."""
        batch = self.batches[self.turn % len(self.batches)]
        self.turn += 1
        origin = Origin(self.producer, tuple(range(self.next_seq, self.next_seq + len(batch))))
        self.next_seq += len(batch)
        return len(await self.log.publish(batch, origin))


async def serve_windows(
    url: str,
    cluster: bool,
    min_replicas_ack: int | None,
    tenants: int,
    publishers: int,
    batch: int,
    commands: IO[str],
    out: IO[str],
) -> None:
    """Connect and warm up, say `ready`, then publish for a window on each `go SECONDS` (its
    figures as one JSON line), and on `end` report the batch latency percentiles of every window."""
    names = tenant_names(tenants)
    async with contextlib.AsyncExitStack() as stack:
        producers = []
        for _ in range(publishers):
            broker = await stack.enter_async_context(
                connect_redis(url, cluster=cluster, min_replicas_ack=min_replicas_ack)
            )
            producers.append(Producer(broker.log, build_batches(names, batch, BATCHES_PER_PUBLISHER)))
        # Warm-up outside the windows: connections, the slot map, the scripts loaded on every
        # node, and the replica count the default min_replicas_ack asks each primary for.
        await asyncio.gather(*(p.publish_next() for p in producers))
        say(out, "ready")
        latencies = array("d")
        while True:
            command = (await asyncio.to_thread(commands.readline)).split()
            if not command or command[0] != "go":
                break
            say(out, json.dumps(await window(producers, float(command[1]), latencies)))
    ordered = sorted(latencies)
    say(out, json.dumps({"p50_s": percentile(ordered, 0.50), "p99_s": percentile(ordered, 0.99)}))


def say(out: IO[str], line: str) -> None:
    out.write(line + "\n")
    out.flush()


async def window(producers: Sequence[Producer], seconds: float, latencies: array[float]) -> dict[str, float]:
    """Every producer publishing back to back for `seconds`; a batch under way at the end finishes
    and counts (so `elapsed_s` runs to the last answer, not to the deadline)."""
    loop = asyncio.get_running_loop()
    stored = errors = batches = 0
    cpu0, t0 = time.process_time(), loop.time()
    last_done = t0
    deadline = t0 + seconds

    async def publisher(producer: Producer) -> None:
        nonlocal stored, errors, batches, last_done
        while loop.time() < deadline:
            began = time.perf_counter()
            try:
                # Not `stored += await ...`: that reads `stored` before the await, and the other
                # publishers' additions made meanwhile would be lost.
                got = await producer.publish_next()
            except BrokerError:
                # Counted, not retried: a WAIT that timed out is a result here. The pause keeps a
                # dead server from turning the window into a hot loop.
                errors += 1
                await asyncio.sleep(0.01)
                continue
            latencies.append(time.perf_counter() - began)
            stored += got
            batches += 1
            last_done = loop.time()

    await asyncio.gather(*(publisher(p) for p in producers))
    return {
        "stored": stored,
        "elapsed_s": last_done - t0,
        "batches": batches,
        "errors": errors,
        "cpu_s": time.process_time() - cpu0,
    }


def percentile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else math.nan


def publish_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ingestrate publish")
    parser.add_argument("--url", required=True)
    parser.add_argument("--cluster", action="store_true")
    parser.add_argument("--min-replicas-ack", type=int, default=None)
    parser.add_argument("--tenants", type=int, required=True)
    parser.add_argument("--publishers", type=int, required=True)
    parser.add_argument("--batch", type=int, default=BATCH)
    args = parser.parse_args(argv)
    asyncio.run(
        serve_windows(
            args.url, args.cluster, args.min_replicas_ack, args.tenants, args.publishers, args.batch,
            sys.stdin, sys.stdout,
        )
    )  # fmt: skip


# -- the servers


def pin(pid: int, core: int) -> None:
    """Every thread of `pid` to `core` (threads it starts later inherit it); on one core, nothing.

    Per thread: sched_setaffinity(pid) would move only the main thread, and redis-server's
    background threads (lazy free, close) would still run on the publisher's core.
    """
    if (os.cpu_count() or 1) < 2:
        return
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), {core})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Servers:
    """The redis-servers of one variant: where to connect, which processes are primaries."""

    url: str
    primaries: list[psutil.Process]  # port order
    replicas: list[psutil.Process]
    tenants_per_primary: dict[int, str]  # tenants -> "12/10/8" in the primaries' order; "" standalone
    flush: list[redis.Redis]  # a client per primary

    def everyone(self) -> list[psutil.Process]:
        return [*self.primaries, *self.replicas]


@contextlib.contextmanager
def standalone(workdir: Path) -> Iterator[Servers]:
    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", HOST, "--dir", str(workdir)]
    cmd += ["--save", "", "--appendonly", "no", "--logfile", str(workdir / "standalone.log")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host=HOST, port=port, socket_timeout=5)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on {port} did not start (see {workdir}/standalone.log)") from None
                time.sleep(0.05)
        pin(proc.pid, REDIS_CORE)
        yield Servers(f"redis://{HOST}:{port}/0", [psutil.Process(proc.pid)], [], {}, [client])
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def cluster(workdir: Path, tenant_counts: Sequence[int]) -> Iterator[Servers]:
    # tests/cluster.py imports only the stdlib and redis (no pytest): the cluster the fault tests
    # break is the one measured here, started by the same code (ports below 55536, retried on a
    # port clash, healthy only once every replica has synced).
    from tests.cluster import LocalCluster  # here: `python -m bench` without cluster rows never imports tests/

    local = LocalCluster(workdir)
    clients: list[redis.Redis] = []
    try:
        local.start()
        views = sorted(local.primaries(), key=lambda view: view.port)
        process = {node.port: node.process for node in local.nodes}
        primaries, replicas = [], []
        for node in local.nodes:
            assert node.process is not None
            pin(node.process.pid, REDIS_CORE)
        for view in views:
            popen = process[view.port]
            assert popen is not None
            primaries.append(psutil.Process(popen.pid))
            clients.append(redis.Redis(host=HOST, port=view.port, socket_timeout=5))
        for node in local.nodes:
            if node.port not in {view.port for view in views} and node.process is not None:
                replicas.append(psutil.Process(node.process.pid))
        spread = {}
        for count in tenant_counts:
            slots = [key_slot(clock_key(tenant).encode()) for tenant in tenant_names(count)]
            spread[count] = "/".join(str(sum(view.owns(slot) for slot in slots)) for view in views)
        yield Servers(local.startup_url, primaries, replicas, spread, clients)
    finally:
        for client in clients:
            client.close()
        local.stop()


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def read_line(stream: IO[str], timeout_s: float, what: str) -> str:
    """One line from a child's stdout within `timeout_s` (it writes whole lines, then flushes)."""
    ready, _, _ = select.select([stream], [], [], timeout_s)
    if not ready:
        raise RuntimeError(f"{what}: nothing within {timeout_s} s")
    line = stream.readline()
    if not line:
        raise RuntimeError(f"{what}: the publisher exited")
    return line


@dataclass
class Tally:
    """One variant's windows of one case, added up."""

    stored: int = 0
    elapsed_s: float = 0.0  # the publisher's: first batch sent to last answer, per window
    wall_s: float = 0.0  # the parent's: "go" to the window's report, over which servers' CPU is read
    batches: int = 0
    errors: int = 0
    cpu_s: float = 0.0
    server_cpu_s: list[float] = field(default_factory=list)  # Servers.everyone() order


class PublisherProcess:
    """`python -m bench.ingestrate publish` for one variant, on the publisher's core, driven window by window."""

    def __init__(self, variant: Variant, servers: Servers, tenants: int, publishers: int, batch: int) -> None:
        self.variant, self.servers = variant, servers
        self.tally = Tally(server_cpu_s=[0.0] * len(servers.everyone()))
        cmd = [sys.executable, "-m", "bench.ingestrate", "publish", "--url", servers.url]
        cmd += ["--tenants", str(tenants), "--publishers", str(publishers), "--batch", str(batch)]
        cmd += ["--cluster"] if variant.cluster else []
        if variant.min_replicas_ack is not None:
            cmd += ["--min-replicas-ack", str(variant.min_replicas_ack)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("WELLSTREAM_")}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        pin(self.proc.pid, PUBLISHER_CORE)  # before its imports finish: any thread it starts inherits the core

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _read(self, timeout_s: float, what: str) -> str:
        assert self.proc.stdout is not None
        return read_line(self.proc.stdout, timeout_s, f"{self.variant.name} publisher: {what}")

    def ready(self) -> None:
        if self._read(READY_TIMEOUT_S, "warm-up").strip() != "ready":
            raise RuntimeError(f"{self.variant.name} publisher: unexpected output before the first window")

    def window(self, seconds: float) -> None:
        """One window, with every server's CPU read around it."""
        servers = self.servers.everyone()
        before, t0 = [cpu_seconds(p) for p in servers], time.monotonic()
        self._send(f"go {seconds}")
        stats = json.loads(self._read(seconds + RESULT_GRACE_S, "window"))
        wall, after = time.monotonic() - t0, [cpu_seconds(p) for p in servers]
        t = self.tally
        t.stored += int(stats["stored"])
        t.elapsed_s += stats["elapsed_s"]
        t.wall_s += wall
        t.batches += int(stats["batches"])
        t.errors += int(stats["errors"])
        t.cpu_s += stats["cpu_s"]
        t.server_cpu_s = [used + b - a for used, a, b in zip(t.server_cpu_s, before, after, strict=True)]

    def finish(self) -> dict[str, float]:
        """Batch latency percentiles over every window; the process exits."""
        self._send("end")
        percentiles: dict[str, float] = json.loads(self._read(30, "percentiles"))
        self.proc.wait(30)
        return percentiles

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def result_of(variant: Variant, servers: Servers, case: tuple[int, int], batch: int, publisher: PublisherProcess,
              percentiles: dict[str, float]) -> IngestResult:  # fmt: skip
    t = publisher.tally
    used, elapsed = t.server_cpu_s, t.elapsed_s
    primaries, replicas = used[: len(servers.primaries)], used[len(servers.primaries) :]

    def per_reading(seconds: float) -> float:
        """CPU per reading stored: independent of how long either side's window was."""
        return round(1e6 * seconds / t.stored, 2) if t.stored else math.nan

    return IngestResult(
        variant=variant.name,
        tenants=case[0],
        publishers=case[1],
        batch=batch,
        readings_per_s=round(t.stored / elapsed) if elapsed > 0 else math.nan,
        vs_standalone=math.nan,
        p50_ms=round(percentiles["p50_s"] * 1000, 1),
        p99_ms=round(percentiles["p99_s"] * 1000, 1),
        batches=t.batches,
        errors=t.errors,
        publisher_cpu_pct=round(100 * t.cpu_s / elapsed, 1) if elapsed > 0 else math.nan,
        publisher_us_per_reading=per_reading(t.cpu_s),
        primaries_cpu_pct="/".join(f"{100 * s / t.wall_s:.0f}" for s in primaries),
        replicas_cpu_pct=round(100 * sum(replicas) / t.wall_s, 1),
        redis_us_per_reading=per_reading(sum(used)),
        busiest_primary_us_per_reading=per_reading(max(primaries)),
        tenants_per_primary=servers.tenants_per_primary.get(case[0], ""),
    )


def run_case(
    case: tuple[int, int], alone: Servers, many: Servers, duration_s: float, rounds: int, batch: int
) -> list[IngestResult]:
    """The three variants of one case, in `rounds` windows each, taking turns (the first of each
    round rotating): a neighbour's load that comes or goes mid-case lands on all three alike."""
    for servers in (alone, many):  # each case from empty streams (replicas follow their primary)
        for client in servers.flush:
            client.flushall()
    with contextlib.ExitStack() as stack:
        publishers = []
        for variant in VARIANTS:
            publisher = PublisherProcess(variant, many if variant.cluster else alone, *case, batch)
            stack.callback(publisher.kill)
            publishers.append(publisher)
        for publisher in publishers:
            publisher.ready()
        for turn in range(rounds):
            for publisher in publishers[turn % 3 :] + publishers[: turn % 3]:
                publisher.window(duration_s / rounds)
        results = [result_of(p.variant, p.servers, case, batch, p, p.finish()) for p in publishers]
    base = results[0].readings_per_s  # VARIANTS[0] is the standalone
    for result in results:
        result.vs_standalone = round(result.readings_per_s / base, 2) if base else math.nan
    return results


def run_ingest(
    cases: Sequence[tuple[int, int]], duration_s: float, rounds: int = ROUNDS, batch: int = BATCH
) -> list[IngestResult]:
    """Every case against every variant; a standalone redis-server and a cluster, both up throughout."""
    if not cases:
        return []
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        raise RuntimeError("redis-server and redis-cli are needed (`make test` installs them)")
    results: list[IngestResult] = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        alone = stack.enter_context(standalone(Path(tmp)))
        many = stack.enter_context(cluster(Path(tmp) / "cluster", [t for t, _ in cases]))
        for case in cases:
            for result in run_case(case, alone, many, duration_s, rounds, batch):
                results.append(result)
                print(json.dumps(asdict(result)), flush=True)
    return results


COLUMNS = [
    ("variant", "variant"), ("tenants", "T"), ("publishers", "K"), ("batch", "batch"),
    ("readings_per_s", "readings/s"), ("vs_standalone", "vs standalone"), ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"), ("errors", "errors"), ("publisher_cpu_pct", "publisher CPU %"),
    ("publisher_us_per_reading", "publisher µs/reading"), ("primaries_cpu_pct", "primaries CPU %"),
    ("replicas_cpu_pct", "replicas CPU %"), ("redis_us_per_reading", "redis µs/reading"),
    ("busiest_primary_us_per_reading", "busiest primary µs/reading"), ("tenants_per_primary", "tenants per primary"),
]  # fmt: skip


def table(results: Sequence[IngestResult], duration_s: float, rounds: int = ROUNDS) -> str:
    lines = [
        f"Ingest publish throughput ({duration_s:g} s per row in {rounds} windows, the variants taking turns; "
        f"publisher on core {PUBLISHER_CORE}, "
        f"every redis-server on core {REDIS_CORE}; T tenants, K concurrent publishers)",
        "",
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for result in results:
        row = asdict(result)
        lines.append("| " + " | ".join(str(row[key]) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def cases_of(text: str | None, quick: bool = False, chosen: bool = False) -> list[tuple[int, int]]:
    """ "T:K,..." -> [(T, K), ...]; '' for none; None: the default set (none when other rows were named)."""
    if text is None:
        return [] if chosen else QUICK_CASES if quick else FULL_CASES
    return [(int(t), int(k)) for t, k in (case.split(":") for case in text.split(",") if case)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ingest",
        default=None,
        help="T:K ingest throughput cases (T tenants, K concurrent publishers; bench/ingestrate.py), e.g. 1:1,30:8; "
        "'' for none (default without --scenarios: 1:1,1:8,30:1,30:8, about 2.5 min; --quick: 30:8)",
    )
    parser.add_argument("--ingest-duration", type=float, default=10, help="seconds of publishing per ingest row")
    parser.add_argument("--ingest-rounds", type=int, default=ROUNDS, help="windows per ingest row, variants in turn")
    parser.add_argument("--ingest-batch", type=int, default=BATCH, help="readings per published batch")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["publish"]:
        publish_main(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="python -m bench.ingestrate", description=__doc__.split("\n")[0])
    add_arguments(parser)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    began = time.monotonic()
    cases = cases_of(args.ingest, args.quick)
    results = run_ingest(cases, args.ingest_duration, args.ingest_rounds, args.ingest_batch)
    print(table(results, args.ingest_duration, args.ingest_rounds))
    print(f"\n({time.monotonic() - began:.0f} s)")


if __name__ == "__main__":
    main()
