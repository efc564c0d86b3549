"""What the hub and its streams count, as plain ints bumped on the hot path.

Nothing here takes a lock or allocates per event; app/metrics.py turns these into Prometheus
families when /metrics is scraped.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

# Seconds from a reading's device timestamp to its live send: from "fine" to "a device clock is off".
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class LatencyHistogram:
    """Cumulative-on-export histogram: observe() is one bisect and three increments."""

    __slots__ = ("count", "counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, n in zip((*map(str, LATENCY_BUCKETS), "+Inf"), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


@dataclass
class HubStats:
    streams_opened: int = 0
    streams_closed: Counter[str] = field(default_factory=Counter)  # by end reason
    events_sent: int = 0
    bytes_sent: int = 0
    snapshots: int = 0  # catch-ups that sent the latest values
    replays: int = 0  # catch-ups that resumed from history by Last-Event-ID
    resets: int = 0  # resumes whose id history no longer reached: reset + snapshot
    slow_disconnects: int = 0
    send_timeouts: int = 0
    stalled: int = 0  # streams ended because a reading waited unsent past stream.stall_s: should stay 0
    silent: int = 0  # streams ended because their wells published and nothing reached them: should stay 0
    feed_silences: int = 0  # times the live feed fell behind the log's clock and was reconnected: should stay 0
    stale_marked: int = 0  # tags this gateway's lease sweeps marked stale (their ingest worker stopped)
    gap_fills: int = 0  # gaps filled from history after the live feed came back
    gap_events: int = 0  # events fanned out from history when the live feed came back
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
