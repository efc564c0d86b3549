"""Stored reading bytes <-> StreamEvent: the one decoding step both brokers share."""

from __future__ import annotations

from datetime import datetime

import orjson

from app.models import StreamEvent, StreamId


def single_line_json(data: bytes) -> bytes:
    """JSON bytes guaranteed to hold no line break, re-encoded only when needed.

    Every reading goes onto an SSE `data:` line as stored, so a line break from another
    producer must never reach the wire (it would end the field early: CWE-93).
    """
    if b"\n" in data or b"\r" in data:
        return orjson.dumps(orjson.loads(data))
    return data


def decode_event(raw_id: bytes, data: bytes) -> StreamEvent:
    """An event from stored bytes; raises ValueError (or KeyError/TypeError) if it is not a reading."""
    data = single_line_json(data)
    parsed = orjson.loads(data)
    well, tag = parsed["wellId"], parsed["tagName"]
    if not isinstance(well, str) or not isinstance(tag, str):
        raise TypeError("wellId and tagName must be strings")
    return StreamEvent(StreamId.parse(raw_id.decode()), well, tag, data, epoch_s(parsed.get("timestamp")))


def epoch_s(timestamp: object) -> float:
    """A reading's ISO 8601 UTC timestamp as epoch seconds; 0.0 when it is not one."""
    if not isinstance(timestamp, str):
        return 0.0
    try:
        return datetime.fromisoformat(timestamp).timestamp()
    except ValueError:
        return 0.0
