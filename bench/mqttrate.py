"""MQTT and Sparkplug B messages per second one ingest worker takes, from mosquitto into Redis.

    python -m bench.mqttrate [--rates 1000,2000,4000,8000] [--step 10] [--protocols mqtt,sparkplug]

Per protocol, one `wellstream ingest` reads a local mosquitto and publishes into a local
redis-server; a publisher in a process of its own offers each rate in turn for `--step`
seconds (QoS 0, payloads built before the clock starts):

- `mqtt`: plain-number payloads on 1,000 topics (100 wells x 10 tags), one reading each;
- `sparkplug`: one edge node born with 1,000 metrics, NDATA messages of `--metrics` metrics
  each by alias (seq counting, so no rebirth), readings = messages x metrics.

Per step: messages offered per second (what the publisher managed), readings the worker
accepted per second (its `wellstream_ingest_accepted_total`), and the worker's CPU (user +
system) as a share of one core. The rate a worker sustains is the highest step it keeps up
with (accepted >= 98 % of offered) below a full core. Layout: mosquitto, Redis and the
publisher on core 0, the worker on core 1 (where there are two). Loopback only; every
process is stopped on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from bench.run import clean_env, cpu_seconds, free_port, machine, pinned, redis_server, stop, wait_for_port

HOST = "127.0.0.1"
WELLS, TAGS = 100, 10
GROUP, NODE = "bench", "pad-1"


def topic(well: int, tag: int) -> str:
    return f"bench/w{well:03d}/t{tag:02d}"


def site_file(path: Path, protocol: str, port: int) -> None:
    wells = [f"w{n:03d}" for n in range(WELLS)]
    lines = ["[tenants.bench]", "wells = [" + ", ".join(f'"{w}"' for w in wells) + "]", "", "[[connections]]"]
    lines += [f'protocol = "{protocol}"', f'id = "bench-{protocol}"', 'tenant = "bench"', f'host = "{HOST}"']
    lines += [f"port = {port}"]
    if protocol == "mqtt":
        lines.append("tags = [")
        for well in range(WELLS):
            for tag in range(TAGS):
                lines.append(f'  {{ topic = "{topic(well, tag)}", well = "{wells[well]}", tag = "t{tag:02d}" }},')
    else:
        lines += [f'groups = ["{GROUP}"]', "metrics = ["]
        for well in range(WELLS):
            for tag in range(TAGS):
                name = f"{wells[well]}/t{tag:02d}"
                target = f'well = "{wells[well]}", tag = "t{tag:02d}"'
                lines.append(f'  {{ node = "{NODE}", device = "", metric = "{name}", {target} }},')
    lines.append("]")
    path.write_text("\n".join(lines) + "\n")


def publish(port: int, protocol: str, rate: int, seconds: float, per_message: int) -> None:
    """The publisher process: `rate` messages/s for `seconds`, then prints how many it sent."""
    import aiomqtt

    async def run() -> None:
        async with aiomqtt.Client(HOST, port) as client:
            messages = await _payloads(client, protocol, per_message)
            sent, started = 0, time.monotonic()
            tick = 0.01
            while (elapsed := time.monotonic() - started) < seconds:
                due = int(rate * elapsed)
                while sent < due:
                    name, payload = messages(sent)
                    await client.publish(name, payload, qos=0)
                    sent += 1
                await asyncio.sleep(tick)
            print(sent, time.monotonic() - started, flush=True)

    asyncio.run(run())


async def _payloads(client: object, protocol: str, per_message: int) -> Any:
    """A function: message number -> (topic, payload bytes); Sparkplug's node is born first."""
    if protocol == "mqtt":
        topics = [topic(w, t) for w in range(WELLS) for t in range(TAGS)]
        return lambda n: (topics[n % len(topics)], str(n % 1000).encode())
    from app.adapters import sparkplug_b_pb2 as pb

    birth = pb.Payload(timestamp=int(time.time() * 1000), seq=0)
    birth.metrics.add(name="bdSeq", datatype=8, long_value=0)
    for alias in range(WELLS * TAGS):
        birth.metrics.add(
            name=f"w{alias // TAGS:03d}/t{alias % TAGS:02d}", alias=alias + 1, datatype=10, double_value=0.0
        )
    await client.publish(f"spBv1.0/{GROUP}/NBIRTH/{NODE}", birth.SerializeToString(), qos=1)  # type: ignore[attr-defined]
    await asyncio.sleep(1)  # the host has it before the first data
    frames = []
    for seq in range(256):  # seq 1, 2, ... 255, 0, 1 ...: one payload per seq, values differ by message
        data = pb.Payload(timestamp=int(time.time() * 1000), seq=(seq + 1) % 256)
        for k in range(per_message):
            alias = (seq * per_message + k) % (WELLS * TAGS)
            data.metrics.add(alias=alias + 1, datatype=10, double_value=float(seq + k))
        frames.append(data.SerializeToString())
    name = f"spBv1.0/{GROUP}/NDATA/{NODE}"
    return lambda n: (name, frames[n % 256])


