"""The gateway's /metrics: what the hub, its streams and the admission checks count.

The hot paths bump plain ints (app/gateway/stats.py, the audit refusal counter); the collector
reads them at scrape time. One registry per gateway app, so several apps in one process (tests)
never collide.

`serve_metrics` serves the same text alone on a port of its own, for the workers of
`serve --workers` (app/gateway/workers.py): on the port they share, a scrape reaches whichever
worker the kernel picks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import TYPE_CHECKING, get_args

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from app.auth import audit
from app.streams.codec import Source

if TYPE_CHECKING:
    from app.gateway.hub import Hub

__all__ = ["CONTENT_TYPE", "counter", "gateway_registry", "may_scrape", "render", "serve_metrics"]

logger = logging.getLogger(__name__)

# The classic text format every Prometheus (2.x too) and agent reads; our names need no escaping.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class GatewayCollector(Collector):
    def __init__(self, hub: Callable[[], Hub | None]) -> None:
        self._hub = hub

    def collect(self) -> Iterable[Metric]:
        hub = self._hub()
        if hub is None:  # before the lifespan started
            return
        stats = hub.stats
        open_streams = GaugeMetricFamily("wellstream_open_streams", "Open SSE streams", labels=["tenant"])
        for tenant, count in sorted(hub.streams_by_tenant().items()):
            open_streams.add_metric([tenant], count)
        yield open_streams
        yield GaugeMetricFamily(
            "wellstream_hub_subscriptions", "Tenants this gateway holds a live subscription for", hub.tenants
        )
        yield GaugeMetricFamily(
            "wellstream_live", "1 when the live feed is connected and no gap is being filled", hub.live
        )
        yield counter("wellstream_streams_opened", "Streams that got a 200 and started", stats.streams_opened)
        closed = CounterMetricFamily("wellstream_streams_closed", "Streams ended, by reason", labels=["reason"])
        for reason, count in sorted(stats.streams_closed.items()):
            closed.add_metric([reason], count)
        yield closed
        yield counter("wellstream_events_sent", "Reading events sent live to streams", stats.events_sent)
        yield counter("wellstream_bytes_sent", "Bytes of live frames sent to streams", stats.bytes_sent)
        yield counter("wellstream_snapshots", "Catch-ups that sent a snapshot", stats.snapshots)
        yield counter("wellstream_replays", "Catch-ups that resumed from history (Last-Event-ID)", stats.replays)
        yield counter("wellstream_resets", "Resumes older than history: reset + snapshot", stats.resets)
        yield counter("wellstream_slow_evictions", "Streams ended because their queue filled", stats.slow_disconnects)
        yield counter("wellstream_send_timeouts", "Streams ended because a send was stuck", stats.send_timeouts)
        yield counter(
            "wellstream_stalled_streams",
            "Streams ended because a reading waited unsent past stream.stall_s (open but silent): should stay 0",
            stats.stalled,
        )
        yield counter(
            "wellstream_silent_streams",
            "Streams ended because their wells published and no reading reached them within stream.stall_s:"
            " should stay 0",
            stats.silent,
        )
        yield counter(
            "wellstream_feed_silences",
            "Times the live feed had not delivered what the log's clock said was published, and was reconnected:"
            " should stay 0",
            stats.feed_silences,
        )
        yield counter(
            "wellstream_stale_marked",
            "Tags this gateway marked stale because the ingest worker feeding them stopped renewing its lease",
            stats.stale_marked,
        )
        malformed = CounterMetricFamily(
            "wellstream_malformed",
            "Stored values that were no reading of their key (another producer wrote them), skipped each time read",
            labels=["source"],
        )
        for source in get_args(Source):  # every source, 0 included: an alert can watch a series that exists
            malformed.add_metric([source], hub.malformed.get(source, 0))
        yield malformed
        yield counter("wellstream_redis_reconnects", "Live feed reconnects to Redis", hub.feed_reconnects)
        yield counter("wellstream_gap_fills", "Live feed gaps filled from history (fills completed)", stats.gap_fills)
        yield counter("wellstream_gap_events", "Events sent from history by gap fills", stats.gap_events)
        refused = CounterMetricFamily(
            "wellstream_refusals", "Auth failures and limit hits, by kind and reason", labels=["kind", "reason"]
        )
        for (kind, reason), count in sorted(audit.refusals.items()):
            refused.add_metric([kind, reason], count)
        yield refused
        latency = stats.latency
        yield HistogramMetricFamily(
            "wellstream_delivery_latency_seconds",
            "Device timestamp to live send, oldest reading of each send",
            buckets=latency.cumulative(),
            sum_value=latency.sum,
        )


def gateway_registry(hub: Callable[[], Hub | None]) -> CollectorRegistry:
    """`hub` is called at each scrape: the hub exists only while the app's lifespan runs."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(hub))
    ProcessCollector(registry=registry)  # open fds, memory, CPU: what an SRE sizes by
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


# A scraper's request is one short head: anything slower or longer is not one.
HEAD_TIMEOUT_S = 5.0
HEAD_LIMIT_BYTES = 8192


async def serve_metrics(
    registry: CollectorRegistry, host: str, port: int, allow: Sequence[IPv4Network | IPv6Network]
) -> asyncio.Server:
    """`GET /metrics` alone on host:port, one request per connection, for the peers in `allow` (as
    the route: it names tenants); anything else is a 404. Closing the returned server stops it."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HEAD_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            writer.write(_metrics_response(head, writer.get_extra_info("peername"), registry, allow))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # not a scraper, or gone: nothing to answer
        finally:
            writer.close()

    server = await asyncio.start_server(answer, host, port, limit=HEAD_LIMIT_BYTES, reuse_address=True)
    logger.info("serving /metrics on http://%s:%d", host, port)
    return server


def may_scrape(host: str, allow: Sequence[IPv4Network | IPv6Network]) -> bool:
    """Whether this peer may read /metrics (it names tenants): only `server.metrics_allow`. A
    refusal is logged; the caller answers 404, so nobody else learns the route exists."""
    try:
        allowed = any(ip_address(host) in network for network in allow)
    except ValueError:
        allowed = False
    if not allowed:
        logger.info("GET /metrics -> 404: peer %s is not in server.metrics_allow", host)
    return allowed


def _metrics_response(
    head: bytes, peer: object, registry: CollectorRegistry, allow: Sequence[IPv4Network | IPv6Network]
) -> bytes:
    method, _, rest = head.partition(b" ")
    target = rest.partition(b" ")[0].partition(b"?")[0]
    host = peer[0] if isinstance(peer, tuple) and peer else ""
    if method != b"GET" or target != b"/metrics" or not may_scrape(host, allow):
        return _http(b"404 Not Found", b"application/json", b'{"error":"not found"}')
    return _http(b"200 OK", CONTENT_TYPE.encode(), render(registry))


def _http(status: bytes, content_type: bytes, body: bytes) -> bytes:
    head = b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
    return head % (status, content_type, len(body)) + body
