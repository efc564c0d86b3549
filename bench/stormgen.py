"""Reconnect-storm clients: N per-well SSE streams that behave like a browser's EventSource.

Run by bench/storm.py as worker processes; talks to it over stdin/stdout, one JSON line each:
    <- {"opened": n, "failed": n, "seconds": s}           once every stream on --port answered (or timed out)
    -> {"cmd": "settle", "t0": T, "timeout": s}          T: the monotonic time gateway A got SIGTERM
    <- {"back_s": [...], "ok_s": [...], "attempt_s": [...], "failed": {status: n}, "pending": n, ...}
                                                          once every stream is back or failed, or at the timeout
    -> {"cmd": "check", "timeout": s}                    after the publisher stopped: compare with the log
    <- {"expected": n, "received": n, "missing": n, "duplicates": n, ...}   then the process exits

Each stream opens on gateway A (--port). When A ends its response (the drain's goodbye: a `retry:`
hint, then the end of the chunked body) or the connection breaks, the stream waits the last
`retry:` it was sent, as EventSource does, and reopens on gateway B (--resume-port) with
`Last-Event-ID` set to the last `id:` it saw. EventSource semantics decide what counts as a failure:
a network error (refused, reset before the head) is retried after the same delay; any answer other
than 200 ends the stream for good (EventSource's "fail the connection"), and its status is reported.

Every frame is parsed as it arrives (raw asyncio protocols, the chunked body decoded per TCP read,
one pass per SSE frame): the cost of reading each event is paid here, as a browser pays it. Reading
ids are kept per stream across both connections (as 64-bit ints), so the check can say, per stream,
which of its well's readings after its first event (the snapshot) were missed, repeated or reordered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from array import array
from collections import Counter
from itertools import pairwise
from typing import cast

import redis.asyncio

from app.models import Topic
from app.streams.redis.keys import log_key

SEQ_BITS = 20  # an id's sequence number within its millisecond; the bench publishes far fewer than 2**20 per ms


def id_key(text: bytes) -> int:
    """`<ms>-<seq>` as one int that orders like the id (ms < 2**43 until the year 2248)."""
    ms, _, seq = text.partition(b"-")
    return int(ms) << SEQ_BITS | int(seq)


class Stream:
    """One EventSource: its ids and timings across the connection to A and the ones to B."""

    def __init__(self, index: int, well: str, request: bytes) -> None:
        self.index = index
        self.well = well
        self.request = request  # without Last-Event-ID and the final CRLF
        self.first_id: int | None = None  # the first event's id: the snapshot on A
        self.last_id: bytes | None = None  # what EventSource would send as Last-Event-ID
        self.ids = array("q")  # every reading's id, in arrival order, A's then B's
        self.on_a = 0  # of `ids`, how many came on A
        self.retry_ms = 3000  # EventSource's default until the server sends one
        self.opened_on_a = False
        self.goodbye = False  # a `retry:` after the first frame: the drain's hint
        self.ended_at: float | None = None  # A's response ended (or its connection broke)
        self.attempt_at: float | None = None  # the first attempt on B
        self.ok_at: float | None = None  # B's 200
        self.back_at: float | None = None  # the first event with an id on B: streaming again
        self.failed_status: int | None = None
        self.attempts = 0
        self.network_errors: Counter[str] = Counter()  # by kind: refused, closed before the head, ...
        self.resets = 0
        self.b_ends = 0  # B ended a stream after its 200 (it never should during the run)
        self.conn: Conn | None = None  # the current connection


class Conn(asyncio.Protocol):
    """One HTTP/1.1 connection of a stream: head, chunked body, SSE frames."""

    def __init__(self, client: Client, stream: Stream, on_b: bool, request: bytes) -> None:
        self.client = client
        self.stream = stream
        self.on_b = on_b
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.status = 0
        self.chunked = True
        self.raw = b""  # undecoded body bytes (a chunk-size line cut by a TCP read)
        self.remaining = 0  # bytes left in the current chunk
        self.crlf = False  # the CRLF after a chunk's data is due
        self.body = b""  # decoded bytes after the last complete SSE frame
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.stream.conn = self
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        if not self.status:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end].lower(), self.head[end + 4 :]
            self.head = b""
            self.status = int(head[9:12])
            self.chunked = b"transfer-encoding: chunked" in head
            self.client.answered(self, self.status)
            if self.status != 200:
                self.finish()
                return
        if self.chunked:
            data = self.dechunk(data)
        if data:
            self.frames(data)
        if self.done:
            return
        if self.remaining < 0:  # the last chunk: the server ended this response
            self.finish()

    def dechunk(self, data: bytes) -> bytes:
        raw = self.raw + data if self.raw else data
        out: list[bytes] = []
        pos, size = 0, len(raw)
        while pos < size and self.remaining >= 0:
            if self.remaining:
                take = min(self.remaining, size - pos)
                out.append(raw[pos : pos + take])
                pos += take
                self.remaining -= take
                self.crlf = not self.remaining
            elif self.crlf:
                if size - pos < 2:
                    break
                pos += 2
                self.crlf = False
            else:
                eol = raw.find(b"\r\n", pos)
                if eol < 0:
                    break
                length = int(raw[pos:eol].split(b";", 1)[0], 16)
                pos = eol + 2
                self.remaining = length or -1  # -1: the terminating chunk was read
        self.raw = raw[pos:]
        return b"".join(out)

    def frames(self, data: bytes) -> None:
        buf = self.body + data if self.body else data
        end = buf.rfind(b"\n\n")
        if end < 0:
            self.body = buf
            return
        self.body = buf[end + 2 :]
        stream = self.stream
        for frame in buf[:end].split(b"\n\n"):
            ident = event = None
            for line in frame.split(b"\n"):
                if line.startswith(b"id: "):
                    ident = line[4:]
                elif line.startswith(b"event: "):
                    event = line[7:]
                elif line.startswith(b"retry: "):
                    stream.retry_ms = int(line[7:])
                    # The first frame of every stream is a bare `retry:`; one after an event is the goodbye.
                    stream.goodbye = stream.goodbye or (stream.last_id is not None and not self.on_b)
            if ident is None:
                continue
            stream.last_id = ident
            if self.on_b and stream.back_at is None:
                stream.back_at = time.monotonic()
            if event == b"reading":
                stream.ids.append(id_key(ident))
                if not self.on_b:
                    stream.on_a += 1
            elif event == b"snapshot" and stream.first_id is None:
                stream.first_id = id_key(ident)
            elif event == b"reset":
                stream.resets += 1

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        if self.transport is not None:
            self.transport.close()
        self.client.ended(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.finish()


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.loop = asyncio.get_running_loop()
        self.streams: list[Stream] = []
        self.opening: dict[int, asyncio.Future[bool]] = {}
        self.stopping = False  # the check has started: no more reconnects

    async def connect(self, stream: Stream, on_b: bool) -> None:
        port = self.args.resume_port if on_b else self.args.port
        request = stream.request
        if on_b:
            stream.attempts += 1
            stream.attempt_at = stream.attempt_at or time.monotonic()
            if stream.last_id is not None:
                request += b"Last-Event-ID: " + stream.last_id + b"\r\n"
        request += b"\r\n"
        try:
            await self.loop.create_connection(lambda: Conn(self, stream, on_b, request), self.args.host, port)
        except OSError as exc:
            if on_b:
                stream.network_errors[type(exc).__name__] += 1
                self.later(stream)
            else:
                self.opening[stream.index].set_result(False)

    def later(self, stream: Stream) -> None:
        """Reopen on B after the stream's last retry hint, as EventSource does after an end or a network error."""
        if not self.stopping:
            self.loop.call_later(stream.retry_ms / 1000, lambda: self.loop.create_task(self.connect(stream, True)))

    def answered(self, conn: Conn, status: int) -> None:
        stream = conn.stream
        if not conn.on_b:
            future = self.opening[stream.index]
            if future.done():  # answered after the open timeout: given up already
                conn.finish()
                return
            stream.opened_on_a = status == 200
            future.set_result(stream.opened_on_a)
        elif status == 200:
            stream.ok_at = stream.ok_at or time.monotonic()
        else:
            stream.failed_status = status  # EventSource gives up on any status but 200

    def ended(self, conn: Conn) -> None:
        stream = conn.stream
        if not conn.on_b:
            future = self.opening[stream.index]
            if not future.done():
                future.set_result(False)  # broken before its head: never opened
                return
            if not stream.opened_on_a:
                return
            stream.ended_at = time.monotonic()
            self.later(stream)
        elif conn.status == 200:
            stream.b_ends += 1
            self.later(stream)
        elif not conn.status:  # broken before B's head (B closed it unanswered): a network error, retried
            stream.network_errors["closed before the head"] += 1
            self.later(stream)

    async def open_all(self) -> None:
        args = self.args
        started = time.monotonic()
        for n in range(args.first, args.first + args.streams):
            well = f"well-{n % args.wells + 1:03d}"
            request = (
                f"GET /tenants/{args.tenant}/wells/{well}/stream HTTP/1.1\r\nHost: {args.host}\r\n"
                f"Authorization: Bearer {args.token}\r\nAccept: text/event-stream, application/json\r\n"
                "Cache-Control: no-cache\r\n"
            ).encode()
            stream = Stream(len(self.streams), well, request)
            self.streams.append(stream)
            self.opening[stream.index] = self.loop.create_future()
            await self.connect(stream, on_b=False)
            if len(self.streams) % 200 == 0:
                await asyncio.sleep(0)  # let responses in while still connecting
        _, pending = await asyncio.wait(self.opening.values(), timeout=args.open_timeout)
        for future in pending:
            future.set_result(False)
        for stream in self.streams:
            if not stream.opened_on_a and stream.conn is not None:
                stream.conn.finish()  # given up, as a client would: a late 200 must not count
        opened = sum(s.opened_on_a for s in self.streams)
        emit({"opened": opened, "failed": len(self.streams) - opened, "seconds": round(time.monotonic() - started, 2)})

    async def settle(self, t0: float, timeout_s: float) -> dict[str, object]:
        """Wait until every stream opened on A is back on B or has failed, at most `timeout_s`."""
        streams = [s for s in self.streams if s.opened_on_a]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(s.back_at is not None or s.failed_status is not None for s in streams):
                break
            await asyncio.sleep(0.05)

        def since(values: list[float | None]) -> list[float]:
            return sorted(round(v - t0, 3) for v in values if v is not None)

        return {
            "back_s": since([s.back_at for s in streams]),
            "ok_s": since([s.ok_at for s in streams]),
            "attempt_s": since([s.attempt_at for s in streams]),
            "failed": dict(Counter(str(s.failed_status) for s in streams if s.failed_status is not None)),
            "pending": sum(1 for s in streams if s.back_at is None and s.failed_status is None),
            "goodbyes": sum(s.goodbye for s in streams),
            "ended_before_sigterm": sum(1 for s in streams if s.ended_at is not None and s.ended_at < t0),
            "not_ended": sum(1 for s in streams if s.ended_at is None),
            "network_errors": sum(s.network_errors.total() for s in streams),
            "network_kinds": dict(sum((s.network_errors for s in streams), Counter[str]())),
            "attempts": sum(s.attempts for s in streams),
            "retry_ms": [min(s.retry_ms for s in streams), max(s.retry_ms for s in streams)] if streams else [],
        }

    async def check(self, timeout_s: float) -> dict[str, object]:
        """Each stream's reading ids against its well's log, from its first event on (the publisher has
        stopped). Only streams that came back on B: the others are reported as failed or pending."""
        streams = [s for s in self.streams if s.opened_on_a and s.first_id is not None and s.back_at is not None]
        logs: dict[str, list[int]] = {}
        client = redis.asyncio.Redis.from_url(self.args.redis_url)
        try:
            for well in sorted({s.well for s in streams}):
                start = min(cast(int, s.first_id) for s in streams if s.well == well)
                lower = f"({start >> SEQ_BITS}-{start & (2**SEQ_BITS - 1)}"
                entries = await client.xrange(log_key(Topic(self.args.tenant, well)), min=lower, max="+")
                logs[well] = [id_key(raw) for raw, _ in cast(list[tuple[bytes, object]], entries)]
        finally:
            await client.aclose()

        def behind(s: Stream) -> bool:
            log = logs[s.well]
            return bool(log) and (not s.ids or s.ids[-1] < log[-1]) and log[-1] > cast(int, s.first_id)

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not any(behind(s) for s in streams):
                break
            await asyncio.sleep(0.1)
        late = sum(behind(s) for s in streams)
        self.stopping = True
        totals: Counter[str] = Counter()
        for s in streams:
            first = cast(int, s.first_id)
            expected = {k for k in logs[s.well] if k > first}
            received = set(s.ids)
            missing = len(expected - received)
            duplicates = len(s.ids) - len(received)
            totals["expected"] += len(expected)
            totals["received"] += len(s.ids)
            totals["received_on_b"] += len(s.ids) - s.on_a
            totals["missing"] += missing
            totals["streams_with_gaps"] += missing > 0
            totals["duplicates"] += duplicates
            totals["streams_with_duplicates"] += duplicates > 0
            totals["out_of_order"] += sum(1 for a, b in pairwise(s.ids) if b < a)
            totals["not_in_log"] += len(received - expected)
            # Where a gap or repeat sits: across the hand-over from A to B, or inside one connection.
            if 0 < s.on_a < len(s.ids):
                last_a, first_b = s.ids[s.on_a - 1], s.ids[s.on_a]
                totals["handover_missing"] += sum(1 for k in expected if last_a < k < first_b)
                totals["handover_repeats"] += first_b <= last_a
            totals["resets"] += s.resets
            totals["b_ends"] += s.b_ends
        return {**totals, "streams_checked": len(streams), "behind_at_timeout": late}

    def close(self) -> None:
        self.stopping = True
        for task in asyncio.all_tasks(self.loop):
            if task is not asyncio.current_task():
                task.cancel()


async def run(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    client = Client(args)
    await client.open_all()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        command = json.loads(line)
        if command["cmd"] == "settle":
            emit(await client.settle(float(command["t0"]), float(command["timeout"])))
        elif command["cmd"] == "check":
            emit(await client.check(float(command["timeout"])))
            break
    client.close()


def emit(message: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stormgen", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="gateway A: where the streams open")
    parser.add_argument("--resume-port", type=int, required=True, help="gateway B: where they come back")
    parser.add_argument("--redis-url", required=True, help="the log the check reads")
    parser.add_argument("--tenant", default="bench")
    parser.add_argument("--wells", type=int, default=100)
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--first", type=int, default=0, help="index of this worker's first stream")
    parser.add_argument("--token", required=True)
    parser.add_argument("--open-timeout", type=float, default=60)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(run(args))
    except ImportError:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
