"""The audit trail: one structured line per connect, disconnect, auth failure and limit hit.

Lines go to the `wellstream.audit` logger with their fields under `audit`, which the JSON
formatter writes out as keys. Nothing here ever receives a token: callers pass reasons,
subjects and ids only.
"""

from __future__ import annotations

import logging
from collections import Counter

logger = logging.getLogger("wellstream.audit")

# (event, reason) of every refusal, for /metrics; reasons are fixed strings, so the set stays small.
refusals: Counter[tuple[str, str]] = Counter()


def audit(event: str, **fields: object) -> None:
    if event in ("auth-failure", "limit"):
        refusals[(event, str(fields.get("reason")))] += 1
    logger.info(event, extra={"audit": {"event": event, **fields}})
