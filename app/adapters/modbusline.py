"""One Modbus connection's wire: one request on it at a time, and a quiet pause between requests.

A serial line, and an RTU gateway behind a serial radio, carry one request at a time: RTU frames
have no transaction id, so an answer is matched to its request only by coming next. pymodbus 3.16
already holds a lock around each request of a client (its transaction manager), but the pause
between requests is ours, and so is the guarantee, whatever a later pymodbus does.

The pause also gives RTU its silent interval. The Modbus serial line spec ends a frame with 3.5
character times of silence (fixed at 1.75 ms above 19200 baud); pymodbus's async RTU framer
finds frames by length and CRC and does not wait that out before the next request, so a serial
connection defaults to one such interval between requests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

FAST_BAUD = 19200  # above this the spec fixes the silent interval instead of scaling it


def silent_interval_s(baudrate: int) -> float:
    """The 3.5-character silence that ends an RTU frame at `baudrate`.

    The spec's character is 11 bits (start, 8 data, parity or a second stop, stop) whatever the
    line's settings, and it is the spec's interval that devices are built to wait for.
    """
    if baudrate > FAST_BAUD:
        return 0.00175
    return 3.5 * 11 / baudrate


class Line:
    """The wire of one connection: `turn()` is one request, alone on it, at least `gap_s` after the last.

    The gap runs from the end of one request (its answer, or its failure) to the start of the
    next, whichever group each belongs to: what a slow radio needs is quiet air, not a rate.
    """

    def __init__(self, gap_s: float) -> None:
        self._gap_s = gap_s
        self._lock = asyncio.Lock()
        self._quiet_since: float | None = None

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        async with self._lock:
            loop = asyncio.get_running_loop()
            if self._gap_s and self._quiet_since is not None:
                # asyncio.sleep, not app.cancellation.pause: the session's first request runs in the
                # reconnect loop's task, whose cancel count a failed TaskGroup leaves raised on 3.11.
                await asyncio.sleep(max(0.0, self._quiet_since + self._gap_s - loop.time()))
            try:
                yield
            finally:
                self._quiet_since = loop.time()
