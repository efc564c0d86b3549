"""The Redis layout (docs/design.md): every key and channel name, in one place.

All of a tenant's keys share the hash tag `{tenant}`, so one script call reaches all of them
(and, on Redis Cluster, one slot holds them):
- `scada:{t}:clock`        String, the last stream id issued for the tenant: every id of the
                           tenant comes from it, so ids are totally ordered across its wells;
- `scada:{t}:log:<well>`   Stream, one entry per reading (field `r` = reading JSON), capped by
                           MAXLEN ~ and by age (MINID ~);
- `scada:{t}:latest:<well>`  Hash, tag -> latest reading JSON;
- `scada:{t}:wells`        Set of the tenant's wells (configured, and what ingestion saw);
- `scada:{t}:workers`      Sorted set of ingest workers feeding the tenant, scored by lease expiry (ms);
- `scada:{t}:worker:<id>`  Set of the `well/tag` pairs that worker claimed (for the stale verdict);
- sharded channel `scada:{t}:live`  (SPUBLISH/SSUBSCRIBE, in the tenant's slot) message
                           `<stream id> <reading JSON>`, every well of the tenant;
- `scada:ticket:<sha256 of a ticket>`  single-use stream ticket, with a TTL;
- `scada:session:<sha256 of a cookie>`  a dashboard session (Principal JSON), with the token's TTL;
- `scada:{t}:revoked:token:<sha256 of a jti>`  a revoked token, kept until it would have expired;
- `scada:{t}:revoked:subject:<hash>`  String, epoch seconds: the subject's tokens issued before are revoked;
- `scada:revocations`      Stream of revocations (fields kind, tenant, key, before), which every
                           gateway reads to end the live streams they cover; capped by MAXLEN ~;
- `scada:lease:{t}:<counter>`  sorted set of open streams scored by lease expiry;
- `scada:{t}:producer:<id>`  highest seq of the tenant's readings applied for an ingest worker
                           run (see Origin), so a batch sent twice lands once; expires 30 days
                           after its last batch. Per tenant, so a batch is one script call per
                           tenant, each within one slot.
"""

from __future__ import annotations

from app.models import Topic


def tenant_prefix(tenant: str) -> str:
    return f"scada:{{{tenant}}}:"


def clock_key(tenant: str) -> str:
    return f"{tenant_prefix(tenant)}clock"


def log_key(topic: Topic) -> str:
    return f"{tenant_prefix(topic.tenant)}log:{topic.well}"


def latest_key(topic: Topic) -> str:
    return f"{tenant_prefix(topic.tenant)}latest:{topic.well}"


def wells_key(tenant: str) -> str:
    return f"{tenant_prefix(tenant)}wells"


def workers_key(tenant: str) -> str:
    return f"{tenant_prefix(tenant)}workers"


def channel_name(tenant: str) -> str:
    return f"{tenant_prefix(tenant)}live"


def lease_key(key: str) -> str:
    return f"scada:lease:{key}"


def producer_key(producer: str, tenant: str) -> str:
    return f"{tenant_prefix(tenant)}producer:{producer}"


def hash_tag(key: str) -> str:
    """The part of a key Redis Cluster hashes (inside the first braces): keys grouped by it share a slot."""
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start + 1 : end] if start >= 0 and end > start + 1 else key


def ticket_key(key: str) -> str:
    return f"scada:ticket:{key}"


def session_key(key: str) -> str:
    return f"scada:session:{key}"


def revoked_token_key(tenant: str, token_hash: str) -> str:
    return f"{tenant_prefix(tenant)}revoked:token:{token_hash}"


def revoked_subject_key(tenant: str, subject_key: str) -> str:
    return f"{tenant_prefix(tenant)}revoked:subject:{subject_key}"


REVOCATIONS = "scada:revocations"