@contextlib.contextmanager
def mosquitto(workdir: Path) -> Iterator[int]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    config = workdir / "mosquitto.conf"
    config.write_text(f"listener {port} {HOST}\npersistence false\nallow_anonymous true\n")
    proc = subprocess.Popen(
        pinned(0, [binary, "-c", str(config)]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_port(port, 10)
        yield port
    finally:
        stop(proc)


def settle(process: psutil.Process, timeout_s: float = 60) -> None:
    """Until the worker has started (site loaded, subscribed): less than 5 % of a core for a second."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = cpu_seconds(process)
        time.sleep(1)
        if cpu_seconds(process) - before < 0.05:
            return
    raise RuntimeError("the worker did not settle")


def accepted(port: int) -> float:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith("wellstream_ingest_accepted_total"):
                return float(line.split()[-1])
    return 0.0


def measure(protocol: str, args: argparse.Namespace, workdir: Path) -> list[str]:
    rows = []
    per_message = 1 if protocol == "mqtt" else args.metrics
    births = WELLS * TAGS
    with redis_server(workdir) as (redis_url, _), mosquitto(workdir) as port:
        site, metrics_port = workdir / f"{protocol}.toml", free_port()
        site_file(site, protocol, port)
        env = clean_env() | {"WELLSTREAM_REDIS_URL": redis_url, "WELLSTREAM_SPOOL__PATH": str(workdir / "spool.db")}
        argv = [sys.executable, "-m", "app", "ingest", "--config", str(site), "--log-level", "WARNING"]
        argv += ["--metrics-port", str(metrics_port)]
        worker = subprocess.Popen(pinned(1, argv), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(metrics_port, 30)
            process = psutil.Process(worker.pid)
            settle(process)
            for rate in args.rates:
                before, cpu_before = accepted(metrics_port), cpu_seconds(process)
                publisher = [sys.executable, "-m", "bench.mqttrate", "--publish", str(port), "--protocol", protocol]
                publisher += ["--rate", str(rate), "--step", str(args.step), "--metrics", str(per_message)]
                out = subprocess.run(pinned(0, publisher), capture_output=True, text=True, timeout=args.step + 60)
                time.sleep(1)  # what is in flight lands
                sent, took = (float(x) for x in out.stdout.split())
                got = accepted(metrics_port) - before
                cpu = (cpu_seconds(process) - cpu_before) / took  # the settling second's work belongs to the step
                offered = sent / took
                got -= births if protocol == "sparkplug" else 0  # the step's publisher births the node first
                kept = got / (sent * per_message) if sent else 0.0
                rows.append(
                    f"| {protocol} | {per_message} | {offered:,.0f} | {offered * per_message:,.0f} "
                    f"| {got / took:,.0f} | {kept:.1%} | {cpu:.0%} |"
                )
        finally:
            stop(worker)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.mqttrate", description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=lambda t: [int(x) for x in t.split(",")], default=[1000, 2000, 4000, 8000])
    parser.add_argument("--step", type=float, default=10.0, help="seconds per offered rate")
    parser.add_argument("--protocols", default="mqtt,sparkplug")
    parser.add_argument("--metrics", type=int, default=10, help="metrics per Sparkplug NDATA message")
    parser.add_argument("--publish", type=int, default=0, help=argparse.SUPPRESS)  # the publisher process
    parser.add_argument("--protocol", default="mqtt", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.publish:
        publish(args.publish, args.protocol, args.rate, args.step, args.metrics)
        return
    keep = os.environ.get("BENCH_KEEP")
    workdir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="mqttrate-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = [row for protocol in args.protocols.split(",") for row in measure(protocol, args, workdir)]
    print(f"machine: {machine()}")
    print(f"command: python -m bench.mqttrate {' '.join(sys.argv[1:])}")
    print()
    print(
        "| protocol | readings per message | messages/s offered | readings/s offered | readings/s accepted "
        "| kept | worker CPU |"
    )
    print("|---|---|---|---|---|---|---|")
    print(*rows, sep="\n")


if __name__ == "__main__":
    main()
