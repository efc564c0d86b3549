"""nchan (nginx's pub/sub module) as a peer system in the fan-out benchmark.

    python -m bench.nchan serve --port P        nginx + nchan on Redis (WELLSTREAM_REDIS_URL)
    python -m bench.nchan publish --port P --tenant T --wells W --rate R --duration S

`serve` writes an nginx config into a temporary directory and replaces itself with nginx
(master process, one worker, in the foreground), so the process bench/run.py starts, pins to
a core and measures is nginx's master, with its worker as its only child. nchan keeps its
channels and messages in the bench's redis-server (`nchan_redis_pass`, distributed mode:
every message goes through Redis, and each nginx subscribes to the channels it serves), as
wellstream's gateways get every reading through Redis.

Same URLs and events as wellstream, so bench/loadgen.py reads both the same way:
`GET /tenants/{tenant}/wells/{well}/stream` is an EventSource subscriber of channel
`{tenant}.{well}` whose events are `event: reading` with the reading JSON as `data:`.
nchan has no way to publish through Redis from outside (its Redis layout and scripts are its
own), so `publish` POSTs each reading to `/pub/{tenant}/{well}`: the same readings, at the same
moments, as bench/publish.py gives wellstream (the same pacing loop).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlsplit

from app.models import Reading
from bench.publish import paced

# Where Debian's libnginx-mod-nchan puts the module (`dpkg -L libnginx-mod-nchan`).
MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
DIR_PREFIX = "wellstream-bench-nchan-"
# nchan keeps this many messages per channel, as the bench's wellstream keeps 1,000 readings of
# history per well (WELLSTREAM_HISTORY__MAX_LEN in bench/run.py).
BUFFER_LENGTH = 1000

CONFIG = """\
load_module {module};
master_process on;
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log stderr warn;

events {{
    # Every stream is a connection of the one worker: as many as it may open files.
    worker_connections {connections};
    multi_accept on;
}}

http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    # The publisher's connections (one per well) carry every reading: nginx's default closes one every 1,000 requests.
    keepalive_requests 100000000;
    keepalive_timeout 3600s;

    # nchan's own form of `nchan_redis_url` + `nchan_use_redis on` (which it warns are discouraged).
    # Passed in each location below: given here at http level, nchan 1.3.6 accepted it and kept
    # everything in its shared memory (Redis stayed empty).
    upstream bench_redis {{
        nchan_redis_server {redis_url};
    }}
    nchan_message_buffer_length {buffer_length};
    nchan_message_timeout 1h;

    server {{
        listen 127.0.0.1:{port} backlog=4096;

        location = /healthz {{
            return 200 "ok\\n";
        }}

        location ~ ^/tenants/([^/]+)/wells/([^/]+)/stream$ {{
            nchan_subscriber eventsource;
            nchan_redis_pass bench_redis;
            nchan_channel_id "$1.$2";
            # The load generator counts `event: reading` frames, as wellstream sends them.
            nchan_eventsource_event reading;
            # As a fresh wellstream stream, live readings only: one run's redis-server keeps every
            # scenario's messages, and nchan's default (`oldest`) would replay them first.
            nchan_subscriber_first_message newest;
        }}

        location ~ ^/pub/([^/]+)/([^/]+)$ {{
            nchan_publisher;
            nchan_redis_pass bench_redis;
            nchan_channel_id "$1.$2";
        }}
    }}
}}
"""


def config(port: int, redis_url: str, directory: Path) -> str:
    # A TLS or password URL would need nchan settings this config does not write; the bench's is plain.
    if urlsplit(redis_url).scheme != "redis":
        raise ValueError(f"nchan here needs a redis:// URL, not {redis_url!r}")
    return CONFIG.format(
        module=MODULE, dir=directory, port=port, redis_url=redis_url, buffer_length=BUFFER_LENGTH,
        connections=open_files(),
    )  # fmt: skip


def open_files() -> int:
    """The open-file limit nginx's worker will have: the bench's, as wellstream's gateways get.

    The worker runs as nobody and cannot raise its hard limit (`worker_rlimit_nofile` fails), so
    the soft limit is raised to the hard one here, before exec, and nginx is told its real ceiling."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard if hard != resource.RLIM_INFINITY else 65536


def remove_stale_dirs(max_age_s: float = 60) -> None:
    """Directories of earlier `serve`s whose nginx has exited (it removes its pid file when it does).

    `serve` becomes nginx, so nothing is left to delete its directory when nginx stops; the next
    one does. The age spares a directory whose nginx is still starting."""
    for path in Path(tempfile.gettempdir()).glob(f"{DIR_PREFIX}*"):
        with contextlib.suppress(OSError):
            if not (path / "nginx.pid").exists() and time.time() - path.stat().st_mtime > max_age_s:
                shutil.rmtree(path)


def serve(port: int, redis_url: str) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not MODULE.is_file():
        sys.exit(f"{MODULE} is missing: `make bench` installs it (apt-get install libnginx-mod-nchan)")
    remove_stale_dirs()
    directory = Path(tempfile.mkdtemp(prefix=DIR_PREFIX))
    conf = directory / "nginx.conf"
    conf.write_text(config(port, redis_url, directory))
    # exec, not a child: the pid bench/run.py holds (pinned, measured, sent SIGTERM) is nginx's master.
    # `-e stderr`: errors before the config is read go to the bench's stderr too, not /var/log/nginx.
    os.execv(nginx, [nginx, "-e", "stderr", "-p", str(directory), "-c", str(conf)])


