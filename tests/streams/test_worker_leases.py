"""The worker leases' conformance suite (the stale verdict on a dead ingest worker), on both backends."""

from __future__ import annotations

import anyio
import orjson
import pytest

from app.models import ZERO_ID, Reading
from app.streams.seams import Broker
from tests.streams.conftest import Backend

pytestmark = pytest.mark.anyio


def reading(well: str, tag: str, value: float | None = 1.5, quality: str = "GOOD", **extra: object) -> Reading:
    return Reading.model_validate(
        {
            "tenant_id": "acme",
            "well_id": well,
            "tag_name": tag,
            "value": value,
            "quality": quality,
            "timestamp": "2026-12-04T05:00:00.000000Z",
            "source_protocol": "opcua",
            "connection_id": "c1",
            "unit": 'psi "g"',
            **extra,
        }
    )


async def latest(broker: Broker, well: str) -> dict[str, dict[str, object]]:
    read = await broker.log.read("acme", [well], None, 0)
    return {tag: orjson.loads(data) for tag, data in (read.wells[well].latest or {}).items()}


async def test_an_expired_workers_tags_become_uncertain_stale_once_with_their_last_value(backend: Backend) -> None:
    with anyio.fail_after(10):
        async with backend.open() as broker:
            await broker.log.publish(
                [
                    reading("w1", "p", 850.25, status_code="GoodLocalOverride", reason="override"),
                    reading("w1", "t", 70.0, "UNCERTAIN"),
                    reading("w2", "q", None, "BAD", reason="comm_failure"),
                ]
            )
            await broker.workers.beat("run1", "acme", 0.3, [("w1", "p"), ("w1", "t"), ("w2", "q")])
            assert await broker.workers.sweep("acme") == 0, "the lease still runs"
            await backend.advance(0.6)

            assert await broker.workers.sweep("acme") == 2, "BAD stays BAD; the other two are stale"
            w1 = await latest(broker, "w1")
            assert w1["p"] == {
                **reading("w1", "p", 850.25).model_dump(by_alias=True, exclude_none=True),
                "quality": "UNCERTAIN",
                "reason": "stale",
            }
            assert (w1["t"]["quality"], w1["t"]["reason"], w1["t"]["value"]) == ("UNCERTAIN", "stale", 70.0)
            assert (await latest(broker, "w2"))["q"]["reason"] == "comm_failure"
            assert await broker.workers.sweep("acme") == 0, "a verdict is given once"
            logged = (await broker.log.read("acme", ["w1"], after=ZERO_ID, count=10)).wells["w1"].events
            reasons = [orjson.loads(e.data).get("reason") for e in logged]
            assert reasons == ["override", None, "stale", "stale"], "in the log like any reading: streamed, resumable"


async def test_a_renewed_lease_keeps_its_tags_live(backend: Backend) -> None:
    with anyio.fail_after(10):
        async with backend.open() as broker:
            await broker.log.publish([reading("w1", "p")])
            assert await broker.workers.beat("run1", "acme", 0.4, [("w1", "p")]), "the first beat is a new lease"
            for _ in range(3):
                await backend.advance(0.2)
                assert not await broker.workers.beat("run1", "acme", 0.4), "a renewal"
                assert await broker.workers.sweep("acme") == 0
            assert (await latest(broker, "w1"))["p"]["quality"] == "GOOD"


async def test_a_restarted_worker_claims_its_tags_from_its_dead_predecessor(backend: Backend) -> None:
    with anyio.fail_after(10):
        async with backend.open() as broker:
            await broker.log.publish([reading("w1", "p"), reading("w1", "old-only")])
            await broker.workers.beat("run1", "acme", 0.3, [("w1", "p"), ("w1", "old-only")])
            await broker.workers.beat("run2", "acme", 30, [("w1", "p")])
            await backend.advance(0.6)

            assert await broker.workers.sweep("acme") == 1, "only the tag nobody feeds any more"
            assert (await latest(broker, "w1"))["p"]["quality"] == "GOOD"
            assert (await latest(broker, "w1"))["old-only"]["reason"] == "stale"


async def test_a_lease_ended_at_zero_is_swept_at_once_and_a_new_beat_is_a_new_lease(backend: Backend) -> None:
    with anyio.fail_after(10):
        async with backend.open() as broker:
            await broker.log.publish([reading("w1", "p")])
            await broker.workers.beat("run1", "acme", 30, [("w1", "p")])
            await broker.workers.beat("run1", "acme", 0)
            await backend.advance(0.01)
            assert await broker.workers.sweep("acme") == 1
            assert await broker.workers.beat("run1", "acme", 30), "swept, so the next beat must claim again"
