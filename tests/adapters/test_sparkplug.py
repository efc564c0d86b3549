"""SparkplugAdapter against a real mosquitto on loopback, fed by a Sparkplug edge node written here."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import anyio
import pytest
from pydantic import ValidationError

from app.adapters import sparkplug_b_pb2 as pb
from app.adapters.registry import build_adapter
from app.adapters.sparkplug import SparkplugAdapter, SparkplugConnection
from tests.adapters.mosquitto import MosquittoBroker
from tests.adapters.sinks import CollectingSink, running

pytestmark = pytest.mark.anyio

GROUP = "Permian"
HOST_ID = "wellstream-test"
STATE_TOPIC = f"spBv1.0/STATE/{HOST_ID}"
T1 = 1_767_225_600_123  # 2026-01-01T00:00:00.123Z
T2 = T1 + 1_000
DOUBLE, INT32, BOOLEAN, STRING = 10, 3, 11, 12

POINTS = [
    {"node": "pad-7", "device": "", "metric": "Tubing Pressure", "well": "w7", "tag": "tubing_pressure"},
    {"node": "pad-7", "device": "", "metric": "Pump Running", "well": "w7", "tag": "pump_running"},
    {"node": "pad-7", "device": "", "metric": "Status", "well": "w7", "tag": "status"},
    {"node": "pad-*", "device": "rtu-1", "metric": "*/Casing Pressure", "well": "w7", "tag": "casing_pressure"},
    {"node": "pad-7", "device": "rtu-2", "metric": "Flow Rate", "well": "w8", "tag": "flow_rate"},
]


def connection(port: int, **fields: Any) -> SparkplugConnection:
    return SparkplugConnection.model_validate(
        {
            "protocol": "sparkplug",
            "id": "spb1",
            "tenant": "acme",
            "host": "127.0.0.1",
            "port": port,
            "groups": [GROUP],
            "host_id": HOST_ID,
            "metrics": POINTS,
        }
        | fields
    )


class EdgeNode:
    """A Sparkplug edge node: births, data and deaths as real protobuf payloads, its own seq counter."""

    def __init__(self, client: aiomqtt.Client, node: str = "pad-7", bd_seq: int = 0) -> None:
        self.client, self.node, self.bd_seq, self.seq = client, node, bd_seq, 0

    def topic(self, kind: str, device: str | None = None) -> str:
        return f"spBv1.0/{GROUP}/{kind}/{self.node}" + (f"/{device}" if device else "")

    async def send(self, kind: str, metrics: list[dict[str, Any]], device: str | None = None, **fields: Any) -> None:
        payload = pb.Payload(timestamp=T1, **fields)
        for metric in metrics:
            payload.metrics.add(**metric)
        await self.client.publish(self.topic(kind, device), payload.SerializeToString(), qos=1)

    async def birth(self, bd_seq: int | None = None) -> None:
        self.bd_seq = self.bd_seq if bd_seq is None else bd_seq
        self.seq = 0
        metrics = [
            {"name": "bdSeq", "datatype": 8, "long_value": self.bd_seq},
            {"name": "Tubing Pressure", "alias": 1, "datatype": DOUBLE, "double_value": 1200.5, "timestamp": T1},
            {"name": "Pump Running", "alias": 2, "datatype": BOOLEAN, "boolean_value": True, "timestamp": T1},
            {"name": "Status", "alias": 3, "datatype": STRING, "string_value": "pumping", "timestamp": T1},
        ]
        await self.send("NBIRTH", metrics, seq=0)

    async def device_birth(self, device: str) -> None:
        if device == "rtu-1":
            metric = {"name": "Well 7/Casing Pressure", "alias": 10, "datatype": INT32, "int_value": (-5) & 0xFFFFFFFF}
        else:
            metric = {"name": "Flow Rate", "alias": 20, "datatype": DOUBLE, "double_value": 40.0}
        await self.send("DBIRTH", [{**metric, "timestamp": T1}], device, seq=self.next_seq())

    async def data(self, metrics: list[dict[str, Any]], device: str | None = None, seq: int | None = None) -> None:
        kind = "DDATA" if device else "NDATA"
        await self.send(kind, [{"timestamp": T2, **m} for m in metrics], device, seq=self.next_seq(seq))

    async def death(self, bd_seq: int | None = None) -> None:
        bd = self.bd_seq if bd_seq is None else bd_seq
        await self.send("NDEATH", [{"name": "bdSeq", "datatype": 8, "long_value": bd}])

    async def device_death(self, device: str) -> None:
        await self.send("DDEATH", [], device, seq=self.next_seq())

    def next_seq(self, seq: int | None = None) -> int:
        self.seq = (self.seq + 1) % 256 if seq is None else seq
        return self.seq


@contextlib.asynccontextmanager
async def host(conn: SparkplugConnection, port: int) -> AsyncIterator[tuple[CollectingSink, EdgeNode, aiomqtt.Client]]:
    """The adapter running and subscribed; yields its sink, an edge node, and an observer client
    subscribed to every command and STATE topic."""
    async with aiomqtt.Client("127.0.0.1", port) as observer:
        await observer.subscribe("spBv1.0/+/NCMD/#", qos=0)
        await observer.subscribe(STATE_TOPIC, qos=1)
        async with running(SparkplugAdapter(conn)) as sink:
            await next_state(observer, online=True)  # published once the adapter has subscribed
            async with aiomqtt.Client("127.0.0.1", port) as edge:
                yield sink, EdgeNode(edge), observer


async def next_message(observer: aiomqtt.Client, topic_filter: str) -> aiomqtt.Message:
    async for message in observer.messages:
        if message.topic.matches(topic_filter):
            return message
    raise AssertionError("the observer's connection ended")


async def next_state(observer: aiomqtt.Client, online: bool) -> aiomqtt.Message:
    while True:
        message = await next_message(observer, STATE_TOPIC)
        assert isinstance(message.payload, bytes)
        if json.loads(message.payload)["online"] is online:
            return message


async def next_rebirth_request(observer: aiomqtt.Client) -> str:
    """The node asked to rebirth by the next NCMD, after checking it is a well-formed rebirth request."""
    message = await next_message(observer, "spBv1.0/+/NCMD/#")
    assert isinstance(message.payload, bytes)
    payload = pb.Payload.FromString(message.payload)
    (metric,) = payload.metrics
    assert (metric.name, metric.datatype, metric.WhichOneof("value")) == (
        "Node Control/Rebirth",
        BOOLEAN,
        "boolean_value",
    )
    assert metric.boolean_value is True
    return message.topic.value


async def test_births_then_data_by_alias_become_readings(broker: MosquittoBroker) -> None:
    with anyio.fail_after(15):
        async with host(connection(broker.port), broker.port) as (sink, edge, _):
            await edge.birth(bd_seq=1)
            await edge.device_birth("rtu-1")
            born = await sink.wait_for("tubing_pressure", 1200.5)
            assert (born.well_id, born.timestamp, born.tenant_id, born.connection_id) == (
                "w7",
                "2026-01-01T00:00:00.123000Z",
                "acme",
                "spb1",
            )
            assert (await sink.wait_for("pump_running", 1.0)).timestamp == "2026-01-01T00:00:00.123000Z"
            assert (await sink.wait_for("casing_pressure", -5.0)).well_id == "w7"

            await edge.data([{"alias": 1, "double_value": 5.0, "is_historical": True}])
            await edge.data([{"alias": 1, "double_value": 1210.25}])
            await edge.data([{"alias": 10, "int_value": 7}], device="rtu-1")
            await edge.data([{"alias": 2, "boolean_value": False}, {"alias": 3, "string_value": "stopped"}])

            data = await sink.wait_for("tubing_pressure", 1210.25)
            assert (data.well_id, data.tag_name, data.timestamp) == (
                "w7",
                "tubing_pressure",
                "2026-01-01T00:00:01.123000Z",
            )
            assert (await sink.wait_for("casing_pressure", 7.0)).timestamp == "2026-01-01T00:00:01.123000Z"
            await sink.wait_for("pump_running", 0.0)
            assert sink.of("status") == [], "a string is not a reading"
            assert 5.0 not in [r.value for r in sink.of("tubing_pressure")], "a historical value is not live"
            assert sink.of("flow_rate") == [], "rtu-2 was never born"


async def test_a_null_metric_is_bad(broker: MosquittoBroker) -> None:
    with anyio.fail_after(15):
        async with host(connection(broker.port), broker.port) as (sink, edge, _):
            await edge.birth()
            await sink.wait_for("tubing_pressure", 1200.5)

            await edge.data([{"alias": 1, "is_null": True}])

            assert (await sink.wait_for("tubing_pressure", None, "BAD")).reason == "device_error"


async def test_the_sparkplug_quality_property_is_respected(broker: MosquittoBroker) -> None:
    with anyio.fail_after(15):
        async with host(connection(broker.port), broker.port) as (sink, edge, _):
            await edge.birth()
            await sink.wait_for("tubing_pressure", 1200.5)
            stale = pb.Payload.PropertySet(keys=["Quality"], values=[pb.Payload.PropertyValue(type=3, int_value=500)])

            await edge.data([{"alias": 1, "double_value": 1201.0, "properties": stale}])

            assert (await sink.wait_for("tubing_pressure", 1201.0, "UNCERTAIN")).reason == "stale"


async def test_a_seq_gap_is_answered_by_a_rebirth_request(broker: MosquittoBroker) -> None:
    with anyio.fail_after(15):
        async with host(connection(broker.port), broker.port) as (sink, edge, observer):
            await edge.birth()
            await edge.data([{"alias": 1, "double_value": 1.0}])  # seq 1: in order
            await sink.wait_for("tubing_pressure", 1.0)

            await edge.data([{"alias": 1, "double_value": 2.0}], seq=5)  # 2, 3 and 4 were lost

            assert await next_rebirth_request(observer) == f"spBv1.0/{GROUP}/NCMD/pad-7"
            await sink.wait_for("tubing_pressure", 2.0)  # the data that showed the gap is still used


async def test_data_before_a_birth_asks_for_a_rebirth_once_per_interval(broker: MosquittoBroker) -> None:
    with anyio.fail_after(15):
        async with host(connection(broker.port), broker.port) as (sink, edge, observer):
            for _ in range(3):
                await edge.data([{"alias": 1, "double_value": 9.0}])
            other = EdgeNode(edge.client, node="pad-9")
            await other.data([{"alias": 1, "double_value": 9.0}])

            assert await next_rebirth_request(observer) == f"spBv1.0/{GROUP}/NCMD/pad-7"
            # pad-7's storm was asked once: the next request is pad-9's, sent after it
            assert await next_rebirth_request(observer) == f"spBv1.0/{GROUP}/NCMD/pad-9"
            assert sink.readings == []


async def test_an_unknown_alias_asks_for_a_rebirth(broker: MosquittoBroker) -> None:
    with anyio.fail_after(15):
        async with host(connection(broker.port), broker.port) as (sink, edge, observer):
            await edge.birth()
            await edge.data([{"alias": 99, "double_value": 1.0}, {"alias": 1, "double_value": 3.0}])

            assert await next_rebirth_request(observer) == f"spBv1.0/{GROUP}/NCMD/pad-7"
            await sink.wait_for("tubing_pressure", 3.0)


async def test_ndeath_turns_the_node_and_its_devices_bad_and_a_new_birth_brings_them_back(
    broker: MosquittoBroker,
) -> None:
    with anyio.fail_after(15):
        async with host(connection(broker.port), broker.port) as (sink, edge, _):
            await edge.birth(bd_seq=3)
            await edge.device_birth("rtu-1")
            await sink.wait_for("casing_pressure", -5.0)

            await edge.death(bd_seq=3)

            tubing = await sink.wait_for("tubing_pressure", None, "BAD", reason="comm_failure")
            casing = await sink.wait_for("casing_pressure", None, "BAD", reason="comm_failure")
            assert tubing.timestamp > "2026-01-01T00:00:00.123000Z", "stamped at receive time, not the will's"
            assert casing.timestamp.startswith(tubing.timestamp[:4])
            await sink.wait_for("pump_running", None, "BAD", reason="comm_failure")

            await edge.birth(bd_seq=4)
            await edge.device_birth("rtu-1")

            assert (await sink.wait_for("tubing_pressure", 1200.5)).quality == "GOOD"
            await sink.wait_for("casing_pressure", -5.0)


async def test_a_stale_ndeath_is_ignored(broker: MosquittoBroker) -> None:
    with anyio.fail_after(15):
        async with host(connection(broker.port), broker.port) as (sink, edge, _):
            await edge.birth(bd_seq=4)
            await sink.wait_for("tubing_pressure", 1200.5)

            await edge.death(bd_seq=3)  # the will of the session before this birth, late
            await edge.data([{"alias": 1, "double_value": 1300.0}])  # a later marker

            await sink.wait_for("tubing_pressure", 1300.0)
            assert [r for r in sink.readings if r.quality == "BAD"] == []


async def test_ddeath_turns_only_that_devices_metrics_bad(broker: MosquittoBroker) -> None:
    with anyio.fail_after(15):
        async with host(connection(broker.port), broker.port) as (sink, edge, _):
            await edge.birth()
            await edge.device_birth("rtu-1")
            await edge.device_birth("rtu-2")
            await sink.wait_for("casing_pressure", -5.0)
            await sink.wait_for("flow_rate", 40.0)

            await edge.device_death("rtu-1")
            await sink.wait_for("casing_pressure", None, "BAD", reason="comm_failure")
            await edge.data([{"alias": 20, "double_value": 41.0}], device="rtu-2")
            await sink.wait_for("flow_rate", 41.0)
            assert [r.tag_name for r in sink.readings if r.quality == "BAD"] == ["casing_pressure"]

            await edge.device_birth("rtu-1")
            assert (await sink.wait_for("casing_pressure", -5.0)).quality == "GOOD"


async def test_state_is_published_retained_and_its_will_says_offline(broker: MosquittoBroker) -> None:
    with anyio.fail_after(15):
        conn = connection(broker.port, client_id="wellstream-host")
        async with running(SparkplugAdapter(conn)), aiomqtt.Client("127.0.0.1", broker.port) as early:
            await early.subscribe(STATE_TOPIC, qos=1)
            await next_state(early, online=True)
            async with aiomqtt.Client("127.0.0.1", broker.port) as late:
                await late.subscribe(STATE_TOPIC, qos=1)
                online = await next_state(late, online=True)  # subscribed after it was sent: retained
                assert online.retain
                assert isinstance(online.payload, bytes)
                born = json.loads(online.payload)["timestamp"]
                assert isinstance(born, int)

                # Taking over the adapter's client id cuts it off without a DISCONNECT: the broker sends its will.
                async with aiomqtt.Client("127.0.0.1", broker.port, identifier="wellstream-host"):
                    offline = await next_state(late, online=False)
                assert isinstance(offline.payload, bytes)
                assert json.loads(offline.payload) == {"online": False, "timestamp": born}
                # and the adapter, reconnected, says it is back
                await next_state(late, online=True)


async def test_garbage_payloads_and_topics_are_skipped(
    broker: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="app.adapters.sparkplug")
    with anyio.fail_after(15):
        async with host(connection(broker.port), broker.port) as (sink, edge, _):
            await edge.client.publish(edge.topic("NDATA"), b"\xff\xfenot protobuf", qos=1)
            await edge.client.publish(f"spBv1.0/{GROUP}/NDATA", b"", qos=1)
            await edge.client.publish(f"spBv1.0/{GROUP}/DDATA/pad-7", b"", qos=1)
            await edge.birth()

            await sink.wait_for("tubing_pressure", 1200.5)
            assert "skipped a message on spBv1.0/Permian/NDATA/pad-7: not a Sparkplug B payload" in caplog.text
            # at most one warning a minute: the bad topics that followed are held back
            assert caplog.text.count("skipped a message") == 1


def test_config_errors_name_the_field_and_the_problem() -> None:
    def invalid(**fields: Any) -> str:
        with pytest.raises(ValidationError) as caught:
            connection(1883, **fields)
        return str(caught.value)

    assert "group 'a/b' must be one topic level" in invalid(groups=["a/b"])
    assert "STATE is the host applications' topic" in invalid(groups=["STATE"])
    assert "metrics[0] (w1/t): group 'Other*' matches none of the connection's groups (Permian)" in invalid(
        metrics=[{"group": "Other*", "metric": "x", "well": "w1", "tag": "t"}]
    )
    assert "metrics.0.metric" in invalid(metrics=[{"well": "w1", "tag": "t"}])
    assert "metrics.0.node" in invalid(metrics=[{"node": "a/#", "metric": "x", "well": "w1", "tag": "t"}])
    assert "host_id" in invalid(host_id="host+1")
    assert "metrics" in invalid(metrics=[])


def test_the_registry_builds_a_sparkplug_adapter_and_knows_its_wells() -> None:
    conn = connection(1883)

    assert isinstance(build_adapter(conn, {}), SparkplugAdapter)
    assert conn.wells == ["w7", "w8"]
    assert conn.feeds()[3] == ("w7", "casing_pressure")
