"""The fan-out benchmark: one command, wellstream and the baseline in the same run.

    python -m bench [--quick] [--systems a,b] [--scenarios N:R,N:R] [--duration S] [--out FILE]

Layout (the machine has 2 cores): the gateway under test is pinned to core 1; redis-server,
the publisher and the load generator share core 0. 100 wells; N streams spread evenly over
them; R readings/s published through wellstream's own broker code. Each scenario gets a
fresh gateway process. All traffic stays on 127.0.0.1; every phase is bounded in time.

`nchan` is nginx's pub/sub module on the same Redis, pinned to core 1 like the gateways (one
worker), fed the same readings over HTTP (bench/nchan.py): the peer wellstream's per-event cost
and admission are compared with in the same run (the "against nchan" table after the results).

The `-2w` systems run `serve --workers 2` on cores 0 and 1: one worker per core, so one of
them shares core 0 with redis-server, the publisher and the load generator (whose CPU the
table shows). Measured against a one-worker row, that is a floor of what a second core adds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from array import array
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil

from app.auth.tokens import mint_token
from bench import ingestrate

ROOT = Path(__file__).resolve().parent.parent
WELLS = 100
TENANT = "bench"
STREAMS_PER_WORKER = 5000

SYSTEMS: dict[str, tuple[list[str], dict[str, str]]] = {
    # name: (command, extra environment)
    "wellstream-hypercorn": (["-m", "app", "serve", "--server", "hypercorn"], {}),
    "wellstream-uvicorn": (["-m", "app", "serve", "--server", "uvicorn"], {}),
    "wellstream-granian": (["-m", "app", "serve", "--server", "granian"], {}),
    "baseline": (["-m", "bench.baseline"], {}),
    # Becomes nginx (exec): the pid gateway() pins and measures is nginx's master, its worker the child.
    "nchan": (["-m", "bench.nchan", "serve"], {}),
}
# Not wellstream: no twin from a --before checkout, and no stream of many wells (nchan's would be
# a multiplexed subscriber of at most 255 channels, configured per well list: not set up here).
PEERS = ("baseline", "nchan")
SYSTEMS["wellstream-granian-h2"] = (SYSTEMS["wellstream-granian"][0], {"WELLSTREAM_SERVER__GRANIAN_HTTP2": "true"})
for _name in ("hypercorn", "uvicorn", "granian"):
    SYSTEMS[f"wellstream-{_name}-2w"] = ([*SYSTEMS[f"wellstream-{_name}"][0], "--workers", "2"], {})
DEFAULT_GC = {"WELLSTREAM_SERVER__GC_THRESHOLD": "null", "WELLSTREAM_SERVER__GC_FREEZE": "false"}
for _name in ("hypercorn", "uvicorn", "granian"):
    SYSTEMS[f"wellstream-{_name}-defaultgc"] = (SYSTEMS[f"wellstream-{_name}"][0], DEFAULT_GC)
# The goal rows, plus where the baseline stops keeping up (2000-5000 streams at 1000 readings/s)
# and wellstream's capacity at twice the goal rate.
FULL = [(1000, 100), (1000, 1000), (2000, 1000), (3000, 1000), (5000, 1000), (10000, 500), (10000, 1000), (10000, 2000)]
QUICK = [(1000, 100), (1000, 1000), (2000, 1000)]
# Streams of many wells (N clients x R readings/s x W wells each), and streams opened while readings flow
# (admission under load, as after a gateway restart): run by default unless --multi/--while-publishing say otherwise.
FULL_MULTI = [(100, 300, 300), (1000, 1000, 100)]
QUICK_MULTI = [(100, 300, 300)]
FULL_WHILE_PUBLISHING = [(5000, 500)]
BASELINE_MAX_STREAMS = 5000  # it cannot open more within the ramp limit (docs/performance.md); skip the rest


@dataclass
class Result:
    system: str
    streams: int
    rate: int
    opened: int
    open_s: float
    expected_eps: float
    delivered_eps: float
    loss_pct: float
    dropped: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    rss_mib: float
    kib_per_stream: float
    cpu_pct: float
    loadgen_cpu_pct: float
    publisher_lag_ms: float
    silent: int = 0
    while_publishing: bool = False
    wells: int = WELLS
    multi: bool = False
    # redis-server's CPU over the same window: not in `cpu_pct` for any system, and nchan keeps
    # more of its work there (a script call per message published, its message store).
    redis_cpu_pct: float = math.nan
    # CPU time per event received, from one window's CPU and event count: a publisher that fell
    # behind (its readings spread past `duration_s`) must not make a system look cheaper.
    cpu_us_per_event: float = math.nan
    redis_us_per_event: float = math.nan


def clean_env() -> dict[str, str]:
    """This process's environment without any WELLSTREAM_ setting: a child sees only what we give it."""
    return {k: v for k, v in os.environ.items() if not k.startswith("WELLSTREAM_")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pinned(cores: int | str, argv: list[str]) -> list[str]:
    """Pin to `cores` (one, or a taskset list such as "0,1") where there are two or more (the
    layout the figures are defined for)."""
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", str(cores), *argv]
    return argv


def workers_of(args: list[str]) -> int:
    return int(args[args.index("--workers") + 1]) if "--workers" in args else 1


def wait_for_workers(process: psutil.Process, count: int, port: int, timeout_s: float) -> None:
    """Until `count` worker processes listen on `port`: streams opened sooner would all go to the first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        listening = 0
        for child in process.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                connections = child.net_connections(kind="tcp")
                listening += any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections)
        if listening >= count:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{count} workers not listening on {port} after {timeout_s} s")


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[tuple[str, psutil.Process]]:
    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(pinned(0, [*cmd, "--dir", str(workdir)]), stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port, 10)
        yield f"redis://127.0.0.1:{port}/0", psutil.Process(proc.pid)  # taskset execs: this is redis-server
    finally:
        proc.terminate()
        proc.wait(10)


def wait_for_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout_s} s")


def wait_healthy(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if sock.recv(64).startswith(b"HTTP/1.1 200"):
                return
        time.sleep(0.1)
    raise RuntimeError(f"gateway on {port} not healthy after {timeout_s} s")


@contextlib.contextmanager
def gateway(
    system: str, redis_url: str, secret: str, wells: int = WELLS, log_name: str | None = None
) -> Iterator[tuple[int, psutil.Process]]:
    # "NAME@DIR": the same system run from another checkout (`python -m app` imports the app of its cwd),
    # so a change is measured against the code before it in one run.
    name, _, tree_dir = system.partition("@")
    args, extra = SYSTEMS[name]
    port = free_port()
    env = clean_env()
    env |= {
        "WELLSTREAM_REDIS_URL": redis_url,
        "WELLSTREAM_JWT_SECRET": secret,
        "WELLSTREAM_HISTORY__MAX_LEN": "1000",
        "WELLSTREAM_HISTORY__MAX_AGE_S": "0",
        "WELLSTREAM_STREAM__QUEUE_SIZE": "4096",
        # The load generator is one subject at one address opening 10,000 streams at once:
        # the production caps (app/auth/admission.py) would refuse all but a few dozen.
        "WELLSTREAM_AUTH__LIMITS__STREAMS_PER_SUBJECT": "1000000",
        "WELLSTREAM_AUTH__LIMITS__STREAMS_PER_TENANT": "1000000",
        "WELLSTREAM_AUTH__LIMITS__STREAMS_PER_PROCESS": "1000000",
        "WELLSTREAM_AUTH__LIMITS__CONNECTS_PER_S": "1000000",
        "WELLSTREAM_AUTH__LIMITS__CONNECT_BURST": "1000000",
        # Streams open before the first reading: the wells must be in the registry (else 404).
        "WELLSTREAM_WELLS": json.dumps({TENANT: [f"well-{n:03d}" for n in range(1, wells + 1)]}),
        **extra,
    }
    cmd = [sys.executable, *args, "--port", str(port)]
    if system == "baseline":
        cmd += ["--redis-url", redis_url]
    workers = workers_of(args)
    cores = 1 if workers == 1 else ",".join(str(core) for core in range(workers))
    # BENCH_GATEWAY_LOGS=DIR keeps the gateway's output (<system>-<scenario>.log) and a last /metrics scrape per run:
    # a row's `dropped` or `silent` only says that streams ended, the gateway's counters say why.
    logs_dir = Path(os.environ["BENCH_GATEWAY_LOGS"]) if os.environ.get("BENCH_GATEWAY_LOGS") else None
    log_path = None
    if logs_dir is not None and log_name is not None:
        log_path = unused_path(logs_dir, f"{system.replace('/', '_')}-{log_name}")
    with contextlib.ExitStack() as files:
        log = files.enter_context(Path(f"{log_path}.log").open("wb")) if log_path else None
        # Our log goes to stderr; granian writes its own lines (e.g. "ASGI transport error") to stdout.
        proc = subprocess.Popen(
            pinned(cores, cmd), cwd=tree_dir or ROOT, env=env, stdout=log, stderr=log or subprocess.DEVNULL
        )
        try:
            wait_healthy(port, 30)
            if workers > 1:
                wait_for_workers(psutil.Process(proc.pid), workers, port, 30)
            yield port, psutil.Process(proc.pid)
        finally:
            if log_path is not None:
                # Before the stop: a drain ends every stream, which would blur the counts of the run itself.
                save_metrics(port, Path(f"{log_path}.metrics"))
            stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def unused_path(directory: Path, stem: str) -> Path:
    """DIR/STEM, or DIR/STEM-2, -3 ... (to be suffixed .log, .metrics): runs into one directory keep every run."""
    directory.mkdir(parents=True, exist_ok=True)
    path, n = directory / stem, 1
    while Path(f"{path}.log").exists():
        n += 1
        path = directory / f"{stem}-{n}"
    return path


def save_metrics(port: int, path: Path) -> None:
    """The gateway's /metrics (served to loopback peers without a token) into `path`; a failed
    scrape is written there instead of failing the run. With --workers a scrape reaches one worker."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            path.write_bytes(response.read())
    except OSError as exc:
        path.write_text(f"# scrape failed: {exc!r}\n")


def tree(process: psutil.Process) -> list[psutil.Process]:
    return [process, *process.children(recursive=True)]


def rss(process: psutil.Process) -> int:
    return sum(p.memory_info().rss for p in tree(process))


def cpu_seconds(process: psutil.Process) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in tree(process))


