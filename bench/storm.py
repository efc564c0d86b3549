"""The reconnect-storm row of the fan-out benchmark (`python -m bench --storm N:R`).

Two gateways of one system on the bench's redis-server: N per-well streams (over 100 wells) open
on gateway A, R readings/s flow, then A gets SIGTERM. Its drain sends every stream a goodbye with
a `retry:` hint spread over `stream.shutdown_retry_spread_ms`; each client (bench/stormgen.py)
waits that hint, as EventSource does, and reopens on gateway B with its Last-Event-ID. The row:
how long from the SIGTERM until 50 %, 99 % and all of the streams are streaming again on B (their
first event there), streams that did not come back (with the status B answered), B's CPU during
the storm, and, per stream, readings of its well after its first event that were missed,
repeated or reordered across the two connections, checked against the well's Redis log.

Layout: both gateways pinned to core 1 (as bench/run.py pins one); redis-server, the publisher
and the load generators share core 0. Putting A on core 0 would leave the load generators and
Redis half a core while A serves N streams; on core 1 the two overlap only while A drains (its
goodbyes go out within its grace period, while the first client returns after the 2 s base of
the retry hint), so B's storm CPU is B's alone but for that. B sits idle (no streams) until the
storm. No process holds more than N connections plus a few (each client closes its connection
to A before it opens one to B; 5,000 streams per load-generator process), so the bench's
open-file limit of 20,000 holds up to N = 20,000 minus the gateway's own descriptors.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TypedDict, cast

import psutil

from app.auth.tokens import mint_token
from bench.run import (
    PEERS,
    ROOT,
    STREAMS_PER_WORKER,
    SYSTEMS,
    TENANT,
    WELLS,
    cpu_seconds,
    gateway,
    percentile,
    pinned,
    publisher,
    workers_of,
)

FULL_STORM = [(10000, 500)]
SETTLE_S = 3.0  # readings flowing to every stream on A before the SIGTERM
STORM_TIMEOUT_S = 60.0  # from the SIGTERM: streams not back by then are reported as pending
AFTER_S = 5.0  # B's steady state once all are back, for comparison with its storm CPU
CHECK_TIMEOUT_S = 20.0  # for clients to receive the last published readings before the comparison


class Settled(TypedDict):
    """A storm client's answer to "settle" (bench/stormgen.py): seconds from the SIGTERM, sorted."""

    back_s: list[float]
    ok_s: list[float]
    attempt_s: list[float]
    failed: dict[str, int]
    pending: int
    goodbyes: int
    ended_before_sigterm: int
    not_ended: int
    network_errors: int
    network_kinds: dict[str, int]
    attempts: int
    retry_ms: list[int]


@dataclass
class StormResult:
    system: str
    streams: int
    rate: int
    opened: int
    open_s: float
    goodbyes: int  # streams that got the drain's retry hint before A's end
    first_retry_s: float  # first and last first-attempt on B, from the SIGTERM: the hint's spread
    last_retry_s: float
    back_p50_s: float  # from the SIGTERM until that share of streams had their first event on B
    back_p99_s: float
    back_all_s: float
    ok_all_s: float  # ... until the last 200 on B
    failed: int
    failed_statuses: str
    pending: int  # neither back nor failed at the storm timeout
    network_errors: int  # attempts on B refused or broken before an answer (retried)
    expected: int  # readings published for each stream's well after its first event, summed
    missing: int
    streams_with_gaps: int
    duplicates: int
    streams_with_duplicates: int
    out_of_order: int
    handover_missing: int  # of `missing`, those between the last reading on A and the first on B
    b_cpu_storm_pct: float  # B's CPU from the SIGTERM until all were back
    b_cpu_after_pct: float  # B's CPU over AFTER_S of steady state afterwards
    a_exit_s: float  # from the SIGTERM until A's process exited
    loadgen_cpu_pct: float  # the load generators over the storm (they share core 0 with Redis)
    row_s: float  # wall time of the whole row, start-up included


def systems_for_storm(systems: list[str]) -> list[str]:
    """The wellstream systems of a run that can take the storm's layout: one process per gateway,
    both on core 1 (a `-2w` system's workers take both cores, and there is no third for A)."""
    chosen = []
    for system in systems:
        name = system.partition("@")[0]
        if name in PEERS or workers_of(SYSTEMS[name][0]) > 1:
            print(f"storm: skipping {system} (not one wellstream process)", file=sys.stderr, flush=True)
            continue
        chosen.append(system)
    return chosen


