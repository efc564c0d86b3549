"""The gateway's share of the stale verdict: sweeping the worker leases of the tenants it serves.

An ingest worker that dies publishes nothing, so nothing it fed would ever change on a screen.
Every gateway sweeps the leases of each tenant it holds streams for, every SWEEP_S: the first
to find a lease run out marks that worker's tags stale in the log (WorkerLeases.sweep, once,
atomically), and every gateway then streams that verdict like any reading. /latest sweeps its
tenant before it reads, so a tenant nobody streams is right there too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from types import TracebackType

from app.cancellation import pause
from app.errors import BrokerError
from app.gateway.stats import HubStats
from app.streams.seams import WorkerLeases

logger = logging.getLogger(__name__)

SWEEP_S = 0.5


class LeaseSweeper:
    """`async with LeaseSweeper(leases, tenants):` sweeps `tenants()` every SWEEP_S until exit."""

    def __init__(self, leases: WorkerLeases, tenants: Callable[[], Iterable[str]], stats: HubStats) -> None:
        self._leases = leases
        self._tenants = tenants
        self._stats = stats  # counts the tags marked, for /metrics
        self._task: asyncio.Task[None] | None = None

    async def sweep(self, tenant: str) -> None:
        marked = await self._leases.sweep(tenant)
        if marked:
            self._stats.stale_marked += marked
            logger.warning("an ingest worker of %s stopped renewing its lease: %d tags marked stale", tenant, marked)

    async def _run(self) -> None:
        failing = False
        while True:
            await pause(SWEEP_S)
            try:
                for tenant in list(self._tenants()):
                    await self.sweep(tenant)
                failing = False
            except BrokerError as exc:
                if not failing:  # Redis away: the live feed's own reconnect says more; once is enough here
                    logger.warning("cannot sweep worker leases: %s", exc)
                failing = True

    async def __aenter__(self) -> LeaseSweeper:
        self._task = asyncio.create_task(self._run(), name="lease-sweeper")
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
