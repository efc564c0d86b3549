"""The Redis layout (docs/design.md): every key and channel name, in one place.

Per (tenant, well), keys share the hash tag `{tenant/well}` so they sit on one Cluster slot:
- `scada:{t/w}:log`    Stream, one entry per reading (field `r` = reading JSON), capped by
                        MAXLEN ~ and by age (MINID ~);
- `scada:{t/w}:latest` Hash, tag -> latest reading JSON;
- `scada:{t}:wells`    Set of the tenant's wells (configured, and what ingestion saw);
- `scada:ticket:<sha256 of a ticket>`  single-use stream ticket, with a TTL;
- `scada:lease:<counter>`  sorted set of open streams scored by lease expiry;
- `scada:producer:<id>`  highest reading seq applied for an ingest worker run (see Origin),
                        so a batch sent twice lands once; expires 30 days after its last batch;
- channel `scada:readings:<t>:<w>`, message `<stream id> <reading JSON>`.
"""

from __future__ import annotations

from app.models import Topic


def log_key(topic: Topic) -> str:
    return f"scada:{{{topic.tenant}/{topic.well}}}:log"


def latest_key(topic: Topic) -> str:
    return f"scada:{{{topic.tenant}/{topic.well}}}:latest"


def wells_key(tenant: str) -> str:
    return f"scada:{{{tenant}}}:wells"


def lease_key(key: str) -> str:
    return f"scada:lease:{key}"


def producer_key(producer: str) -> str:
    return f"scada:producer:{producer}"


def ticket_key(key: str) -> str:
    return f"scada:ticket:{key}"


def channel_name(topic: Topic) -> str:
    return f"scada:readings:{topic.tenant}:{topic.well}"