def run_storm(system: str, streams: int, rate: int, redis_url: str, secret: str) -> StormResult:
    started = time.monotonic()
    tree = system.partition("@")[2] or ROOT  # the readings from the system's own checkout (bench/run.py)
    token = mint_token(secret, TENANT, "bench", ttl_s=3600)
    label = f"storm-{streams}-{rate}"
    with contextlib.ExitStack() as stack:
        port_a, gateway_a = stack.enter_context(gateway(system, redis_url, secret, WELLS, f"{label}-A"))
        port_b, gateway_b = stack.enter_context(gateway(system, redis_url, secret, WELLS, f"{label}-B"))
        opening = time.monotonic()
        workers = stack.enter_context(clients(streams, port_a, port_b, redis_url, token))
        opened = [read(w) for w in workers]
        open_s = time.monotonic() - opening
        connected = sum(cast(int, o.get("opened", 0)) for o in opened)
        if connected < streams:
            print(f"WARNING: storm {system}: only {connected} of {streams} opened on A", file=sys.stderr, flush=True)
        # Readings start after the opens (the storm, not admission on A, is what this row measures).
        background = subprocess.Popen(
            publisher(system, port_a, redis_url, rate, 3600), cwd=tree, stdout=subprocess.DEVNULL
        )
        stack.callback(stop_publisher, background)
        time.sleep(SETTLE_S)
        loadgens = [psutil.Process(w.pid) for w in workers]
        load_before = sum(cpu_seconds(p) for p in loadgens)
        cpu_before = cpu_seconds(gateway_b)
        t0 = time.monotonic()
        gateway_a.send_signal(signal.SIGTERM)
        a_exit: list[float] = []
        watcher = threading.Thread(target=watch_exit, args=(gateway_a, t0, a_exit), daemon=True)
        watcher.start()
        for w in workers:
            send(w, {"cmd": "settle", "t0": t0, "timeout": STORM_TIMEOUT_S})
        # Each answers once all of its streams are back or failed (or at the timeout).
        settled = [cast(Settled, read(w)) for w in workers]
        cpu_storm, t1 = cpu_seconds(gateway_b), time.monotonic()
        load_after = sum(cpu_seconds(p) for p in loadgens)
        time.sleep(AFTER_S)
        b_cpu_after = 100 * (cpu_seconds(gateway_b) - cpu_storm) / (time.monotonic() - t1)
        stop_publisher(background)
        time.sleep(0.5)  # a batch the publisher sent just before its end still lands in the log
        for w in workers:
            send(w, {"cmd": "check", "timeout": CHECK_TIMEOUT_S})
        checks = [read(w) for w in workers]
        watcher.join(1)
    back = sorted(v for s in settled for v in s["back_s"])
    ok = sorted(v for s in settled for v in s["ok_s"])
    attempts = sorted(v for s in settled for v in s["attempt_s"])
    failed: Counter[str] = Counter()
    for s in settled:
        failed.update(s["failed"])
    total: Counter[str] = Counter()
    for c in checks:
        total.update({k: v for k, v in c.items() if isinstance(v, int)})
    everyone_back = len(back) == connected
    # The clients' own counts, for what the row leaves out (streams A ended early, attempts, B's ends).
    details: Counter[str] = Counter(total)
    for s in settled:
        details.update({k: v for k, v in s.items() if isinstance(v, int)})
        details.update({f"network_{k}": v for k, v in s["network_kinds"].items()})
    details.update({f"failed_{k}": v for k, v in failed.items()})
    print(f"storm {system} {streams}:{rate}: {json.dumps(details)}", file=sys.stderr, flush=True)
    return StormResult(
        system=system,
        streams=streams,
        rate=rate,
        opened=connected,
        open_s=round(open_s, 1),
        goodbyes=sum(s["goodbyes"] for s in settled),
        first_retry_s=attempts[0] if attempts else math.nan,
        last_retry_s=attempts[-1] if attempts else math.nan,
        back_p50_s=round(percentile(back, 0.5), 2) if len(back) >= connected * 0.5 else math.nan,
        back_p99_s=round(percentile(back, 0.99) if everyone_back else quantile_of(back, connected, 0.99), 2),
        back_all_s=round(back[-1], 2) if everyone_back and back else math.nan,
        ok_all_s=round(ok[-1], 2) if len(ok) == connected and ok else math.nan,
        failed=sum(failed.values()),
        failed_statuses=", ".join(f"{code} x{n}" for code, n in sorted(failed.items())),
        pending=sum(s["pending"] for s in settled),
        network_errors=sum(s["network_errors"] for s in settled),
        expected=total["expected"],
        missing=total["missing"],
        streams_with_gaps=total["streams_with_gaps"],
        duplicates=total["duplicates"],
        streams_with_duplicates=total["streams_with_duplicates"],
        out_of_order=total["out_of_order"],
        handover_missing=total["handover_missing"],
        b_cpu_storm_pct=round(100 * (cpu_storm - cpu_before) / (t1 - t0), 1),
        b_cpu_after_pct=round(b_cpu_after, 1),
        a_exit_s=a_exit[0] if a_exit else math.nan,
        loadgen_cpu_pct=round(100 * (load_after - load_before) / (t1 - t0), 1),
        row_s=round(time.monotonic() - started, 1),
    )


