"""Background loops stop when cancelled, even where Python 3.11's asyncio.wait_for (inside
redis-py) loses the cancel: the revocation watcher against a real Redis, cancelled at random
points of its polling, and `pause` on a task whose cancel was lost."""

from __future__ import annotations

import asyncio
import random

import pytest

from app.auth.revocation import RevocationWatcher
from app.cancellation import pause
from app.streams.redis import connect_redis

pytestmark = pytest.mark.anyio


async def test_a_loop_polling_redis_stops_whenever_it_is_cancelled(redis_url: str) -> None:
    # Before app/cancellation.py about half of these went on polling for ever (162 of 300), and a
    # gateway holding such a watcher never finished its shutdown.
    still_running: list[asyncio.Task[None]] = []
    async with connect_redis(redis_url) as broker:
        for _ in range(200):
            watcher = RevocationWatcher(broker.revocations, poll_s=0)
            await watcher.__aenter__()
            await asyncio.sleep(random.uniform(0, 0.003))  # anywhere in a poll: mid-command, mostly
            stopping = asyncio.create_task(watcher.__aexit__(None, None, None))
            done, _ = await asyncio.wait([stopping], timeout=2)
            if not done:
                watcher._poll_s = 3600  # no busy loop left behind; cancelled again below
                still_running.append(stopping)
        for stopping in still_running:
            stopping.cancel()
    assert len(still_running) == 0


async def test_pause_stops_a_task_whose_cancel_was_lost() -> None:
    reached = asyncio.Event()

    async def loop() -> None:
        while True:
            try:
                reached.set()
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass  # what 3.11's wait_for does when the call it awaits completes at that moment
            await pause(0)

    task = asyncio.create_task(loop())
    await reached.wait()
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=5)
    assert done
    assert task.cancelled()
