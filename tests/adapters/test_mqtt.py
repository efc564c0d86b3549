"""MqttAdapter against a real mosquitto on loopback, published to with aiomqtt."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiomqtt
import anyio
import pytest
from pydantic import ValidationError

from app.adapters.mqtt import MqttAdapter, MqttConnection
from app.models import Reading
from tests.adapters.mosquitto import MosquittoBroker
from tests.conftest import wait_until

pytestmark = pytest.mark.anyio

PROBE = {"topic": "probe/ready", "well": "w9", "tag": "probe"}


class CollectingSink:
    """A real ReadingSink: keeps every reading (probe readings aside) and wakes waiters."""

    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.probed = anyio.Event()
        self._changed = anyio.Event()

    async def submit(self, readings: Sequence[Reading]) -> None:
        for reading in readings:
            if reading.tag_name == "probe":
                self.probed.set()
            else:
                self.readings.append(reading)
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, count: int) -> list[Reading]:
        while len(self.readings) < count:
            await self._changed.wait()
        return self.readings


def connection(port: int, tags: list[dict[str, Any]], **fields: Any) -> MqttConnection:
    return MqttConnection.model_validate(
        {"protocol": "mqtt", "id": "mq1", "tenant": "acme", "host": "127.0.0.1", "port": port}
        | fields
        | {"tags": [*tags, PROBE]}
    )


@contextlib.asynccontextmanager
async def running(conn: MqttConnection, port: int) -> AsyncIterator[tuple[CollectingSink, aiomqtt.Client]]:
    """The adapter running against the broker, subscribed; yields its sink and a publishing client."""
    sink = CollectingSink()
    async with anyio.create_task_group() as tg:
        tg.start_soon(MqttAdapter(conn).run, sink)
        async with aiomqtt.Client("127.0.0.1", port) as publisher:
            await wait_subscribed(sink, publisher)
            yield sink, publisher
        tg.cancel_scope.cancel()


async def wait_subscribed(sink: CollectingSink, publisher: aiomqtt.Client) -> None:
    """Publish to the probe topic until the adapter reports it: then every filter is subscribed."""
    sink.probed = anyio.Event()
    while not sink.probed.is_set():
        await publisher.publish("probe/ready", b"1", qos=1)
        with anyio.move_on_after(0.05):
            await sink.probed.wait()


async def test_json_payloads_carry_value_quality_and_timestamp(broker: MosquittoBroker) -> None:
    with anyio.fail_after(15):
        tags = [{"topic": "site/w1/tubing", "well": "w1", "tag": "tubing_pressure", "unit": "psi"}]
        async with running(connection(broker.port, tags), broker.port) as (sink, publisher):
            topic = "site/w1/tubing"
            await publisher.publish(
                topic, b'{"value": 850.5, "quality": "uncertain", "timestamp": "2026-11-27T10:00:00Z"}'
            )
            await publisher.publish(topic, b'{"value": 851, "timestamp": 1795773600}')
            await publisher.publish(topic, b'{"value": 852, "quality": "Bad", "timestamp": 1795773600123}')
            await publisher.publish(topic, b'{"value": null, "quality": "GOOD"}')
            readings = await sink.wait_for(4)
    first, second, third, fourth = readings
    assert (first.tenant_id, first.well_id, first.tag_name, first.unit) == ("acme", "w1", "tubing_pressure", "psi")
    assert (first.source_protocol, first.connection_id) == ("mqtt", "mq1")
    assert (first.value, first.quality, first.timestamp) == (850.5, "UNCERTAIN", "2026-11-27T10:00:00.000000Z")
    assert (second.value, second.quality, second.timestamp) == (851.0, "GOOD", "2026-11-27T10:00:00.000000Z")
    # A BAD reading never carries a value, whatever the payload held: BAD means "no usable value".
    assert (third.value, third.quality, third.timestamp) == (None, "BAD", "2026-11-27T10:00:00.123000Z")
    assert third.reason == "device_error"
    assert (fourth.value, fourth.quality) == (None, "BAD")


async def test_custom_field_names(broker: MosquittoBroker) -> None:
    with anyio.fail_after(15):
        tags = [{"topic": "rtu/7/casing", "well": "w2", "tag": "casing"}]
        conn = connection(broker.port, tags, value_field="v", quality_field="q", timestamp_field="ts")
        async with running(conn, broker.port) as (sink, publisher):
            await publisher.publish("rtu/7/casing", b'{"v": 1200.25, "q": "GOOD", "ts": "2026-11-27T11:30:00.5+01:00"}')
            (reading,) = await sink.wait_for(1)
    assert (reading.value, reading.quality, reading.timestamp) == (1200.25, "GOOD", "2026-11-27T10:30:00.500000Z")


async def test_plain_number_payloads_are_good_and_stamped_on_arrival(broker: MosquittoBroker) -> None:
    with anyio.fail_after(15):
        tags = [{"topic": "site/w1/flow", "well": "w1", "tag": "flow_rate"}]
        async with running(connection(broker.port, tags, qos=2), broker.port) as (sink, publisher):
            await publisher.publish("site/w1/flow", b"12.5")
            await publisher.publish("site/w1/flow", b" -3 ")
            await publisher.publish("site/w1/flow", 42)
            readings = await sink.wait_for(3)
    assert [(r.value, r.quality) for r in readings] == [(12.5, "GOOD"), (-3.0, "GOOD"), (42.0, "GOOD")]
    assert all(r.timestamp.startswith(time.strftime("%Y-", time.gmtime())) for r in readings)


async def test_scale_and_offset_are_applied(broker: MosquittoBroker) -> None:
    with anyio.fail_after(15):
        tags = [{"topic": "plc/temp", "well": "w1", "tag": "temperature", "scale": 0.1, "offset": -40.0}]
        async with running(connection(broker.port, tags), broker.port) as (sink, publisher):
            await publisher.publish("plc/temp", b"1000")
            await publisher.publish("plc/temp", b'{"value": 500}')
            readings = await sink.wait_for(2)
    assert [r.value for r in readings] == pytest.approx([60.0, 10.0])


async def test_wildcard_filters_map_to_one_tag_each(broker: MosquittoBroker) -> None:
    with anyio.fail_after(15):
        tags = [
            {"topic": "site/+/tubing", "well": "w1", "tag": "tubing"},
            {"topic": "site/#", "well": "w2", "tag": "anything"},
            {"topic": "site/a/tubing", "well": "w3", "tag": "exact"},  # a plain filter beside the wildcards
        ]
        async with running(connection(broker.port, tags), broker.port) as (sink, publisher):
            await publisher.publish("site/a/tubing", b"1")  # both filters
            await publisher.publish("site/a/b/tubing", b"2")  # `+` is one level: only site/#
            await publisher.publish("site", b"3")  # `#` includes the parent level
            await publisher.publish("other/a/tubing", b"4")  # neither
            await publisher.publish("site/b/tubing", b"5")
            await publisher.publish("site/a/tubing", b"6")  # a topic seen before: the same three tags
            readings = await sink.wait_for(10)
            await anyio.sleep(0.1)
    got = sorted((r.well_id, r.tag_name, r.value) for r in readings)
    assert got == [
        ("w1", "tubing", 1.0),
        ("w1", "tubing", 5.0),
        ("w1", "tubing", 6.0),
        ("w2", "anything", 1.0),
        ("w2", "anything", 2.0),
        ("w2", "anything", 3.0),
        ("w2", "anything", 5.0),
        ("w2", "anything", 6.0),
        ("w3", "exact", 1.0),
        ("w3", "exact", 6.0),
    ]


async def test_unusable_payloads_are_logged_and_skipped(
    broker: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="app.adapters.mqtt")
    bad = [
        b"twelve",
        b"{not json",
        b"[1, 2]",
        b'{"quality": "GOOD"}',
        b'{"value": "abc"}',
        b'{"value": true}',
        b'{"value": 1, "quality": "OK"}',
        b'{"value": 1, "timestamp": "2026-11-27T10:00:00"}',
        b'{"value": 1, "timestamp": 1e300}',
        b"\xff\xfe",
    ]
    with anyio.fail_after(15):
        tags = [{"topic": "site/w1/p", "well": "w1", "tag": "p"}]
        async with running(connection(broker.port, tags), broker.port) as (sink, publisher):
            for payload in bad:
                await publisher.publish("site/w1/p", payload)
            await publisher.publish("site/w1/p", b"7.5")
            (reading,) = await sink.wait_for(1)
    assert reading.value == 7.5
    skipped = [r for r in caplog.records if "skipped a message" in r.getMessage()]
    assert len(skipped) == len(bad)
    assert all(r.levelno == logging.WARNING and "site/w1/p" in r.getMessage() for r in skipped)


async def test_nan_becomes_bad_with_no_value(broker: MosquittoBroker) -> None:
    with anyio.fail_after(15):
        tags = [{"topic": "site/w1/p", "well": "w1", "tag": "p", "scale": 2.0}]
        async with running(connection(broker.port, tags), broker.port) as (sink, publisher):
            await publisher.publish("site/w1/p", b"NaN")
            await publisher.publish("site/w1/p", b'{"value": NaN, "quality": "GOOD"}')
            await publisher.publish("site/w1/p", b"inf")
            readings = await sink.wait_for(3)
    assert [(r.value, r.quality) for r in readings] == [(None, "BAD")] * 3


async def test_a_tag_with_a_deadband_reports_by_exception_and_refreshes(broker: MosquittoBroker) -> None:
    with anyio.fail_after(15):
        tags: list[dict[str, Any]] = [
            {"topic": "site/w1/p", "well": "w1", "tag": "p", "deadband": 1.0},
            {"topic": "site/w1/marker", "well": "w1", "tag": "marker"},
        ]
        conn = connection(broker.port, tags, refresh_s=1.0)
        async with running(conn, broker.port) as (sink, publisher):

            async def marked(n: int) -> None:
                # One publisher, one subscriber, QoS 1: a later message is handled after the earlier ones.
                await publisher.publish("site/w1/marker", str(n).encode(), qos=1)
                await wait_until(lambda: any(r.tag_name == "marker" and r.value == n for r in sink.readings))

            for payload in (b"10", b"10.5", b"9.2", b"11.5", b"11.5", b'{"value": 11.5, "quality": "BAD"}'):
                await publisher.publish("site/w1/p", payload, qos=1)
            await marked(1)
            await anyio.sleep(1.0)  # refresh_s since the last report
            await publisher.publish("site/w1/p", b'{"value": 11.5, "quality": "BAD"}', qos=1)
            await marked(2)
    assert [(r.tag_name, r.value, r.quality) for r in sink.readings] == [
        ("p", 10.0, "GOOD"),
        ("p", 11.5, "GOOD"),
        ("p", None, "BAD"),
        ("marker", 1.0, "GOOD"),
        ("p", None, "BAD"),
        ("marker", 2.0, "GOOD"),
    ]


async def test_broker_restart_is_survived(broker: MosquittoBroker) -> None:
    with anyio.fail_after(15):
        tags = [{"topic": "site/w1/p", "well": "w1", "tag": "p"}]
        sink = CollectingSink()
        async with anyio.create_task_group() as tg:
            tg.start_soon(MqttAdapter(connection(broker.port, tags)).run, sink)
            async with aiomqtt.Client("127.0.0.1", broker.port) as publisher:
                await wait_subscribed(sink, publisher)
                await publisher.publish("site/w1/p", b"1", qos=1)
                await sink.wait_for(1)
            await anyio.to_thread.run_sync(broker.stop)
            await anyio.sleep(0.3)  # the adapter notices and retries against a closed port
            await anyio.to_thread.run_sync(broker.start)
            async with aiomqtt.Client("127.0.0.1", broker.port) as publisher:
                await wait_subscribed(sink, publisher)
                await publisher.publish("site/w1/p", b"2", qos=1)
                _, reading = await sink.wait_for(2)
            tg.cancel_scope.cancel()
    assert reading.value == 2.0


async def test_credentials_are_looked_up_by_name_at_each_connect_and_never_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    passwords = tmp_path / "passwd"
    binary = shutil.which("mosquitto_passwd")
    if binary is None:
        pytest.fail("mosquitto_passwd is not installed (it ships with the mosquitto package)")
    await anyio.run_process([binary, "-c", "-b", str(passwords), "ingest", "s3cret-pw"])
    # Started as root, mosquitto drops to its own user, which cannot read pytest's private temp dir.
    as_root = "user root\n" if os.geteuid() == 0 else ""
    server = MosquittoBroker(tmp_path, f"allow_anonymous false\npassword_file {passwords}\n{as_root}")
    server.start()
    caplog.set_level(logging.DEBUG)
    credentials = {"TEST_MQTT_USER": "ingest", "TEST_MQTT_PASSWORD": "wrong-pw"}
    tags = [{"topic": "site/w1/p", "well": "w1", "tag": "p"}]
    conn = connection(server.port, tags, username_env="TEST_MQTT_USER", password_env="TEST_MQTT_PASSWORD")
    try:
        with anyio.fail_after(15):
            sink = CollectingSink()
            async with anyio.create_task_group() as tg:
                tg.start_soon(MqttAdapter(conn, credentials=credentials).run, sink)
                async with aiomqtt.Client("127.0.0.1", server.port, username="ingest", password="s3cret-pw") as pub:
                    # The log is the only sign of a refused connect.
                    await wait_until(lambda: any("broker connection failed" in r.getMessage() for r in caplog.records))
                    # The next attempt looks the names up again.
                    credentials["TEST_MQTT_PASSWORD"] = "s3cret-pw"
                    await wait_subscribed(sink, pub)
                    await pub.publish("site/w1/p", b"3")
                    (reading,) = await sink.wait_for(1)
                tg.cancel_scope.cancel()
    finally:
        server.stop()
    assert reading.value == 3.0
    assert not any("s3cret" in r.getMessage() or "wrong-pw" in r.getMessage() for r in caplog.records)


def test_connection_config_is_validated() -> None:
    tag = {"topic": "a/+/b", "well": "w1", "tag": "p"}
    base = {"protocol": "mqtt", "id": "mq1", "tenant": "acme", "host": "localhost"}
    conn = MqttConnection.model_validate(base | {"tags": [tag, tag | {"well": "w2"}, tag]})
    assert (conn.port, conn.qos, conn.keepalive_s, conn.wells) == (1883, 1, 10, ["w1", "w2"])
    bad_fields: list[dict[str, object]] = [
        {"tags": []},
        {"tags": [tag | {"topic": "a/#/b"}]},
        {"tags": [tag | {"topic": "a/b+"}]},
        {"tags": [tag | {"well": "w:1"}]},
        {"tags": [tag], "qos": 3},
        {"tags": [tag], "persistent_session": True},
        {"tags": [tag], "password": "inline"},
    ]
    for bad in bad_fields:
        with pytest.raises(ValidationError):
            MqttConnection.model_validate(base | bad)


async def test_a_retained_message_keeps_its_own_timestamp_and_without_one_is_uncertain(
    broker: MosquittoBroker,
) -> None:
    with anyio.fail_after(15):
        async with aiomqtt.Client("127.0.0.1", broker.port) as device:
            # Published (and retained by the broker) before the adapter ever connects.
            await device.publish("site/w1/p", b'{"value": 7.5, "timestamp": "2026-11-27T10:00:00Z"}', retain=True)
            await device.publish("site/w1/q", b"3.25", retain=True)
        tags = [{"topic": "site/w1/p", "well": "w1", "tag": "p"}, {"topic": "site/w1/q", "well": "w1", "tag": "q"}]
        async with running(connection(broker.port, tags), broker.port) as (sink, publisher):
            await wait_until(lambda: {r.tag_name for r in sink.readings} >= {"p", "q"})
            p = next(r for r in sink.readings if r.tag_name == "p")
            q = next(r for r in sink.readings if r.tag_name == "q")
            assert (p.value, p.quality, p.reason, p.timestamp) == (7.5, "GOOD", None, "2026-11-27T10:00:00.000000Z")
            assert (q.value, q.quality, q.reason) == (3.25, "UNCERTAIN", "retained")
            await publisher.publish("site/w1/q", b"3.5", qos=1)  # a live message: GOOD, stamped on arrival
            await wait_until(lambda: any((r.tag_name, r.value, r.quality) == ("q", 3.5, "GOOD") for r in sink.readings))


async def test_an_offline_message_on_the_status_topic_turns_every_tag_bad_at_once(broker: MosquittoBroker) -> None:
    with anyio.fail_after(15):
        tags = [{"topic": "edge/7/p", "well": "w1", "tag": "p"}, {"topic": "edge/7/t", "well": "w1", "tag": "t"}]
        conn = connection(broker.port, tags, status_topic="edge/7/status", comm_timeout_s=3600)
        async with running(conn, broker.port) as (sink, publisher):
            await publisher.publish("edge/7/p", b"10", qos=1)
            await wait_until(lambda: any(r.tag_name == "p" and r.value == 10 for r in sink.readings))
            await publisher.publish("edge/7/status", b"online", qos=1)
            await publisher.publish("edge/7/status", b"offline", qos=1)
            expected = {("p", "comm_failure"), ("t", "comm_failure")}
            await wait_until(lambda: {(r.tag_name, r.reason) for r in sink.readings} >= expected)
            lost = [r for r in sink.readings if r.reason == "comm_failure"]
            assert {(r.tag_name, r.value, r.quality) for r in lost} == {("p", None, "BAD"), ("t", None, "BAD")}
            await publisher.publish("edge/7/p", b"11", qos=1)
            await wait_until(lambda: sink.readings[-1].tag_name == "p" and sink.readings[-1].quality == "GOOD")
