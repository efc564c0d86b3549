"""The adapter seam: one file per protocol, each only ever produces validated Readings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, NamedTuple, Protocol, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.adapters.deadband import Deadband
from app.alarms.limits import TagAlarms
from app.models import Identifier, Quality, Reading, Reason


class Converted(NamedTuple):
    """A raw sample in engineering units: `value` None when it has none (BAD, with its `reason`)."""

    value: float | None
    quality: Quality
    reason: Reason | None = None


class PointTarget(BaseModel):
    """What every protocol's point shares: the well and tag it feeds, its unit, how a raw value
    becomes an engineering value, its deadband, and how often it is expected to update.

    Engineering units: either `raw * scale + offset`, or a linear range: `raw_min..raw_max` maps
    onto `eu_min..eu_max`. With a range, a raw value outside `fault_below..fault_above` (by
    default the raw range itself) is a fault: BAD, reason `out_of_range`, no value (a broken
    4-20 mA loop reads 0 counts, which is not a pressure). Between the raw range and the fault
    limits (e.g. NAMUR NE 43's 3.8-20.5 mA around 4-20 mA) the value is clamped to the EU range.

    `deadband` is in the engineering unit, or with `deadband_percent` a percent of the EU span
    (`eu_max - eu_min`, so a range is then required). `stale_after_s` overrides the expected
    update interval the protocol derives (see each connection's `stale_after`). `alarms`: the
    tag's alarm limits (app/alarms/limits.py), checked here and run by the alarm engine.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    # A polled source repeats unchanged values, which only a change or a refresh may report again;
    # a source that pushes changes (OPC-UA, MQTT) is reported as it comes unless a deadband is set.
    polled: ClassVar[bool] = False

    well: Identifier
    tag: Identifier
    unit: str | None = None
    scale: float = Field(1.0, allow_inf_nan=False)
    offset: float = Field(0.0, allow_inf_nan=False)
    raw_min: float | None = Field(None, allow_inf_nan=False)
    raw_max: float | None = Field(None, allow_inf_nan=False)
    eu_min: float | None = Field(None, allow_inf_nan=False)
    eu_max: float | None = Field(None, allow_inf_nan=False)
    fault_below: float | None = Field(None, allow_inf_nan=False)
    fault_above: float | None = Field(None, allow_inf_nan=False)
    deadband: float = Field(0.0, ge=0, allow_inf_nan=False)
    deadband_percent: bool = False
    stale_after_s: float | None = Field(None, gt=0, le=86_400)
    alarms: TagAlarms | None = None

    @model_validator(mode="after")
    def _one_consistent_conversion(self) -> Self:
        raw_min, raw_max, eu_min, eu_max = self.raw_min, self.raw_max, self.eu_min, self.eu_max
        if raw_min is None and raw_max is None and eu_min is None and eu_max is None:
            if self.fault_below is not None or self.fault_above is not None:
                raise ValueError("fault_below/fault_above need a range (raw_min, raw_max, eu_min, eu_max)")
            if self.deadband_percent:
                raise ValueError("deadband_percent is a percent of the EU span: set raw_min, raw_max, eu_min, eu_max")
            return self
        if raw_min is None or raw_max is None or eu_min is None or eu_max is None:
            raise ValueError("a range needs all of raw_min, raw_max, eu_min and eu_max")
        if "scale" in self.model_fields_set or "offset" in self.model_fields_set:
            raise ValueError("use either scale/offset or raw_min/raw_max/eu_min/eu_max, not both")
        if raw_min == raw_max or eu_min == eu_max:
            raise ValueError("raw_min/raw_max and eu_min/eu_max must each span more than one value")
        low, high = min(raw_min, raw_max), max(raw_min, raw_max)
        if self.fault_below is not None and self.fault_below > low:
            raise ValueError(f"fault_below must be at or below the raw range ({low:g})")
        if self.fault_above is not None and self.fault_above < high:
            raise ValueError(f"fault_above must be at or above the raw range ({high:g})")
        return self

    def convert(self, raw: float) -> Converted:
        """The engineering value of a finite raw value, or BAD `out_of_range` outside the fault limits."""
        if self.raw_min is None or self.raw_max is None or self.eu_min is None or self.eu_max is None:
            return Converted(raw * self.scale + self.offset, "GOOD")
        low, high = min(self.raw_min, self.raw_max), max(self.raw_min, self.raw_max)
        fault_below = low if self.fault_below is None else self.fault_below
        fault_above = high if self.fault_above is None else self.fault_above
        if not fault_below <= raw <= fault_above:
            return Converted(None, "BAD", "out_of_range")
        clamped = min(max(raw, low), high)
        # Multiplied before divided: whole-number ranges then give exact values (19200 counts -> 1500.0).
        span = (clamped - self.raw_min) * (self.eu_max - self.eu_min) / (self.raw_max - self.raw_min)
        return Converted(self.eu_min + span, "GOOD")

    @property
    def report_deadband(self) -> Deadband | None:
        """The filter for this point's values: None reports every sample."""
        if self.deadband <= 0 and not self.polled:
            return None
        if self.deadband_percent and self.eu_min is not None and self.eu_max is not None:
            return Deadband(self.deadband * abs(self.eu_max - self.eu_min) / 100.0)
        return Deadband(self.deadband)


class ReadingSink(Protocol):
    """Where adapters put readings (the batching publisher). May apply backpressure by awaiting."""

    async def submit(self, readings: Sequence[Reading]) -> None: ...


class Adapter(Protocol):
    """Reads one connection's devices until cancelled, reconnecting by itself.

    `connected` and `errors` (failed connects and lost connections so far) feed the worker's
    health line and metrics; they are read-only: only the adapter's reconnect loop writes them.
    """

    @property
    def name(self) -> str: ...

    @property
    def connected(self) -> bool: ...

    @property
    def errors(self) -> int: ...

    def current(self) -> list[Reading]:
        """The last reading reported for each tag (to republish after the worker's lease was lost)."""
        ...

    async def run(self, sink: ReadingSink) -> None: ...
