"""Dashboard sessions and revocations on Redis (layout in keys.py)."""

from __future__ import annotations

import hashlib
from typing import cast

from app.streams.redis.client import RedisClient, redis_errors
from app.streams.redis.keys import REVOCATIONS, revoked_subject_key, revoked_token_key, session_key
from app.streams.seams import Kind, Revocation

REVOCATIONS_KEPT = 10_000  # a gateway that was away longer than that many revocations misses none that matter:
# each one is also remembered in its own key, which every request checks


def token_hash(token_id: str) -> str:
    return hashlib.sha256(token_id.encode()).hexdigest()


class RedisSessions:
    def __init__(self, client: RedisClient) -> None:
        self._client = client

    async def put(self, key: str, payload: bytes, ttl_s: float) -> None:
        with redis_errors("store session"):
            await self._client.set(session_key(key), payload, px=max(1, int(ttl_s * 1000)))

    async def get(self, key: str) -> bytes | None:
        with redis_errors("read session"):
            payload = await self._client.get(session_key(key))
        return payload.encode() if isinstance(payload, str) else payload

    async def delete(self, key: str) -> None:
        with redis_errors("end session"):
            await self._client.delete(session_key(key))


class RedisRevocations:
    def __init__(self, client: RedisClient) -> None:
        self._client = client

    async def revoke(self, revocation: Revocation, ttl_s: float) -> None:
        # Two commands, in this order, not one transaction: the marker and the stream sit in
        # different slots on Redis Cluster. Once the marker is set no new request gets through;
        # the stream entry then ends the open streams. A failure between them is raised, and
        # revoking again repeats both harmlessly.
        with redis_errors("revoke"):
            if ttl_s > 0 and revocation.kind == "token":
                key = revoked_token_key(revocation.tenant, token_hash(revocation.key))
                await self._client.set(key, b"1", px=max(1, int(ttl_s * 1000)))
            elif ttl_s > 0 and revocation.kind == "subject":
                key = revoked_subject_key(revocation.tenant, revocation.key)
                await self._client.set(key, repr(revocation.before), px=max(1, int(ttl_s * 1000)))
            await self._client.xadd(REVOCATIONS, _fields(revocation), maxlen=REVOCATIONS_KEPT, approximate=True)

    async def is_revoked(self, tenant: str, token_id: str | None, subject_key: str, issued_at: float | None) -> bool:
        token_key = revoked_token_key(tenant, token_hash(token_id)) if token_id else None
        keys = [revoked_subject_key(tenant, subject_key), *([token_key] if token_key else [])]
        with redis_errors("check revocation"):
            values = await self._client.mget(keys)
        if len(values) > 1 and values[1] is not None:
            return True
        before = values[0]
        if before is None:
            return False
        try:
            cutoff = float(before)
        except ValueError:
            return True  # a marker we cannot read: refuse, never wave through
        # A token without `iat` cannot show it came after the cut-off.
        return issued_at is None or issued_at < cutoff

    async def since(self, cursor: str | None) -> tuple[list[Revocation], str]:
        with redis_errors("read revocations"):
            if cursor is None:
                last = cast(Entries, await self._client.xrevrange(REVOCATIONS, count=1))
                return [], _text(last[0][0]) if last else "0-0"
            entries = cast(Entries, await self._client.xrange(REVOCATIONS, min=f"({cursor}", count=1000))
        found: list[Revocation] = []
        for raw_id, fields in entries:
            cursor = _text(raw_id)
            revocation = _revocation(fields)
            if revocation is not None:
                found.append(revocation)
        return found, cursor


Entries = list[tuple[bytes, dict[bytes, bytes]]]
Field = bytes | bytearray | memoryview | str | int | float


def _fields(revocation: Revocation) -> dict[Field, Field]:
    return {
        "kind": revocation.kind,
        "tenant": revocation.tenant,
        "key": revocation.key,
        "before": repr(revocation.before),
    }


def _text(raw: bytes) -> str:
    return raw.decode()


KINDS: dict[str, Kind] = {"token": "token", "subject": "subject", "session": "session"}


def _revocation(fields: dict[bytes, bytes]) -> Revocation | None:
    try:
        kind = KINDS.get(fields[b"kind"].decode())
        if kind is None:
            return None
        return Revocation(
            kind,
            fields[b"tenant"].decode(),
            fields[b"key"].decode(),
            float(fields[b"before"]),
        )
    except (KeyError, ValueError):
        return None  # not ours: another producer's entry ends no stream
