"""The audit trail: one structured line per connect, disconnect, auth failure and limit hit.

Lines go to the `wellstream.audit` logger with their fields under `audit`, which the JSON
formatter writes out as keys. Nothing here ever receives a token: callers pass reasons,
subjects and ids only.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("wellstream.audit")


def audit(event: str, **fields: object) -> None:
    logger.info(event, extra={"audit": {"event": event, **fields}})
