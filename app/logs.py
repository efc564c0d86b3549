"""Structured logs: one JSON object per line on stderr."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from datetime import UTC, datetime

import orjson


class JsonFormatter(logging.Formatter):
    """`static_fields` go into every line: a worker of `serve --workers` names itself there, as the
    workers' lines share one stderr."""

    def __init__(self, static_fields: Mapping[str, object] | None = None) -> None:
        super().__init__()
        self.static_fields = dict(static_fields or {})

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **self.static_fields,
        }
        for name in ("audit", "fields"):  # structured lines: extra={"fields": {...}}
            fields = getattr(record, name, None)
            if isinstance(fields, dict):
                entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


# Libraries whose chatter drowns ours: asyncua logs each connect, session and subscription step
# at INFO, pymodbus each connect and frame at DEBUG; their lines were 807 of the 1,046 of one
# ingest log. Our adapters log each connect and each loss once, in their own words.
_QUIET_LIBRARIES = ("asyncua", "pymodbus")


def configure(level: str = "INFO", static_fields: Mapping[str, object] | None = None) -> None:
    """Called once, by the CLI; library code never configures logging.

    `level` is ours. asyncua and pymodbus stay at WARNING whatever it is, DEBUG included: a
    DEBUG run is for our own events, and theirs would bury them. hypercorn's error log too.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(static_fields))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("hypercorn.error", *_QUIET_LIBRARIES):
        logging.getLogger(name).setLevel("WARNING")