def percentile(ordered: array[float] | list[float], q: float) -> float:
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_profile(
    profile_dir: Path | None, system: str, streams: int, rate: int, pid: int, duration_s: float
) -> subprocess.Popen[bytes] | None:
    """py-spy on the gateway for the middle of the publishing window (a flame graph SVG)."""
    if profile_dir is None:
        return None
    profile_dir.mkdir(parents=True, exist_ok=True)
    raw = os.environ.get("BENCH_PROFILE_FORMAT") == "raw"  # collapsed stacks, for reading by script
    out = profile_dir / f"{system}-{streams}-{rate}.{'txt' if raw else 'svg'}"
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    cmd = [spy, "record", "--nonblocking", "--rate", "100", "--pid", str(pid), "-o", str(out)]
    cmd += ["--duration", str(max(1, int(duration_s) - 2))] + (["--format", "raw"] if raw else [])
    return subprocess.Popen(pinned(0, cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def publisher(system: str, port: int, redis_url: str, rate: int, duration_s: float, wells: int = WELLS) -> list[str]:
    if system == "nchan":
        # nchan takes messages only over HTTP: the same readings at the same moments, POSTed to it.
        cmd = [sys.executable, "-m", "bench.nchan", "publish", "--port", str(port)]
    else:
        cmd = [sys.executable, "-m", "bench.publish", "--redis-url", redis_url]
    return pinned(0, [*cmd, "--tenant", TENANT, "--wells", str(wells), "--rate", str(rate),
                      "--duration", str(duration_s)])  # fmt: skip


@dataclass(frozen=True)
class Scenario:
    """One row: `streams` clients, `rate` readings/s over `wells` wells. `multi`: each client
    opens one stream of every well (GET /tenants/{t}/stream) instead of one well's stream.
    `while_publishing`: readings flow while the streams connect (as after a gateway restart
    under load), so admission is measured against live traffic, not an idle gateway."""

    streams: int
    rate: int
    wells: int = WELLS
    multi: bool = False
    while_publishing: bool = False


def run_scenario(
    system: str,
    scenario: Scenario,
    redis_url: str,
    secret: str,
    duration_s: float,
    workdir: Path,
    profile_dir: Path | None = None,
    redis: psutil.Process | None = None,
) -> Result:
    streams, rate, wells, while_publishing = scenario.streams, scenario.rate, scenario.wells, scenario.while_publishing
    # The readings come from the system's own checkout too: the Redis layout may differ between them.
    tree = system.partition("@")[2] or ROOT
    token = mint_token(secret, TENANT, "bench", ttl_s=3600)
    label = f"{streams}-{rate}" + (f"-{wells}w-multi" if scenario.multi else "") + ("-wp" if while_publishing else "")
    with gateway(system, redis_url, secret, wells, label) as (port, server):
        time.sleep(0.5)
        rss_before = rss(server)
        workers = []
        background = None
        if while_publishing:
            background = subprocess.Popen(
                publisher(system, port, redis_url, rate, 3600, wells), cwd=tree, stdout=subprocess.DEVNULL, text=True
            )
            time.sleep(1)  # readings flow before the first stream connects
        started = time.monotonic()
        for index, first in enumerate(range(0, streams, STREAMS_PER_WORKER)):
            count = min(STREAMS_PER_WORKER, streams - first)
            cmd = [sys.executable, "-m", "bench.loadgen", "--port", str(port), "--streams", str(count)]
            cmd += ["--first", str(first), "--wells", str(wells), "--tenant", TENANT, "--token", token]
            cmd += ["--tenant-stream"] if scenario.multi else []
            cmd += ["--samples", str(workdir / f"lat-{index}.bin")]
            workers.append(
                subprocess.Popen(pinned(0, cmd), cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )
        opened = [json.loads(w.stdout.readline() or "{}") for w in workers]  # type: ignore[union-attr]
        open_s = time.monotonic() - started
        connected = sum(o.get("opened", 0) for o in opened)
        if connected < streams:
            # Refused streams (limits, an unknown well) would make every later figure meaningless.
            print(f"WARNING: {system}: only {connected} of {streams} streams opened", file=sys.stderr, flush=True)
        time.sleep(2)
        rss_after = rss(server)
        for w in workers:
            w.stdin.write('{"cmd": "measure"}\n')  # type: ignore[union-attr]
            w.stdin.flush()  # type: ignore[union-attr]
        loadgens = [psutil.Process(w.pid) for w in workers]
        load_before = sum(cpu_seconds(p) for p in loadgens)
        redis_before = cpu_seconds(redis) if redis is not None else math.nan
        cpu_before, t0 = cpu_seconds(server), time.monotonic()
        profiler = start_profile(profile_dir, system, streams, rate, server.pid, duration_s)
        if background is None:
            pub = subprocess.run(
                publisher(system, port, redis_url, rate, duration_s, wells), cwd=tree, capture_output=True, text=True,
                check=True, timeout=duration_s + 60,
            )  # fmt: skip
            published = json.loads(pub.stdout)
            time.sleep(1.0)  # let queued frames arrive
        else:
            time.sleep(duration_s)
            published = {"published": rate * duration_s, "max_lag_ms": math.nan}
        cpu_after, t1 = cpu_seconds(server), time.monotonic()
        load_after = sum(cpu_seconds(p) for p in loadgens)
        redis_after = cpu_seconds(redis) if redis is not None else math.nan
        if profiler is not None:
            profiler.wait(60)
        reports = []
        for w in workers:
            w.stdin.write('{"cmd": "report"}\n')  # type: ignore[union-attr]
            w.stdin.flush()  # type: ignore[union-attr]
            reports.append(json.loads(w.stdout.readline() or "{}"))  # type: ignore[union-attr]
            w.wait(30)
        if background is not None:
            background.terminate()
            background.wait(10)
    latencies = array("d")
    for index in range(len(workers)):
        path = workdir / f"lat-{index}.bin"
        with path.open("rb") as data:
            latencies.frombytes(data.read())
    ordered = sorted(latencies)
    events = sum(r.get("events", 0) for r in reports)
    expected = published["published"] * connected / (1 if scenario.multi else wells)
    return Result(
        system=system,
        streams=streams,
        rate=rate,
        opened=connected,
        open_s=round(open_s, 1),
        expected_eps=round(expected / duration_s),
        delivered_eps=round(events / duration_s),
        loss_pct=round(100 * (1 - events / expected), 2) if expected else math.nan,
        dropped=sum(r.get("dropped", 0) for r in reports),
        p50_ms=round(percentile(ordered, 0.50) * 1000, 1),
        p99_ms=round(percentile(ordered, 0.99) * 1000, 1),
        max_ms=round((ordered[-1] if ordered else math.nan) * 1000, 1),
        rss_mib=round(rss_after / 2**20, 1),
        kib_per_stream=round((rss_after - rss_before) / 1024 / max(connected, 1), 1),
        cpu_pct=round(100 * (cpu_after - cpu_before) / (t1 - t0), 1),
        loadgen_cpu_pct=round(100 * (load_after - load_before) / (t1 - t0), 1),
        publisher_lag_ms=published["max_lag_ms"],
        silent=sum(r.get("silent", 0) for r in reports),
        while_publishing=while_publishing,
        wells=wells,
        multi=scenario.multi,
        redis_cpu_pct=round(100 * (redis_after - redis_before) / (t1 - t0), 1),
        cpu_us_per_event=round(1e6 * (cpu_after - cpu_before) / events, 2) if events else math.nan,
        redis_us_per_event=round(1e6 * (redis_after - redis_before) / events, 2) if events else math.nan,
    )


COLUMNS = [
    ("system", "system"), ("streams", "N"), ("rate", "R/s"), ("opened", "opened"), ("open_s", "open s"),
    ("expected_eps", "ev/s expected"), ("delivered_eps", "ev/s delivered"), ("loss_pct", "loss %"),
    ("dropped", "dropped"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("max_ms", "max ms"),
    ("rss_mib", "RSS MiB"), ("kib_per_stream", "KiB/stream"), ("cpu_pct", "CPU %"),
    ("loadgen_cpu_pct", "loadgen CPU %"), ("redis_cpu_pct", "redis CPU %"),
    ("cpu_us_per_event", "CPU µs/event"), ("redis_us_per_event", "redis µs/event"), ("publisher_lag_ms", "pub lag ms"),
    ("silent", "silent streams"),
    ("while_publishing", "opened while publishing"),
    ("wells", "wells"), ("multi", "one stream of every well"),
]  # fmt: skip


def table(results: list[Result]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for result in results:
        row = asdict(result)
        lines.append("| " + " | ".join(str(row[key]) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def per_event_us(result: Result, with_redis: bool = False) -> float:
    """CPU microseconds per event received: the gateway's, or the gateway's and redis-server's."""
    return result.cpu_us_per_event + (result.redis_us_per_event if with_redis else 0.0)


def ratio(ours: float, theirs: float) -> float:
    return round(ours / theirs, 2) if theirs and not math.isnan(theirs) else math.nan


def against(results: list[Result], peer: str = "nchan") -> str:
    """Each other system's row beside `peer`'s row of the same scenario, as ratios (< 1: cheaper or
    faster than the peer). Empty without the peer in the run."""

    def key(r: Result) -> tuple[int, int, int, bool, bool]:
        return (r.streams, r.rate, r.wells, r.multi, r.while_publishing)

    peers = {key(r): r for r in results if r.system == peer}
    lines = [
        f"Against {peer} (same run; ratio = system / {peer}; CPU µs per event received)",
        "",
        f"| system | N | R/s | wells | opened while publishing | µs/event | {peer} µs/event | ratio "
        f"| µs/event with redis | {peer} with redis | ratio | opened | {peer} opened | open s | {peer} open s | ratio "
        f"| KiB/stream ratio | p99 ratio |",
        "|" + "---|" * 18,
    ]
    rows = 0
    for r in results:
        theirs = peers.get(key(r))
        if r.system == peer or theirs is None:
            continue
        rows += 1
        ours_us, their_us = per_event_us(r), per_event_us(theirs)
        ours_all, their_all = per_event_us(r, with_redis=True), per_event_us(theirs, with_redis=True)
        cells = [
            r.system, r.streams, r.rate, r.wells, r.while_publishing,
            round(ours_us, 1), round(their_us, 1), ratio(ours_us, their_us),
            round(ours_all, 1), round(their_all, 1), ratio(ours_all, their_all),
            r.opened, theirs.opened, r.open_s, theirs.open_s, ratio(r.open_s, theirs.open_s),
            ratio(r.kib_per_stream, theirs.kib_per_stream), ratio(r.p99_ms, theirs.p99_ms),
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines) if rows else ""


def machine() -> str:
    cpu = platform.processor() or "unknown cpu"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    memory = psutil.virtual_memory().total / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, Python {platform.python_version()}"


def triples(text: str | None) -> list[tuple[int, int, int]]:
    """ "N:R:W,..." -> [(N, R, W), ...]; empty for None or ""."""
    return [(int(n), int(r), int(w)) for n, r, w in (t.split(":") for t in text.split(",") if t)] if text else []


def pairs(text: str | None) -> list[tuple[int, int]]:
    """ "N:R,N:R" -> [(N, R), ...]; empty for None or ""."""
    return [(int(n), int(r)) for n, r in (pair.split(":") for pair in text.split(",") if pair)] if text else []


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--systems", default="baseline,nchan,wellstream-hypercorn,wellstream-uvicorn,wellstream-granian"
    )
    parser.add_argument("--scenarios", default=None, help="N:R pairs, e.g. 1000:100,10000:1000")
    parser.add_argument("--quick", action="store_true", help="small scenarios only (a few minutes)")
    parser.add_argument(
        "--multi",
        default=None,
        help="N:R:W rows where each of N clients opens one stream of all W wells (R readings/s), e.g. 100:300:300; "
        "'' for none (default without --scenarios: 100:300:300,1000:1000:100; --quick: 100:300:300)",
    )
    parser.add_argument(
        "--while-publishing",
        default=None,
        help="N:R pairs opened while R readings/s already flow (admission under load), e.g. 10000:500; "
        "'' for none (default without --scenarios or --quick: 5000:500)",
    )
    parser.add_argument(
        "--storm",
        default=None,
        help="N:R reconnect storms (bench/storm.py): N streams on gateway A while R readings/s flow, A gets SIGTERM, "
        "all resume on gateway B; '' for none (default without --scenarios or --quick: 10000:500)",
    )
    ingestrate.add_arguments(parser)  # --ingest T:K,... (readings/s into one redis-server against a cluster)
    parser.add_argument("--duration", type=float, default=15, help="seconds of publishing per scenario")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument("--profile", type=Path, default=None, help="write py-spy flame graphs of each gateway here")
    parser.add_argument(
        "--before",
        type=Path,
        default=None,
        help="a checkout of the code before a change (e.g. `git worktree add /tmp/before HEAD~3`): "
        "each wellstream system also runs from there, as NAME@DIR, in the same run",
    )
    args = parser.parse_args(argv)
    scenarios = QUICK if args.quick else FULL
    if args.scenarios is not None:
        scenarios = pairs(args.scenarios)
    systems = args.systems.split(",")
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        parser.error(f"unknown systems: {unknown}; known: {sorted(SYSTEMS)}")
    if args.before is not None:
        if not (args.before / "app" / "__main__.py").is_file():
            parser.error(f"--before {args.before}: not a wellstream checkout")
        systems = [twin for s in systems for twin in ((s, f"{s}@{args.before}") if s not in PEERS else (s,))]
    secret = secrets.token_urlsafe(32)
    results: list[Result] = []
    header = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {machine()}; `python -m bench {' '.join(argv or sys.argv[1:])}`"
    print(header, flush=True)
    with tempfile.TemporaryDirectory() as tmp, redis_server(Path(tmp)) as (redis_url, redis):
        runs = [Scenario(n, r) for n, r in scenarios]
        # Named scenarios mean "just these"; otherwise the default set includes the other kinds of row.
        chosen = args.scenarios is not None
        while_publishing = (
            pairs(args.while_publishing)
            if args.while_publishing is not None
            else ([] if args.quick or chosen else FULL_WHILE_PUBLISHING)
        )
        multi = (
            triples(args.multi)
            if args.multi is not None
            else ([] if chosen else QUICK_MULTI if args.quick else FULL_MULTI)
        )
        runs += [Scenario(n, r, while_publishing=True) for n, r in while_publishing]
        runs += [Scenario(n, r, wells=w, multi=True) for n, r, w in multi]
        for scenario in runs:
            for system in systems:
                if system == "baseline" and (scenario.streams > BASELINE_MAX_STREAMS or scenario.multi):
                    continue
                if system == "nchan" and scenario.multi:
                    print(f"nchan: no row for {scenario} (streams of many wells: see PEERS)", file=sys.stderr)
                    continue
                result = run_scenario(
                    system, scenario, redis_url, secret, args.duration, Path(tmp), args.profile, redis
                )
                results.append(result)
                print(json.dumps(asdict(result)), flush=True)
        # Imported here: bench.storm builds on this module's gateway(), so a top-level import would be circular.
        from bench import storm

        storms = pairs(args.storm) if args.storm is not None else ([] if args.quick or chosen else storm.FULL_STORM)
        storm_results = storm.storm_rows(systems, storms, redis_url, secret)
    # After the fan-out rows, on servers of its own (a redis-server and a cluster): nothing else is measured meanwhile.
    ingest_cases = ingestrate.cases_of(args.ingest, args.quick, chosen=args.scenarios is not None)
    ingest_results = ingestrate.run_ingest(ingest_cases, args.ingest_duration, args.ingest_rounds, args.ingest_batch)
    output = header + "\n\n" + table(results) + "\n"
    if ingest_results:
        output += "\n" + ingestrate.table(ingest_results, args.ingest_duration, args.ingest_rounds) + "\n"
    if storm_results:
        output += "\n" + storm.table(storm_results) + "\n"
    if peer := against(results):
        output += "\n" + peer + "\n"
    print(output)
    if args.out:
        args.out.write_text(output)
