"""Load generator: N SSE connections on raw asyncio protocols, cheap enough for 100k events/s.

Run by bench/run.py as worker processes; talks to it over stdin/stdout, one JSON line each:
    -> {"cmd": "measure"}      start counting (resets counters)
    -> {"cmd": "report"}       print a report and exit
    <- {"opened": n, "failed": n, "seconds": s}    once every connection answered (or timed out)
    <- {"events": n, "chunks": n, "dropped": n, "per_stream_min": n, "silent": n, "ended_before_measuring": n, ...}
A stream is silent when it was opened (200) and is still open, yet received no reading while
measuring: the failure an operator must never see (a stream that says live and shows old values).
A stream is over when the server ends its response (the last chunk, after a goodbye such as
"stream stalled") even if the connection stays open for keep-alive: a browser's EventSource
reconnects then, so it ends there (dropped inside the measuring window, else counted in
ended_before_measuring), never open. A stream still unanswered after
--open-timeout is given up (closed), as a client would, so `events` only counts opened streams.
Latency: each received chunk's first reading carries its publish time; now minus that is the
device-to-client latency of the oldest event in the chunk, so the figures are an upper
bound of per-event latency. Samples are written to `--samples FILE` as float64 seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import sys
import time
from array import array
from datetime import datetime
from pathlib import Path
from typing import cast

MARKER = b"event: reading"
# The terminating chunk of a chunked response, after the previous chunk's CRLF. SSE frames use
# bare LF, so this cannot occur inside one.
END = b"\r\n0\r\n\r\n"
STAMP = b'"timestamp":"'


class Counters:
    def __init__(self) -> None:
        self.measuring = False
        self.events = 0
        self.chunks = 0
        self.dropped = 0
        self.latencies = array("d")


class StreamProtocol(asyncio.Protocol):
    def __init__(self, request: bytes, counters: Counters, opened: asyncio.Future[bool]) -> None:
        self.request = request
        self.counters = counters
        self.opened = opened
        self.head = b""
        self.tail = b""
        self.events = 0
        self.ok = False
        self.closed = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.opened.done():
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            ok = self.ok = self.head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200"))
            self.opened.set_result(ok)
            if not ok:
                assert self.transport is not None
                self.transport.close()
                return
            data = self.head[end + 2 :]  # from the head's last CRLF: an empty body is then END too
        buf = self.tail + data
        if END in buf:
            # The server ended this stream. Without this it stayed "open" until the server closed
            # the idle keep-alive connection (granian: 10 s later, Hypercorn: 75 s), so it counted
            # as dropped or not by where that fell against the measuring window, or as silent.
            assert self.transport is not None
            self.transport.close()
        found = buf.count(MARKER)
        self.tail = buf[-(len(MARKER) - 1) :]
        if not found:
            return
        self.events += found
        counters = self.counters
        if counters.measuring:
            counters.events += found
            counters.chunks += 1
            at = buf.find(STAMP)
            if at >= 0:
                stamp = buf[at + len(STAMP) : buf.find(b'"', at + len(STAMP))].decode()
                counters.latencies.append(time.time() - datetime.fromisoformat(stamp).timestamp())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.opened.done():
            self.opened.set_result(False)
        elif self.counters.measuring:
            self.counters.dropped += 1


async def run(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    counters = Counters()
    host, port = args.host, args.port
    streams: list[StreamProtocol] = []
    futures: list[asyncio.Future[bool]] = []
    started = time.monotonic()
    for n in range(args.first, args.first + args.streams):
        well = f"well-{n % args.wells + 1:03d}"
        path = f"/tenants/{args.tenant}/stream" if args.tenant_stream else f"/tenants/{args.tenant}/wells/{well}/stream"
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {args.token}\r\nAccept: text/event-stream, application/json\r\n\r\n"
        ).encode()
        opened: asyncio.Future[bool] = loop.create_future()
        try:
            _, protocol = await loop.create_connection(
                functools.partial(StreamProtocol, request, counters, opened), host, port
            )
        except OSError:
            opened.set_result(False)
            futures.append(opened)
            continue
        streams.append(protocol)
        futures.append(opened)
        if len(futures) % 200 == 0:
            await asyncio.sleep(0)  # let responses in while still connecting
    done, _ = await asyncio.wait(futures, timeout=args.open_timeout)
    ok = sum(1 for f in done if f.result())
    for stream in streams:
        if not stream.opened.done() and stream.transport is not None:
            # Given up: its late 200 would add events to a run that counts it as not opened.
            stream.transport.close()
    emit({"opened": ok, "failed": len(futures) - ok, "seconds": round(time.monotonic() - started, 2)})
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        command = json.loads(line)["cmd"]
        if command == "measure":
            counters.events = counters.chunks = counters.dropped = 0
            counters.latencies = array("d")
            for stream in streams:
                stream.events = 0
            counters.measuring = True
        elif command == "report":
            counters.measuring = False
            per_stream = [s.events for s in streams] or [0]
            silent = sum(1 for s in streams if s.ok and not s.closed and s.events == 0)
            # Got their 200, then ended (or were closed) before the measuring window: neither dropped
            # nor silent, yet the rows count them as opened, so they show only as loss without this.
            ended_early = sum(1 for s in streams if s.ok and s.closed) - counters.dropped
            await asyncio.to_thread(Path(args.samples).write_bytes, counters.latencies.tobytes())
            emit(
                {
                    "events": counters.events,
                    "chunks": counters.chunks,
                    "dropped": counters.dropped,
                    "per_stream_min": min(per_stream),
                    "per_stream_max": max(per_stream),
                    "silent": silent,
                    "ended_before_measuring": ended_early,
                }
            )
            return


def emit(message: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tenant", default="bench")
    parser.add_argument("--wells", type=int, default=100)
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--first", type=int, default=0, help="index of this worker's first stream")
    parser.add_argument("--token", required=True)
    parser.add_argument("--samples", required=True, help="file for latency samples (float64 seconds)")
    parser.add_argument("--open-timeout", type=float, default=60)
    parser.add_argument("--tenant-stream", action="store_true", help="one stream of every well per connection")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(run(args))
    except ImportError:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
