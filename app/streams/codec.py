"""Stored reading bytes -> validated readings for the wire: the one decoding step both brokers share.

Anyone with Redis access can write into the layout, so what a key holds is not trusted: a
value is a reading only if it validates as one and belongs to the tenant (and well, and tag)
of the key it sits under. Anything else is skipped by the caller and noted in
`MalformedValues`: counted, and logged without letting a poisoned key flood the log.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal

import orjson
from pydantic import ValidationError

from app.models import Reading, StreamEvent, StreamId, Topic

logger = logging.getLogger(__name__)

# The largest reading the model accepts is under 1 KiB (ids of 64, a unit of 32 characters,
# timestamps of 40): anything bigger is refused before it is parsed, every time it is read.
MAX_READING_BYTES = 4096
_WIRE_KEYS = frozenset(field.alias for field in Reading.model_fields.values())

Source = Literal["latest", "log", "live", "wells"]  # a latest-values hash, a log entry, a live message, a wells set


def single_line_json(data: bytes) -> bytes:
    """JSON bytes guaranteed to hold no line break, re-encoded only when needed.

    Every reading goes onto an SSE `data:` line as stored, so a line break from another
    producer must never reach the wire (it would end the field early: CWE-93).
    """
    if b"\n" in data or b"\r" in data:
        return orjson.dumps(orjson.loads(data))
    return data


def decode_reading(data: bytes, tenant: str, well: str | None = None, tag: str | None = None) -> tuple[Reading, bytes]:
    """A stored reading and its bytes for the wire.

    Raises ValueError (JSON, Unicode and validation errors are ValueErrors) unless `data` is a
    valid reading of `tenant`, and of `well` and `tag` when given: a reading under another
    tenant's key must never reach that tenant's clients, whoever wrote it there.
    """
    if len(data) > MAX_READING_BYTES:
        raise ValueError(f"{len(data)} bytes, more than any reading")
    parsed = orjson.loads(data)
    reading = Reading.model_validate(parsed)
    if reading.tenant_id != tenant or well not in (None, reading.well_id) or tag not in (None, reading.tag_name):
        raise ValueError(f"a reading of {reading.tenant_id}/{reading.well_id}/{reading.tag_name} under another key")
    return reading, _wire_bytes(parsed, reading)


def _wire_bytes(parsed: dict[str, Any], reading: Reading) -> bytes:
    # What was parsed, dumped again: one line, and no duplicate key can hide a second value
    # from the check above (for our own publisher's JSON these are the very bytes stored). The
    # model's own JSON (ten times dearer) only when the two disagree, so snake_case keys, a null
    # value called GOOD or a timestamp not in UTC never reach a client, whoever wrote them.
    as_published = (
        parsed.keys() <= _WIRE_KEYS
        and parsed.get("quality") == reading.quality
        and parsed.get("value") == reading.value
        and parsed.get("timestamp") == reading.timestamp
        and parsed.get("ingestedAt") == reading.ingested_at
        and all(v is not None for k, v in parsed.items() if k != "value")
    )
    return orjson.dumps(parsed) if as_published else reading.to_json()


def decode_event(raw_id: bytes, data: bytes, tenant: str, well: str | None = None) -> StreamEvent:
    """An event of `tenant` (and of `well`, when the key names one) from a stored id and reading; else ValueError."""
    stream_id = StreamId.parse(raw_id.decode())
    reading, wire = decode_reading(data, tenant, well)
    return StreamEvent(stream_id, reading.well_id, reading.tag_name, wire, epoch_s(reading.timestamp))


def decode_latest(field: bytes, data: bytes, topic: Topic) -> tuple[str, bytes]:
    """A latest-values hash entry as (tag, wire bytes); ValueError unless it is a reading of that well and tag."""
    tag = field.decode()
    return tag, decode_reading(data, topic.tenant, topic.well, tag)[1]


def epoch_s(timestamp: object) -> float:
    """A reading's ISO 8601 UTC timestamp as epoch seconds; 0.0 when it is not one."""
    if not isinstance(timestamp, str):
        return 0.0
    try:
        return datetime.fromisoformat(timestamp).timestamp()
    except ValueError:
        return 0.0


def shown(raw: bytes, most: int = 64) -> str:
    """Bytes from outside, for a log line: escaped (no line breaks) and cut short."""
    return repr(raw[:most]) + ("..." if len(raw) > most else "")


def _why(error: ValueError) -> str:
    if isinstance(error, ValidationError):
        first = error.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "reading"
        count = error.error_count()
        text = f"{count} validation error{'s' if count > 1 else ''}, first: {where}: {first['msg']}"
    else:
        text = f"{type(error).__name__}: {error}"
    # A key name from outside may carry anything: one short line, whatever it held.
    return "".join(c if c.isprintable() else "?" for c in text[:200])


class MalformedValues:
    """Values the codec refused: counted by source, and each logged as a WARNING without flooding.

    A poisoned value is refused again by every request that reads its key, so a place (a key
    and field, a log entry) is logged once per `quiet_s`; and since an intruder can write any
    number of places, at most `lines_per_window` lines go out per `window_s` in all. Every skip
    is counted, logged or not (`wellstream_malformed_total`).
    """

    PLACES = 4096  # places remembered as logged; the longest-quiet ones are forgotten first

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        quiet_s: float = 600.0,
        lines_per_window: int = 100,
        window_s: float = 60.0,
    ) -> None:
        self.counts: Counter[str] = Counter()
        self._clock = clock
        self._quiet_s = quiet_s
        self._lines_per_window = lines_per_window
        self._window_s = window_s
        self._logged: OrderedDict[str, float] = OrderedDict()  # place -> when it was last logged
        self._window_start = -math.inf
        self._lines = 0
        self._unlogged = 0  # over the window's budget since the last line: said in the next one

    def skip(self, source: Source, where: str, error: ValueError) -> bool:
        """Count one refused value found at `where` (no bytes of the value itself); True if it was logged."""
        self.counts[source] += 1
        now = self._clock()
        last = self._logged.get(where)
        if last is not None and now - last < self._quiet_s:
            return False
        if now - self._window_start >= self._window_s:
            self._window_start, self._lines = now, 0
        if self._lines >= self._lines_per_window:
            self._unlogged += 1
            return False
        self._lines += 1
        self._logged[where] = now
        self._logged.move_to_end(where)
        if len(self._logged) > self.PLACES:
            self._logged.popitem(last=False)
        unlogged, self._unlogged = self._unlogged, 0
        logger.warning(
            "skipped a malformed %s value at %s: %s%s",
            source,
            where,
            _why(error),
            f" ({unlogged} more not logged)" if unlogged else "",
        )
        return True
