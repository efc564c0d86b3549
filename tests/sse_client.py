"""A small, strict SSE reader for tests (WHATWG parsing rules, no reconnection)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Event:
    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.data)


class SSEReader:
    """Yields every block ended by a blank line, including comment-only and retry-only ones."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.last_id: str | None = None
        self._lines = response.aiter_lines()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._blocks()

    async def _blocks(self) -> AsyncIterator[Event]:
        current = Event()
        data: list[str] = []
        touched = False
        async for line in self._lines:
            if line == "":
                if touched:
                    current.data = "\n".join(data)
                    if current.id is not None:
                        self.last_id = current.id
                    yield current
                current, data, touched = Event(), [], False
                continue
            touched = True
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "":
                current.comments.append(value)
            elif name == "data":
                data.append(value)
            elif name == "event":
                current.event = value
            elif name == "id":
                current.id = value
            elif name == "retry" and value.isdigit():
                current.retry = int(value)

    async def next_event(self, *kinds: str) -> Event:
        """The next block whose event name is one of `kinds` (any named event if none given)."""
        async for event in self:
            if event.data and (not kinds or event.event in kinds):
                return event
        raise EOFError("stream ended")

    async def collect(self) -> list[Event]:
        """Every block until the server ends the stream."""
        return [event async for event in self]
