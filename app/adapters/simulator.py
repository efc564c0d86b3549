"""A believable field for demos and tests: tubing and casing pressure, flow and temperature.

Each tag follows a slow random-walk drift around its own set point, with measurement noise,
and now and then reports UNCERTAIN (a sensor at the edge of its range) or BAD (no value),
the way a real well's RTU does.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.adapters.base import ReadingSink
from app.cancellation import pause
from app.models import Identifier, Quality, Reading, Reason, utc_now_iso


class SimulatorConnection(BaseModel):
    """Simulated wells: every tag of each listed well, every `interval_s`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    protocol: Literal["simulator"]
    id: Identifier
    tenant: Identifier
    wells: list[Identifier] = Field(min_length=1)
    interval_s: float = Field(1.0, gt=0, le=3600)
    seed: int | None = Field(None, description="repeatable values (tests); unset: different every run")

    def feeds(self) -> list[tuple[str, str]]:
        """Every (well, tag) simulated: each tag of `PROFILES` for each well."""
        return [(well, profile.name) for well in self.wells for profile in PROFILES]


@dataclass(frozen=True)
class TagProfile:
    name: str
    unit: str
    base: float
    spread: float  # how far wells differ from each other
    drift: float  # random-walk step per sample
    noise: float  # measurement noise, standard deviation
    low: float
    high: float


PROFILES = (
    TagProfile("tubing_pressure", "psi", 850.0, 150.0, 1.5, 2.0, 0.0, 5000.0),
    TagProfile("casing_pressure", "psi", 1200.0, 200.0, 1.0, 2.5, 0.0, 5000.0),
    TagProfile("flow_rate", "bbl/d", 420.0, 120.0, 2.0, 4.0, 0.0, 3000.0),
    TagProfile("temperature", "degC", 78.0, 12.0, 0.05, 0.3, -40.0, 200.0),
)


@dataclass
class _Signal:
    profile: TagProfile
    level: float

    def sample(self, rng: random.Random) -> float:
        p = self.profile
        self.level = min(max(self.level + rng.gauss(0.0, p.drift), p.low), p.high)
        return round(min(max(self.level + rng.gauss(0.0, p.noise), p.low), p.high), 3)


class SimulatorAdapter:
    """Emits one reading per tag per well every `interval_s`.

    Args:
        wells: (tenant, well) pairs to simulate.
        interval_s: sampling period.
        bad_ratio, uncertain_ratio: probability of a BAD (null value) or UNCERTAIN sample.
        seed: for repeatable fields in tests.
    """

    def __init__(
        self,
        wells: Sequence[tuple[str, str]],
        interval_s: float = 1.0,
        name: str = "simulator",
        bad_ratio: float = 0.002,
        uncertain_ratio: float = 0.01,
        seed: int | None = None,
    ) -> None:
        self.name = name
        self.connected = True  # nothing to connect to
        self.errors = 0
        self._wells = list(wells)
        self._interval_s = interval_s
        self._bad_ratio = bad_ratio
        self._uncertain_ratio = uncertain_ratio
        self._rng = random.Random(seed)
        self._signals = {
            (tenant, well, p.name): _Signal(p, p.base + self._rng.uniform(-p.spread, p.spread))
            for tenant, well in self._wells
            for p in PROFILES
        }

    def sample(self) -> list[Reading]:
        """One reading for every tag of every well, stamped now."""
        now = utc_now_iso()
        return [self._reading(tenant, well, signal, now) for (tenant, well, _), signal in self._signals.items()]

    def _reading(self, tenant: str, well: str, signal: _Signal, now: str) -> Reading:
        value: float | None = signal.sample(self._rng)
        roll = self._rng.random()
        quality: Quality = "GOOD"
        reason: Reason | None = None
        if roll < self._bad_ratio:
            value, quality, reason = None, "BAD", "device_error"
        elif roll < self._bad_ratio + self._uncertain_ratio:
            quality = "UNCERTAIN"
        return Reading(
            tenant_id=tenant,
            well_id=well,
            tag_name=signal.profile.name,
            value=value,
            quality=quality,
            timestamp=now,
            source_protocol="simulator",
            connection_id=self.name,
            unit=signal.profile.unit,
            reason=reason,
        )

    def current(self) -> list[Reading]:
        return []  # every tag is sampled again within an interval anyway

    @classmethod
    def for_connection(cls, connection: SimulatorConnection) -> SimulatorAdapter:
        """The adapter for a site file's simulator connection."""
        c = connection
        return cls([(c.tenant, well) for well in c.wells], c.interval_s, name=c.id, seed=c.seed)

    async def run(self, sink: ReadingSink) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            await sink.submit(self.sample())
            next_at += self._interval_s
            await pause(max(0.0, next_at - loop.time()))
