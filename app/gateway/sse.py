"""Server-Sent Events framing, built once per event and shared as bytes.

Ids come from `StreamId` and event names are constants, so no CR/LF from outside can reach
the wire (CWE-93); reading JSON is always single-line (see `single_line_json`).
"""

from __future__ import annotations

import orjson

from app.models import Selection, Snapshot, StreamEvent, StreamId, Topic
from app.streams.codec import single_line_json


def reading_frame(event: StreamEvent) -> bytes:
    return b"id: %s\nevent: reading\ndata: %s\n\n" % (str(event.id).encode(), event.data)


def retry_frame(retry_ms: int) -> bytes:
    return b"retry: %d\n\n" % retry_ms


def heartbeat_frame() -> bytes:
    return b": heartbeat\n\n"


HEARTBEAT_EVENT = b"event: heartbeat\ndata: {}\n\n"  # on streams of many wells: visible to EventSource


def snapshot_frame(snapshot: Snapshot) -> bytes:
    """`event: snapshot` with the newest entry id, so a resume after it neither gaps nor repeats."""
    readings = b",".join(single_line_json(snapshot.readings[tag]) for tag in sorted(snapshot.readings))
    data = b'{"tenantId":%s,"wellId":%s,"lastEventId":"%s","readings":[%s]}' % (
        orjson.dumps(snapshot.topic.tenant),
        orjson.dumps(snapshot.topic.well),
        str(snapshot.last_id).encode(),
        readings,
    )
    return b"id: %s\nevent: snapshot\ndata: %s\n\n" % (str(snapshot.last_id).encode(), data)


def reset_frame(topic: Topic, asked: StreamId) -> bytes:
    """Tells the client that history no longer reaches back to the id it asked for."""
    data = orjson.dumps(
        {"tenantId": topic.tenant, "wellId": topic.well, "reason": "history-truncated", "lastEventId": str(asked)}
    )
    return b"event: reset\ndata: %s\n\n" % data


def goodbye_frame(retry_ms: int, reason: str) -> bytes:
    return b"retry: %d\n: %s\n\n" % (retry_ms, reason.encode())


def refused_frame(retry_ms: int, status: int, reason: str, retry_after_s: int) -> bytes:
    """A transient refusal (429, 503) told in the stream, for a client that reads only event streams
    (app/gateway/errors.py, in_band)."""
    data = orjson.dumps({"error": reason, "status": status, "retryAfterS": retry_after_s})
    return b"retry: %d\nevent: refused\ndata: %s\n\n" % (retry_ms, data)


def auth_expired_frame(selection: Selection) -> bytes:
    """`wellId` on a per-well stream; a stream of many wells names only the tenant."""
    fields: dict[str, str] = {"tenantId": selection.tenant}
    if selection.wells is not None and len(selection.wells) == 1:
        fields["wellId"] = next(iter(selection.wells))
    data = orjson.dumps({**fields, "reason": "token expired"})
    return b"event: auth-expired\ndata: %s\n\n" % data
