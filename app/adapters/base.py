"""The adapter seam: one file per protocol, each only ever produces validated Readings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field

from app.adapters.deadband import Deadband
from app.models import Identifier, Reading


class PointTarget(BaseModel):
    """What every protocol's point shares: the well and tag it feeds, its unit, `raw * scale +
    offset`, and its deadband (in the scaled unit, or with `deadband_percent` that percent of
    the last reported value)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    # A polled source repeats unchanged values, which only a change or a refresh may report again;
    # a source that pushes changes (OPC-UA, MQTT) is reported as it comes unless a deadband is set.
    polled: ClassVar[bool] = False

    well: Identifier
    tag: Identifier
    unit: str | None = None
    scale: float = Field(1.0, allow_inf_nan=False)
    offset: float = Field(0.0, allow_inf_nan=False)
    deadband: float = Field(0.0, ge=0, allow_inf_nan=False)
    deadband_percent: bool = False

    @property
    def report_deadband(self) -> Deadband | None:
        """The filter for this point's values: None reports every sample."""
        if self.deadband <= 0 and not self.polled:
            return None
        return Deadband(self.deadband, percent=self.deadband_percent)


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

    async def run(self, sink: ReadingSink) -> None: ...