def quantile_of(times: list[float], population: int, q: float) -> float:
    """The time by which a share `q` of `population` was back; NaN if fewer ever came back."""
    needed = math.ceil(q * population)
    return times[needed - 1] if 0 < needed <= len(times) else math.nan


@contextlib.contextmanager
def clients(
    streams: int, port_a: int, port_b: int, redis_url: str, token: str
) -> Iterator[list[subprocess.Popen[str]]]:
    """The storm's client processes (bench/stormgen.py) on core 0, STREAMS_PER_WORKER streams each;
    killed on the way out if a run fails half-way."""
    workers: list[subprocess.Popen[str]] = []
    try:
        for first in range(0, streams, STREAMS_PER_WORKER):
            count = min(STREAMS_PER_WORKER, streams - first)
            cmd = [sys.executable, "-m", "bench.stormgen", "--port", str(port_a), "--resume-port", str(port_b)]
            cmd += ["--redis-url", redis_url, "--streams", str(count), "--first", str(first)]
            cmd += ["--wells", str(WELLS), "--tenant", TENANT, "--token", token]
            workers.append(
                subprocess.Popen(pinned(0, cmd), cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )
        yield workers
    finally:
        for w in workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.wait(30)
            if w.poll() is None:
                w.kill()
                w.wait()


def send(worker: subprocess.Popen[str], message: dict[str, object]) -> None:
    assert worker.stdin is not None
    worker.stdin.write(json.dumps(message) + "\n")
    worker.stdin.flush()


def read(worker: subprocess.Popen[str]) -> dict[str, object]:
    assert worker.stdout is not None
    answer: dict[str, object] = json.loads(worker.stdout.readline() or "{}")
    return answer


def stop_publisher(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        proc.wait(10)


def watch_exit(process: psutil.Process, t0: float, into: list[float]) -> None:
    """Append the seconds from `t0` until `process` exited. Polled, not waited on: gateway() reaps it
    (a zombie has exited; a reaped one is gone)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.Error:
            break
        time.sleep(0.05)
    else:
        return
    into.append(round(time.monotonic() - t0, 2))


def storm_rows(systems: list[str], storms: list[tuple[int, int]], redis_url: str, secret: str) -> list[StormResult]:
    """Every storm (N, R) on every system that can take it, each row printed as JSON when done."""
    results = []
    for streams, rate in storms:
        for system in systems_for_storm(systems):
            result = run_storm(system, streams, rate, redis_url, secret)
            results.append(result)
            print(json.dumps(asdict(result)), flush=True)
    return results


COLUMNS = [
    ("system", "system"), ("streams", "N"), ("rate", "R/s"), ("opened", "opened on A"), ("goodbyes", "goodbyes"),
    ("first_retry_s", "first retry s"), ("last_retry_s", "last retry s"), ("back_p50_s", "50 % back s"),
    ("back_p99_s", "99 % back s"), ("back_all_s", "all back s"), ("ok_all_s", "all 200 s"), ("failed", "failed"),
    ("failed_statuses", "failed statuses"), ("pending", "pending"), ("network_errors", "network errors"),
    ("expected", "readings expected"), ("missing", "missing"), ("streams_with_gaps", "streams with gaps"),
    ("duplicates", "duplicates"), ("streams_with_duplicates", "streams with duplicates"),
    ("out_of_order", "out of order"), ("b_cpu_storm_pct", "B CPU % storm"), ("b_cpu_after_pct", "B CPU % after"),
    ("a_exit_s", "A exit s"), ("loadgen_cpu_pct", "loadgen CPU %"), ("row_s", "row s"),
]  # fmt: skip


def table(results: list[StormResult]) -> str:
    """The storm rows as markdown; times are seconds from A's SIGTERM. Empty without rows."""
    if not results:
        return ""
    lines = [
        "Reconnect storm (A gets SIGTERM; clients come back on B after the retry hint; s from the SIGTERM)",
        "",
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for result in results:
        row = asdict(result)
        lines.append("| " + " | ".join(str(row[key]) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)
