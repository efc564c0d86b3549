"""The straightforward gateway wellstream is measured against.

What a first version usually looks like, and what the design card's "per-request Redis
subscription" means taken literally: every SSE request opens its own redis-py Pub/Sub
connection on its tenant's channel, keeps its well's messages and relays each through sse-starlette's
`EventSourceResponse`. Same URL, same wire format as wellstream; no auth, no history.

    python -m bench.baseline --redis-url URL --port P        (Hypercorn, uvloop, one process)
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
import uvloop
from hypercorn.asyncio import serve
from hypercorn.config import Config
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from app.streams.redis.keys import channel_name


def create_app(redis_url: str) -> Starlette:
    # One connection per open stream: the pool must not cap them (redis-py's default is 100).
    pool = aioredis.ConnectionPool.from_url(redis_url, max_connections=100_000)

    async def events(tenant: str, well: str) -> AsyncIterator[ServerSentEvent]:
        client = aioredis.Redis(connection_pool=pool)
        pubsub = client.pubsub()
        # The tenant's one sharded channel (docs/design.md); each request keeps its own well's messages.
        await pubsub.ssubscribe(channel_name(tenant))
        try:
            async for message in pubsub.listen():
                if message["type"] != "smessage":
                    continue
                stream_id, _, data = message["data"].partition(b" ")
                if json.loads(data).get("wellId") != well:
                    continue
                yield ServerSentEvent(id=stream_id.decode(), event="reading", data=data.decode())
        finally:
            await pubsub.aclose()

    async def stream(request: Request) -> EventSourceResponse:
        return EventSourceResponse(events(request.path_params["tenant"], request.path_params["well"]), ping=15)

    async def healthz(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(
        routes=[Route("/healthz", healthz), Route("/tenants/{tenant}/wells/{well}/stream", stream)],
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    config = Config()
    config.bind = [f"{args.host}:{args.port}"]
    config.backlog = 4096
    uvloop.run(serve(create_app(args.redis_url), config))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
