"""Stopping a background loop for sure: redis-py can lose a cancel on the way through a command.

Measured with redis-py 8.2 on Python 3.11.7 against a local Redis: a task calling XRANGE in a
loop, cancelled at a random moment, went on running 69 times in 100; the command returned its
result and no CancelledError was ever raised (one known cause: 3.11's `asyncio.wait_for`, which
redis-py puts around each send, returns the result of a call that completes as the cancel
arrives, CPython gh-86296). A loop cancelled at that moment polled Redis for ever and its owner's
shutdown hung (a gateway that never exited after SIGTERM). The task still counts the request
(`Task.cancelling()`), so a loop that checks before each wait stops at its next one.

Not for a task that has run an asyncio.TaskGroup whose child failed: Python 3.11 leaves that
task's count raised (app/adapters/reconnect.py), and the check would take it for a cancel.
"""

from __future__ import annotations

import asyncio


def raise_if_cancelled() -> None:
    """CancelledError if the current task was asked to stop and the request was lost on the way."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def pause(seconds: float) -> None:
    """`asyncio.sleep` for a loop that talks to Redis or a device: stops a task whose cancel was lost."""
    raise_if_cancelled()
    await asyncio.sleep(seconds)
