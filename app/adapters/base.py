"""The adapter seam: one file per protocol, each only ever produces validated Readings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from app.models import Reading


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
