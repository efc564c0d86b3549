"""Report by exception: one filter for every adapter that would otherwise repeat itself.

A sample is reported when it is the first for its key, when its quality (or its reason)
changed, when its value moved past the deadband since the value last reported (not the last
sample: a slow drift is reported once it adds up), or when `refresh_s` has passed since the
last report, so a steady value still shows it is alive. A missing value (BAD) differs from
any number. A percent deadband is turned into an amount by the point (a percent of its
engineering span: app/adapters/base.py), so it means the same near zero as near full scale.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from app.models import Quality, Reason


@dataclass(frozen=True, slots=True)
class Deadband:
    """How far a value must move to be reported, in the value's unit. An amount of 0 still drops
    a value that did not change at all."""

    amount: float = 0.0

    def exceeded(self, last: float, value: float) -> bool:
        return abs(value - last) > self.amount


@dataclass(frozen=True, slots=True)
class _Reported:
    value: float | None
    quality: Quality
    reason: Reason | None
    at: float


class ReportByException:
    """Decides, sample by sample, which ones are news; remembers what it let through.

    Args:
        refresh_s: report an unchanged value again once this long has passed since its last
            report (None: never). Only checked when a sample arrives: a source that goes quiet
            is not refreshed by this filter.
    """

    def __init__(self, refresh_s: float | None = None) -> None:
        self._refresh_s = refresh_s
        self._last: dict[Hashable, _Reported] = {}

    def due(
        self,
        key: Hashable,
        value: float | None,
        quality: Quality,
        deadband: Deadband | None,
        now: float,
        reason: Reason | None = None,
    ) -> bool:
        """Whether to report this sample of `key` taken at `now` (any monotonic clock, in seconds).

        `deadband` None reports every sample: for sources that already report by exception.
        """
        last = self._last.get(key)
        if (
            deadband is None
            or last is None
            or self._stale(last, now)
            or _changed(last, value, quality, reason, deadband)
        ):
            self._last[key] = _Reported(value, quality, reason, now)
            return True
        return False

    def reported(self, key: Hashable, value: float | None, quality: Quality, reason: Reason | None, now: float) -> None:
        """Remember a report made without a sample (a device declared lost, a tag stale), so the
        next real sample is news."""
        self._last[key] = _Reported(value, quality, reason, now)

    def forget(self) -> None:
        """Report every key's next sample, whatever it is (after a reconnect, say)."""
        self._last.clear()

    def _stale(self, last: _Reported, now: float) -> bool:
        return self._refresh_s is not None and now - last.at >= self._refresh_s


def _changed(last: _Reported, value: float | None, quality: Quality, reason: Reason | None, deadband: Deadband) -> bool:
    if quality != last.quality or reason != last.reason:
        return True
    if value is None or last.value is None:
        return value is not last.value
    return deadband.exceeded(last.value, value)