class Connection:
    """One keep-alive HTTP/1.1 connection to nchan's publisher location, requests pipelined.

    Requests go out as they are due and the answers are read by a task of their own: nginx reads
    POSTs with the same worker that fans messages out, so waiting for each answer would slow the
    readings themselves when nchan falls behind, where wellstream's readings (published to Redis)
    keep their pace and its lag shows as latency. Each reading is stamped when it is sent, so
    nchan's backlog shows as latency the same way."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.sent = 0
        self.answered = 0
        self.refused: list[str] = []
        self.idle = asyncio.Event()
        self.idle.set()
        self.answers = asyncio.create_task(self._read_answers())

    def send(self, requests: Sequence[bytes]) -> None:
        self.writer.write(b"".join(requests))
        self.sent += len(requests)
        self.idle.clear()

    async def _read_answers(self) -> None:
        try:
            while True:
                head = await self.reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                status = int(lines[0].split(" ", 2)[1])
                length = next(
                    (int(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("content-length:")),
                    None,
                )
                if length is None:
                    raise RuntimeError(f"an answer without Content-Length: {head!r}")
                body = await self.reader.readexactly(length)
                self.answered += 1
                # 201: delivered to the subscribers present; 202: stored, nobody subscribed (yet).
                if status not in (201, 202) and len(self.refused) < 5:
                    self.refused.append(f"{status} {body[:200]!r}")
                if self.answered == self.sent:
                    self.idle.set()
        except (asyncio.IncompleteReadError, ConnectionError, RuntimeError, ValueError) as exc:
            self.refused.append(f"connection lost after {self.answered} answers: {exc!r}")
            self.idle.set()


class Publisher:
    """POSTs readings to nchan, each well's in order; one call per pacing tick, like `broker.log.publish`."""

    def __init__(self, connections: list[Connection], port: int) -> None:
        self.connections = connections
        self.port = port
        self.lane: dict[str, int] = {}

    def request(self, reading: Reading) -> bytes:
        body = reading.to_json()  # the bytes wellstream stores and sends for the same reading
        return (
            f"POST /pub/{reading.tenant_id}/{reading.well_id} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    async def publish(self, readings: list[Reading]) -> None:
        lanes: list[list[bytes]] = [[] for _ in self.connections]
        for reading in readings:
            lane = self.lane.setdefault(reading.well_id, len(self.lane) % len(self.connections))
            lanes[lane].append(self.request(reading))
        for conn, batch in zip(self.connections, lanes, strict=True):
            if batch:
                conn.send(batch)
        # Only a full socket buffer holds the pace back (as a slow Redis would hold wellstream's).
        await asyncio.gather(*(conn.writer.drain() for conn in self.connections))


@contextlib.asynccontextmanager
async def publisher(host: str, port: int, count: int, settle_s: float = 60) -> AsyncIterator[Publisher]:
    """`count` keep-alive connections (a well always on the same one, so its readings stay in
    order); `settle_s`: how long nchan may take at the end to answer what was sent (its backlog)."""
    connections = [Connection(*await asyncio.open_connection(host, port)) for _ in range(count)]
    try:
        yield Publisher(connections, port)
        await asyncio.wait_for(asyncio.gather(*(conn.idle.wait() for conn in connections)), settle_s)
        refused = [why for conn in connections for why in conn.refused]
        if refused:
            raise RuntimeError(f"nchan did not take every reading: {refused[:5]}")
    finally:
        for conn in connections:
            conn.answers.cancel()
            conn.writer.close()


async def publish(host: str, port: int, tenant: str, wells: int, rate: float, duration_s: float) -> dict[str, object]:
    # One connection per well, as each well's device or ingest worker would publish its own: nginx
    # answers a connection's pipelined POSTs one at a time, each after its Redis round trip. With 8
    # shared connections, 10,000 streams at 500 readings/s ran nchan at 30 % CPU with p99 21 s (the
    # POSTs queued); with one per well, 73 % and 0.5 s (same machine, same hour).
    async with publisher(host, port, wells) as nchan:
        return asdict(await paced(nchan.publish, tenant, wells, rate, duration_s))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.nchan", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="nginx with nchan on Redis, in the foreground")
    serve_cmd.add_argument("--port", type=int, required=True)
    # bench/run.py gives every gateway its Redis in this variable; wellstream's own reads the same.
    serve_cmd.add_argument("--redis-url", default=os.environ.get("WELLSTREAM_REDIS_URL"))
    pub = commands.add_parser("publish", help="POST paced readings to nchan (bench/publish.py's pacing)")
    pub.add_argument("--host", default="127.0.0.1")
    pub.add_argument("--port", type=int, required=True)
    pub.add_argument("--tenant", default="bench")
    pub.add_argument("--wells", type=int, default=100)
    pub.add_argument("--rate", type=float, default=1000, help="readings per second, all wells together")
    pub.add_argument("--duration", type=float, default=10, help="seconds")
    args = parser.parse_args(argv)
    if args.command == "serve":
        if not args.redis_url:
            parser.error("serve needs --redis-url or WELLSTREAM_REDIS_URL")
        serve(args.port, args.redis_url)
        return
    stats = asyncio.run(publish(args.host, args.port, args.tenant, args.wells, args.rate, args.duration))
    json.dump(stats, sys.stdout)
    print()


if __name__ == "__main__":
    main()
