"""What a connection tells the world about its tags: samples, and the truth when samples stop.

Every adapter hands its samples to one Reporter, which converts them to engineering units,
reports them by exception (app/adapters/deadband.py) and remembers, per tag, what it last
reported and when it last heard of it. From that it also says what a silent device cannot:

- `lost()`: every tag BAD with reason `comm_failure` and no value, when the connection has been
  down for its `comm_timeout_s` (app/adapters/reconnect.py decides when).
- `overdue(now)`: a tag whose samples stopped for longer than its expected interval (times
  STALE_FACTOR, or its `stale_after_s`) while the connection is up: UNCERTAIN, reason `stale`,
  with its last value and that value's own timestamp (it is as old as it was).

Both are remembered as reported, so the next real sample is news and brings the truth back.
A tag is keyed by (well, tag): the site file refuses one fed by two points.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from app.adapters.base import PointTarget
from app.adapters.deadband import ReportByException
from app.models import Quality, Reading, Reason, SourceProtocol, utc_now_iso

# How many expected intervals a tag may miss before it is stale. Three: one late sample is
# jitter, two can be a retry; three in a row is a tag that stopped.
STALE_FACTOR = 3.0


@dataclass(frozen=True, slots=True)
class Source:
    """Whose readings these are: stamped on each one."""

    tenant: str
    protocol: SourceProtocol
    connection_id: str


@dataclass(slots=True)
class _Tag:
    point: PointTarget
    stale_after_s: float | None
    heard_at: float  # monotonic: the last sample, or when the connection came up
    last: Reading | None = None  # the last reading reported


class Reporter:
    """The one owner of a connection's per-tag state.

    Args:
        source: stamped on every reading.
        points: every point of the connection.
        stale_after: a point's expected update interval times the factor (None: never stale), as
            its connection derives it.
        refresh_s: report an unchanged value again this often (None: never).
    """

    def __init__(
        self,
        source: Source,
        points: Sequence[PointTarget],
        stale_after: Callable[[PointTarget], float | None],
        refresh_s: float | None = None,
    ) -> None:
        self._source = source
        now = time.monotonic()
        self._tags = {(p.well, p.tag): _Tag(p, stale_after(p), now) for p in points}
        self._filter = ReportByException(refresh_s)

    def sample(
        self,
        point: PointTarget,
        raw: float | None,
        quality: Quality,
        timestamp: str,
        *,
        reason: Reason | None = None,
        status_code: str | None = None,
        now: float | None = None,
    ) -> Reading | None:
        """The reading for one raw sample, or None if it is no news (within its deadband).

        A raw value is converted to engineering units (which may find it out of range); a BAD
        sample, or one without a finite value, has no value.
        """
        now = time.monotonic() if now is None else now
        tag = self._tags[(point.well, point.tag)]
        tag.heard_at = now
        value: float | None = None
        if raw is not None and quality != "BAD" and math.isfinite(raw):
            value, converted_quality, converted_reason = point.convert(raw)
            if converted_quality == "BAD":
                quality, reason = converted_quality, converted_reason
            elif value is not None and not math.isfinite(value):  # scaled past a float's range
                value, quality, reason = None, "BAD", "out_of_range"
        else:  # BAD, or without a number (NaN, null): the device has no value for it
            quality, reason = "BAD", reason or "device_error"
        # Built before the filter hears of it: a sample that is not a valid reading (a bad
        # timestamp) raises here and leaves the filter as it was.
        reading = self._reading(point, value, quality, timestamp, reason, status_code)
        if not self._filter.due((point.well, point.tag), value, quality, point.report_deadband, now, reason):
            return None
        tag.last = reading
        return reading

    def current(self) -> list[Reading]:
        """The last reading reported for each tag: what this connection knows now."""
        return [tag.last for tag in self._tags.values() if tag.last is not None]

    def connected(self) -> None:
        """The connection is (back) up: every tag gets a full interval before it can be stale."""
        now = time.monotonic()
        for tag in self._tags.values():
            tag.heard_at = now

    def lost(self) -> list[Reading]:
        """BAD comm_failure for every tag not already reported so."""
        now, stamp = time.monotonic(), utc_now_iso()
        readings = []
        for key, tag in self._tags.items():
            if tag.last is not None and tag.last.reason == "comm_failure":
                continue
            tag.last = self._reading(tag.point, None, "BAD", stamp, "comm_failure", None)
            self._filter.reported(key, None, "BAD", "comm_failure", now)
            readings.append(tag.last)
        return readings

    def overdue(self, now: float | None = None) -> list[Reading]:
        """UNCERTAIN stale for every tag that has a value and missed its expected interval."""
        now = time.monotonic() if now is None else now
        readings = []
        for key, tag in self._tags.items():
            last = tag.last
            if tag.stale_after_s is None or now - tag.heard_at <= tag.stale_after_s:
                continue
            if last is None or last.value is None or last.reason == "stale":
                continue  # nothing to call stale: no value yet, or BAD already says more
            tag.last = self._reading(tag.point, last.value, "UNCERTAIN", last.timestamp, "stale", None)
            self._filter.reported(key, last.value, "UNCERTAIN", "stale", now)
            readings.append(tag.last)
        return readings

    def _reading(
        self,
        point: PointTarget,
        value: float | None,
        quality: Quality,
        timestamp: str,
        reason: Reason | None,
        status_code: str | None,
    ) -> Reading:
        return Reading(
            tenant_id=self._source.tenant,
            well_id=point.well,
            tag_name=point.tag,
            value=value,
            quality=quality,
            timestamp=timestamp,
            source_protocol=self._source.protocol,
            connection_id=self._source.connection_id,
            unit=point.unit,
            reason=reason,
            status_code=status_code,
        )
