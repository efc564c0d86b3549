"""A published batch counts as stored only once a replica has it (`WAIT`), so a failover cannot lose it.

Redis replicates asynchronously: a primary killed a moment after it answered a publish takes
the batch with it, and the ingest worker, which dropped the batch from its spool on that
answer, would never send it again. With `min_replicas_ack` replicas required, the script and a
`WAIT` go out on one connection (WAIT counts the writes of its own connection); fewer
acknowledgements within the timeout make the publish fail, so the worker keeps the batch and
sends it again later. The resend lands once (the producer's seq), here or on the promoted replica.

`None` (the default) asks each primary how many replicas it has (cached for a few seconds): 1
when it has any, 0 (no WAIT) on a Redis without replicas.

On Redis Cluster the WAIT must reach the slot's primary on the same connection as the script,
which the cluster client cannot promise (it sends a keyless WAIT to every primary), so each
primary gets a plain client of its own; a MOVED or a lost node refreshes the slot map and fails
this attempt, and the worker's retry finds the new owner.
"""

from __future__ import annotations

import time
from typing import Any

from redis.asyncio.client import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import ConnectionPool
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from app.errors import BrokerError
from app.streams.redis.client import RedisClient, redis_errors

REPLICAS_CACHE_S = 5.0


class ReplicatedPublish:
    """Runs the publish script for one tenant; see the module docstring."""

    def __init__(self, client: RedisClient, min_replicas_ack: int | None, timeout_s: float) -> None:
        self._client = client
        self._want = min_replicas_ack
        self._timeout_ms = max(1, int(timeout_s * 1000))
        self._replicas: dict[str, tuple[float, int]] = {}  # node name -> (checked at, connected replicas)
        self._nodes: dict[str, Redis] = {}  # cluster only: a plain client per primary
        self._stale = False

    async def run(self, script: AsyncScript, key: str, keys: list[str], args: list[Any]) -> Any:
        """The script's result; BrokerError when the replicas did not confirm it in time."""
        if self._stale:  # the last attempt failed: the slot may have moved or its primary died
            self._stale = False
            await self._refresh()
        try:
            return await self._run(script, key, keys, args)
        except BaseException as exc:  # a timeout or a cancel around us too
            if not isinstance(exc, BrokerError) or "replicas confirmed" not in str(exc):
                self._stale = True
            raise

    async def _run(self, script: AsyncScript, key: str, keys: list[str], args: list[Any]) -> Any:
        name, node = await self._target(key)
        want = await self._wanted(name, node)
        if want == 0:
            if node is None:
                return await script(keys=keys, args=args)
            return await script(keys=keys, args=args, client=node)
        target = node if node is not None else self._client
        assert isinstance(target, Redis)
        try:
            result, acked = await self._with_wait(target, script.sha, keys, args, want)
        except NoScriptError:  # a node that never ran it, or a promoted replica (SCRIPT LOAD is not replicated)
            await target.script_load(script.script)
            result, acked = await self._with_wait(target, script.sha, keys, args, want)
        if int(acked) < want:
            raise BrokerError("publish", f"{acked} of {want} replicas confirmed it within {self._timeout_ms} ms")
        return result

    async def _with_wait(self, target: Redis, sha: str, keys: list[str], args: list[Any], want: int) -> list[Any]:
        # EVALSHA itself, not the script object: redis-py sends a SCRIPT EXISTS before every
        # pipeline that holds a script object, one more round trip per batch.
        async with target.pipeline(transaction=False) as pipe:
            pipe.evalsha(sha, len(keys), *keys, *args)
            pipe.execute_command("WAIT", want, self._timeout_ms)
            answers: list[Any] = await pipe.execute()
        return answers

    async def _target(self, key: str) -> tuple[str, Redis | None]:
        client = self._client
        if not isinstance(client, RedisCluster):
            return "", None
        with redis_errors("find the node of a tenant"):
            await client.initialize()  # the slot map: once, on first use (a no-op after)
            node = client.get_node_from_key(key)
        if node is None:
            raise BrokerError("publish", f"no node serves the slot of {key}")
        plain = self._nodes.get(node.name)
        if plain is None:
            pool = ConnectionPool(connection_class=node.connection_class, **node.connection_kwargs)
            plain = self._nodes[node.name] = Redis(connection_pool=pool)
        return node.name, plain

    async def _wanted(self, name: str, node: Redis | None) -> int:
        if self._want is not None:
            return self._want
        now = time.monotonic()
        cached = self._replicas.get(name)
        if cached is None or now - cached[0] > REPLICAS_CACHE_S:
            target = node if node is not None else self._client
            info: dict[str, Any] = await target.info("replication")
            # Only replicas in sync: one still loading a full sync (a failed primary rejoining)
            # would hold every publish to the WAIT timeout until it is done.
            online = sum(
                1
                for key, value in info.items()
                if key.startswith("slave") and isinstance(value, dict) and value.get("state") == "online"
            )
            cached = self._replicas[name] = (now, online)
        return 1 if cached[1] > 0 else 0

    async def _refresh(self) -> None:
        self._replicas.clear()
        if isinstance(self._client, RedisCluster):
            with redis_errors("refresh the slot map"):
                await self._client.nodes_manager.initialize()

    async def aclose(self) -> None:
        for plain in self._nodes.values():
            await plain.aclose(close_connection_pool=True)
        self._nodes.clear()
