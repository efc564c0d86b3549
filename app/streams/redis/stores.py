"""The small shared stores on Redis: the well registry, stream tickets, stream leases and worker leases."""

from __future__ import annotations

from collections.abc import Sequence

from app.models import is_valid_id
from app.streams.codec import MalformedValues, shown
from app.streams.redis.client import RedisClient, redis_errors, script
from app.streams.redis.keys import (
    channel_name,
    clock_key,
    hash_tag,
    lease_key,
    tenant_prefix,
    ticket_key,
    wells_key,
    workers_key,
)

RENEW_CHUNK = 500  # leases per renew script call: keeps one call short while thousands renew
RELEASE_CHUNK = 1000  # ZREMs per pipeline


def well_member(tenant: str, member: bytes | str, malformed: MalformedValues) -> str | None:
    """A member of the tenant's wells set as a well id; None (skipped and noted) if it is none:
    another producer may have added anything there, and it must not be served or break a read."""
    raw = member.encode() if isinstance(member, str) else member
    try:
        well = raw.decode()
        if not is_valid_id(well):
            raise ValueError("not a well id")
    except ValueError as exc:
        malformed.skip("wells", f"{wells_key(tenant)} member {shown(raw)}", exc)
        return None
    return well


class RedisRegistry:
    def __init__(self, client: RedisClient, malformed: MalformedValues | None = None) -> None:
        self._client = client
        self._malformed = malformed if malformed is not None else MalformedValues()

    async def wells(self, tenant: str) -> list[str]:
        with redis_errors("list wells"):
            members = await self._client.smembers(wells_key(tenant))
        return sorted(well for member in members if (well := well_member(tenant, member, self._malformed)) is not None)

    async def has_well(self, tenant: str, well: str) -> bool:
        with redis_errors("check well"):
            return bool(await self._client.sismember(wells_key(tenant), well))

    async def register(self, tenant: str, wells: Sequence[str]) -> None:
        if wells:
            with redis_errors("register wells"):
                await self._client.sadd(wells_key(tenant), *wells)


class RedisTickets:
    def __init__(self, client: RedisClient) -> None:
        self._client = client

    async def put(self, key: str, payload: bytes, ttl_s: float) -> None:
        with redis_errors("store ticket"):
            await self._client.set(ticket_key(key), payload, px=max(1, int(ttl_s * 1000)))

    async def take(self, key: str) -> bytes | None:
        with redis_errors("redeem ticket"):
            payload = await self._client.getdel(ticket_key(key))
        return payload.encode() if isinstance(payload, str) else payload


class RedisLeases:
    def __init__(self, client: RedisClient) -> None:
        self._client = client
        self._acquire_script = script(client, "acquire")
        self._renew_script = script(client, "renew")

    async def acquire(self, counters: Sequence[tuple[str, int]], member: str, ttl_s: float) -> int | None:
        keys = [lease_key(key) for key, _ in counters]
        with redis_errors("count stream"):
            full = await self._acquire_script(keys=keys, args=[member, int(ttl_s * 1000), *(n for _, n in counters)])
        return int(full) - 1 if int(full) else None

    async def release(self, leases: Sequence[tuple[str, str]]) -> None:
        for start in range(0, len(leases), RELEASE_CHUNK):
            with redis_errors("uncount streams"):
                async with self._client.pipeline(transaction=False) as pipe:
                    for key, member in leases[start : start + RELEASE_CHUNK]:
                        pipe.zrem(lease_key(key), member)
                    await pipe.execute()

    async def renew(self, leases: Sequence[tuple[str, str]], ttl_s: float) -> None:
        # One script call reaches one slot: counters are grouped by their tenant's hash tag.
        by_slot: dict[str, list[tuple[str, str]]] = {}
        for key, member in leases:
            by_slot.setdefault(hash_tag(key), []).append((key, member))
        for group in by_slot.values():
            for start in range(0, len(group), RENEW_CHUNK):
                chunk = group[start : start + RENEW_CHUNK]
                with redis_errors("renew stream counts"):
                    await self._renew_script(
                        keys=[lease_key(key) for key, _ in chunk], args=[int(ttl_s * 1000), *(m for _, m in chunk)]
                    )


class RedisWorkerLeases:
    """Worker leases (beat.lua) and the stale verdict on an expired worker's tags (sweep.lua).

    The sweep appends to the logs as publishing does, with the same clock and trimming.
    """

    def __init__(self, client: RedisClient, max_len: int, max_age_s: float) -> None:
        self._client = client
        self._max_len = max_len
        self._max_age_ms = int(max_age_s * 1000)
        self._beat_script = script(client, "beat")
        self._sweep_script = script(client, "sweep", after=("clock",))

    async def beat(self, worker: str, tenant: str, ttl_s: float, tags: Sequence[tuple[str, str]] = ()) -> bool:
        args: list[str | int] = [tenant_prefix(tenant), worker, int(ttl_s * 1000)]
        args += [f"{well}/{tag}" for well, tag in tags]
        with redis_errors("renew worker lease"):
            return bool(await self._beat_script(keys=[workers_key(tenant)], args=args))

    async def sweep(self, tenant: str) -> int:
        args: list[str | int] = [tenant_prefix(tenant), channel_name(tenant), self._max_len, self._max_age_ms]
        with redis_errors("sweep worker leases"):
            return int(await self._sweep_script(keys=[workers_key(tenant), clock_key(tenant)], args=args))
