"""One ingest worker polling a Modbus TCP device of many points over a slow link: requests per
scan, scan time and the worker's CPU.

    python -m bench.modbusscan [--points 5000] [--interval 1] [--latency-ms 20] [--duration 30]

A pymodbus server (its own process) holds `--points` holding registers; `wellstream ingest`
reads them all as uint16 points of one group every `--interval` seconds (50 wells of
points/50 tags). Between them a proxy in this process holds every request `--latency-ms` before
passing it on, as a radio or cellular link does, and parses each one (MBAP header, function
code, quantity) to count requests and registers. Over the `--duration` window after a warm-up:

- requests per scan = requests / (registers read / points);
- scan time = the window / scans (from what the device was asked, whatever the worker says);
- the worker's CPU, user + system over the window, as a share of one core.

The worker's own scan metrics (`wellstream_ingest_scan*`) are printed too where it has them.
Everything listens on 127.0.0.1; the processes are stopped on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench.run import clean_env, cpu_seconds, free_port, machine, redis_server, stop, wait_for_port

HOST = "127.0.0.1"
WELLS = 50
READ_HOLDING = 3


def serve(port: int, points: int) -> None:
    """The device: `points` holding registers from address 0 (run in a process of its own)."""
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    async def run() -> None:
        registers = [n % 65536 for n in range(points)]
        bits = [SimData(address=0, values=[False], datatype=DataType.BITS)]
        words = [SimData(address=0, values=registers, datatype=DataType.REGISTERS)]
        simdata = (bits, bits, words, [SimData(address=0, values=[0], datatype=DataType.REGISTERS)])
        server = ModbusTcpServer(SimDevice(id=1, simdata=simdata), address=(HOST, port))
        await server.serve_forever()

    asyncio.run(run())


@dataclass
class Counts:
    requests: int = 0
    registers: int = 0


class SlowLink:
    """A TCP proxy holding each request `latency_s` before passing it on, counting reads."""

    def __init__(self, upstream: int, latency_s: float) -> None:
        self.upstream = upstream
        self.latency_s = latency_s
        self.counts = Counts()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(HOST, self.upstream)

        async def answers() -> None:
            while data := await up_reader.read(65536):
                writer.write(data)
                await writer.drain()

        back = asyncio.create_task(answers())
        try:
            while True:
                head = await reader.readexactly(7)  # MBAP: transaction, protocol, length, unit
                (length,) = struct.unpack(">H", head[4:6])
                pdu = await reader.readexactly(length - 1)
                if pdu[0] == READ_HOLDING and len(pdu) >= 5:
                    self.counts.requests += 1
                    self.counts.registers += struct.unpack(">H", pdu[3:5])[0]
                await asyncio.sleep(self.latency_s)
                up_writer.write(head + pdu)
                await up_writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the worker hung up, or the bench is closing the link
        finally:
            back.cancel()
            up_writer.close()
            writer.close()


def site_file(path: Path, device_port: int, points: int, interval_s: float) -> None:
    per_well = max(1, points // WELLS)
    wells = [f"w{n:03d}" for n in range((points + per_well - 1) // per_well)]
    lines = [
        "[tenants.bench]",
        f"wells = [{', '.join(repr(w) for w in wells)}]".replace("'", '"'),
        "",
        "[[connections]]",
        'protocol = "modbus"',
        'id = "bench-plc"',
        'tenant = "bench"',
        f'host = "{HOST}"',
        f"port = {device_port}",
        "timeout_s = 10",
        "",
        "[[connections.groups]]",
        f"interval_s = {interval_s}",
        "points = [",
    ]
    for address in range(points):
        well, tag = wells[address // per_well], f"t{address % per_well:03d}"
        lines.append(f'  {{ table = "holding", address = {address}, well = "{well}", tag = "{tag}" }},')
    lines.append("]")
    path.write_text("\n".join(lines) + "\n")


@contextlib.contextmanager
def process(argv: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> Iterator[psutil.Process]:
    out = open(log, "wb") if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield psutil.Process(proc.pid)
    finally:
        stop(proc)
        if log is not None:
            out.close()  # type: ignore[union-attr]


def scan_metrics(port: int) -> list[str]:
    with contextlib.suppress(OSError), urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as answer:
        text: str = answer.read().decode()
        return [line for line in text.splitlines() if line.startswith("wellstream_ingest_scan")]
    return ["(metrics not reachable)"]


async def measure(args: argparse.Namespace, workdir: Path) -> None:
    device_port, link_port, metrics_port = free_port(), free_port(), free_port()
    link = SlowLink(device_port, args.latency_ms / 1000)
    site = workdir / "site.toml"
    site_file(site, link_port, args.points, args.interval)
    device_argv = [sys.executable, "-m", "bench.modbusscan", "--serve", str(device_port), "--points", str(args.points)]
    with redis_server(workdir) as (redis_url, _), process(device_argv):
        wait_for_port(device_port, 20)
        proxy = await asyncio.start_server(link.handle, HOST, link_port)
        env = clean_env() | {"WELLSTREAM_REDIS_URL": redis_url, "WELLSTREAM_SPOOL__PATH": str(workdir / "spool.db")}
        worker_argv = [sys.executable, "-m", "app", "ingest", "--config", str(site), "--log-level", "WARNING"]
        worker_argv += ["--metrics-port", str(metrics_port)]
        try:
            with process(worker_argv, env, workdir / "worker.log") as worker:
                await asyncio.sleep(args.warmup)
                before, cpu_before, started = Counts(**vars(link.counts)), cpu_seconds(worker), time.monotonic()
                await asyncio.sleep(args.duration)
                elapsed = time.monotonic() - started
                cpu = (cpu_seconds(worker) - cpu_before) / elapsed
                requests = link.counts.requests - before.requests
                registers = link.counts.registers - before.registers
                worker_scans = scan_metrics(metrics_port)
        finally:
            proxy.close()
            await proxy.wait_closed()
    scans = registers / args.points
    print(f"machine: {machine()}")
    print(f"command: python -m bench.modbusscan {' '.join(sys.argv[1:])}")
    print()
    print("| points | interval | latency | requests per scan | scan time | worker CPU | log |")
    print("|---|---|---|---|---|---|---|")
    per_scan = f"{requests / scans:,.0f}" if scans else "no scan completed"
    scan_time = f"{elapsed / scans:.2f} s" if scans else f"> {elapsed:.0f} s"
    print(
        f"| {args.points:,} | {args.interval:g} s | {args.latency_ms:g} ms | {per_scan} | {scan_time} "
        f"| {cpu:.1%} of a core | {workdir / 'worker.log'} |"
    )
    print()
    print(f"window {elapsed:.1f} s: {requests:,} requests for {registers:,} registers ({scans:.2f} scans)")
    print("the worker's scan metrics:", *(worker_scans or ["(none)"]), sep="\n  ")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.modbusscan", description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=5000)
    parser.add_argument("--interval", type=float, default=1.0, help="the group's poll interval, seconds")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="added before each request reaches the device")
    parser.add_argument("--duration", type=float, default=30.0, help="the measured window, seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before the window (connect, first scan)")
    parser.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)  # the device process
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.points)
        return
    keep = os.environ.get("BENCH_KEEP")
    workdir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="modbusscan-"))
    workdir.mkdir(parents=True, exist_ok=True)
    asyncio.run(measure(args, workdir))


if __name__ == "__main__":
    main()
