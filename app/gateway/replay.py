"""Reading a selection of one tenant's wells from history, in id order, up to one clock.

Every id of a tenant comes from one clock, so a stream of many wells resumes from one
`Last-Event-ID`: the entries of all its wells after that id, merged in id order, are exactly
what it missed. The first read is atomic across the wells and fixes the upper bound (the
tenant's clock at that moment); everything newer reaches the stream live, because it
subscribed before reading. Wells with more entries than one read returns are read on, and
entries are released in id order only up to the lowest position still being read, so the
merge never has to hold a whole gap in memory.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import AsyncIterator, Sequence

from app.models import StreamEvent, StreamId, Topic
from app.streams.seams import StreamLog

FIRST_READ_MIN = 16  # entries per well in the first, atomic read of many wells


class HistoryMerge:
    """The entries of `wells` (None: every well of the tenant) after `after`, in id order.

    After `pages()` is exhausted: `clock` is where the history ends (live takes over above it),
    `truncated` maps each well whose history no longer reaches back to its latest values (it
    needs a reset and a snapshot), and `interrupted` says a well was trimmed while it was being
    read: the caller cannot continue exactly and must start over from its last id.
    """

    def __init__(self, log: StreamLog, tenant: str, wells: Sequence[str] | None, after: StreamId, page: int) -> None:
        self._log = log
        self._tenant = tenant
        self._wells = wells
        self._after = after
        self._page = page
        self.clock = after
        self.truncated: dict[str, dict[str, bytes]] = {}
        self.interrupted = False

    async def pages(self) -> AsyncIterator[list[StreamEvent]]:
        many = self._wells is None or len(self._wells) > 1
        first_count = max(FIRST_READ_MIN, self._page // max(len(self._wells or ()), 1)) if many else self._page
        read = await self._log.read(self._tenant, self._wells, self._after, first_count)
        self.clock = read.clock
        buffers: dict[str, deque[StreamEvent]] = {}
        cursors: dict[str, StreamId] = {}
        for well, state in read.wells.items():
            if state.truncated:
                self.truncated[well] = state.latest or {}
                continue
            buffers[well] = deque(state.events)
            if not state.complete:
                cursors[well] = state.events[-1].id if state.events else self._after
        while True:
            frontier = min(cursors.values(), default=self.clock)
            ready = [_take_through(buffer, frontier) for buffer in buffers.values()]
            merged = list(heapq.merge(*ready, key=lambda event: event.id))
            if merged:
                yield merged
            if not cursors:
                return
            if not await self._read_on([well for well, at in cursors.items() if at == frontier], buffers, cursors):
                self.interrupted = True
                return

    async def _read_on(
        self, wells: list[str], buffers: dict[str, deque[StreamEvent]], cursors: dict[str, StreamId]
    ) -> bool:
        """Read on for the wells that hold the merge back; False when one was trimmed meanwhile."""
        for well in wells:
            found = await self._log.range(Topic(self._tenant, well), cursors[well], self.clock, self._page)
            if found.truncated:
                return False
            buffers[well].extend(found.events)
            if found.more:
                cursors[well] = found.cursor
            else:
                del cursors[well]
        return True


def _take_through(buffer: deque[StreamEvent], frontier: StreamId) -> list[StreamEvent]:
    taken = []
    while buffer and buffer[0].id <= frontier:
        taken.append(buffer.popleft())
    return taken
