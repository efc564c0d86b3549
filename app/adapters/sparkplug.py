"""Sparkplug B: a host application on one MQTT broker, reading the edge nodes of some groups.

Subscribes to `spBv1.0/<group>/#` for each configured group and decodes each payload
(app/adapters/sparkplug_payload.py). Births declare each node's and device's metrics (name,
alias, datatype); data messages name them by alias or name (app/adapters/sparkplug_session.py).
Data before a birth, a seq gap and an unknown alias or device are answered with an NCMD
`Node Control/Rebirth` = true, at most once per node every `rebirth_interval_s`. An NDEATH
whose bdSeq matches the node's birth turns every point of the node and its devices BAD
comm_failure at receive time; a DDEATH does the same for that device; the next birth brings
values back. With a `host_id`, the host's STATE (Sparkplug 3.0) is published retained on
`spBv1.0/STATE/<host_id>`, with the MQTT will saying it went offline.

Which metric feeds which (well, tag) is the site file's `metrics` list: each entry matches
group, node, device and metric name with fnmatch patterns (case-sensitive; `device = ""` only
the node's own metrics) and feeds one tag; a metric matching several entries feeds each.
Numbers (integers, floats, booleans as 0/1) become readings, with the metric's timestamp (or
the payload's, or the time of arrival); a null is BAD; strings, bytes, datasets and templates
are skipped (logged at debug), and so are historical values (`is_historical`): they are late.
A `Quality` property (192 GOOD, 500 stale, 0 BAD) is respected.
Payloads that are not Sparkplug B are logged (at most once per `_WARN_EVERY_S` per kind of
problem) and skipped. Readings say `source_protocol = "sparkplug"`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import time
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Literal

import aiomqtt
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from app.adapters.base import PointTarget, ReadingSink
from app.adapters.mqtt import BrokerAccess
from app.adapters.reconnect import ReconnectingAdapter, ReconnectLoop
from app.adapters.reporter import Reporter, Source
from app.adapters.sparkplug_payload import NAMESPACE, SparkplugError, Topic, decode, number, rebirth_request, state
from app.adapters.sparkplug_session import Outcome, Sample, Sessions
from app.adapters.throttle import WarningThrottle
from app.errors import ConnectionLost
from app.models import Identifier, Reading, utc_now_iso

logger = logging.getLogger(__name__)

_WARN_EVERY_S = 60.0  # a node that keeps sending garbage writes one warning a minute, not one a message
# A Sparkplug id (group, node, device): one MQTT topic level, no wildcard characters.
_ID_PATTERN = r"^[^/+#]{1,128}$"
# A point's group/node/device pattern: a level as above, with fnmatch's * ? [ ] allowed.
_LEVEL_PATTERN = r"^[^/+#]{0,128}$"


class SparkplugMetric(PointTarget):
    """A metric selector and the tag of the well it feeds.

    `group`, `node` and `device` match one topic level each and `metric` the metric's name
    (which may contain `/`), as fnmatch patterns: `*`, `?` and `[...]`. `device = ""` matches
    only metrics of the edge node itself (NBIRTH/NDATA), `"*"` (the default) those too.
    """

    group: str = Field("*", pattern=_LEVEL_PATTERN, min_length=1)
    node: str = Field("*", pattern=_LEVEL_PATTERN, min_length=1)
    device: str = Field("*", pattern=_LEVEL_PATTERN)
    metric: str = Field(min_length=1, max_length=512)

    def matches(self, group: str, node: str, device: str | None, metric: str) -> bool:
        return (
            fnmatch.fnmatchcase(group, self.group)
            and fnmatch.fnmatchcase(node, self.node)
            and fnmatch.fnmatchcase(device or "", self.device)
            and fnmatch.fnmatchcase(metric, self.metric)
        )


class SparkplugConnection(BrokerAccess):
    """A broker, the Sparkplug groups read from it, and the metrics that feed tags."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    protocol: Literal["sparkplug"]
    id: Identifier
    tenant: Identifier
    groups: list[str] = Field(min_length=1)
    host_id: str | None = Field(None, pattern=_ID_PATTERN)
    rebirth_interval_s: float = Field(5.0, gt=0, le=3600)
    refresh_s: float | None = Field(None, gt=0, description="with a deadband: report an unchanged value this often")
    comm_timeout_s: float = Field(5.0, gt=0, le=3600)
    metrics: list[SparkplugMetric] = Field(min_length=1)

    @field_validator("groups")
    @classmethod
    def _group_ids(cls, groups: list[str]) -> list[str]:
        for group in groups:
            if not group or "/" in group or "+" in group or "#" in group:
                raise ValueError(f"group {group!r} must be one topic level, without / + or #")
            if group == "STATE":
                raise ValueError("STATE is the host applications' topic, not a group")
        return list(dict.fromkeys(groups))

    @model_validator(mode="after")
    def _every_metric_can_match_a_group(self) -> SparkplugConnection:
        for n, point in enumerate(self.metrics):
            if not any(fnmatch.fnmatchcase(group, point.group) for group in self.groups):
                raise ValueError(
                    f"metrics[{n}] ({point.well}/{point.tag}): group {point.group!r} matches none of the "
                    f"connection's groups ({', '.join(self.groups)})"
                )
        return self

    @property
    def comm_timeout(self) -> float:
        return self.comm_timeout_s

    def stale_after(self, point: PointTarget) -> float | None:
        """Only `stale_after_s`: edge nodes report by exception, so silence is not staleness by itself."""
        return point.stale_after_s

    @property
    def wells(self) -> list[str]:
        """Every well this connection feeds, in first-seen order."""
        return list(dict.fromkeys(point.well for point in self.metrics))

    def feeds(self) -> list[tuple[str, str]]:
        """Every (well, tag) this connection's metrics feed, in the file's order."""
        return [(point.well, point.tag) for point in self.metrics]

    def points_for(self, group: str, node: str, device: str | None, metric: str) -> list[SparkplugMetric]:
        return [point for point in self.metrics if point.matches(group, node, device, metric)]


class SparkplugAdapter(ReconnectingAdapter):
    """A Sparkplug B host application for one connection, until cancelled.

    Connection failures are logged once per outage and retried with capped backoff (0.1 s to
    5 s); no aiomqtt or protobuf exception ever leaves `run()`. Every new broker session
    forgets what it knew of the nodes: their next message is answered with a rebirth request.

    Args:
        connection: the validated connection.
        credentials: where `username_env` and `password_env` are looked up, at every connect.
    """

    connected_is_alive = True

    def __init__(self, connection: SparkplugConnection, *, credentials: Mapping[str, str] | None = None) -> None:
        loop = ReconnectLoop("sparkplug", connection.id, first_s=0.1, cap_s=5.0, logger=logger, credentials=credentials)
        source = Source(connection.tenant, "sparkplug", connection.id)
        reporter = Reporter(source, connection.metrics, connection.stale_after, connection.refresh_s)
        super().__init__(loop, reporter, connection.comm_timeout)
        self._connection = connection
        self._sessions: Sessions[SparkplugMetric] = Sessions(connection.points_for)
        self._rebirth_asked: dict[tuple[str, str], float] = {}
        self._throttle = WarningThrottle(logger, _WARN_EVERY_S)

    async def run(self, sink: ReadingSink) -> None:
        await self._run_watched(sink, self._session, lambda client: self._serve(client, sink))

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[aiomqtt.Client]:
        born_ms = _now_ms()
        try:
            async with self._client(born_ms) as client:
                self._sessions.clear()
                self._rebirth_asked.clear()
                for group in self._connection.groups:
                    await client.subscribe(f"{NAMESPACE}/{group}/#", qos=0)
                # Online only once subscribed: edge nodes answer it with their births (Sparkplug 3.0).
                if self._connection.host_id is not None:
                    await client.publish(self._state_topic, state(True, born_ms), qos=1, retain=True)
                logger.info("sparkplug %s subscribed to %d groups", self.name, len(self._connection.groups))
                yield client
        except aiomqtt.MqttError as exc:
            raise ConnectionLost(self.name, f"broker connection failed: {exc}") from exc

    @property
    def _state_topic(self) -> str:
        return f"{NAMESPACE}/STATE/{self._connection.host_id}"

    def _client(self, born_ms: int) -> aiomqtt.Client:
        c = self._connection
        will = None
        if c.host_id is not None:
            will = aiomqtt.Will(self._state_topic, state(False, born_ms), qos=1, retain=True)
        return c.client(self._reconnect, clean_session=True, will=will)

    async def _serve(self, client: aiomqtt.Client, sink: ReadingSink) -> None:
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
            await self._handle(client, message.topic.value, bytes(payload), sink)

    async def _handle(self, client: aiomqtt.Client, topic_name: str, payload: bytes, sink: ReadingSink) -> None:
        self._reconnect.contact()
        try:
            topic = Topic.parse(topic_name)
            if topic.kind in ("NCMD", "DCMD"):
                return  # commands, ours among them, are for the edge nodes
            decoded = decode(payload)
        except SparkplugError as exc:
            self._throttle.warn("payload", f"sparkplug {self.name}: skipped a message on {topic_name[:200]}: {exc}")
            return
        outcome = self._sessions.receive(topic, decoded)
        if outcome.ignored is not None:
            logger.info("sparkplug %s: ignored %s: %s", self.name, topic_name, outcome.ignored)
        readings = self._readings(topic, outcome, decoded.timestamp_ms)
        if readings:
            await sink.submit(readings)
        if outcome.rebirth is not None:
            await self._ask_rebirth(client, topic, outcome.rebirth)

    def _readings(self, topic: Topic, outcome: Outcome[SparkplugMetric], sent_ms: int | None) -> list[Reading]:
        readings = [r for sample in outcome.samples for r in self._sample(topic, sample, sent_ms)]
        if outcome.lost:
            stamp = utc_now_iso()
            lost = [self._reporter.sample(p, None, "BAD", stamp, reason="comm_failure") for p in outcome.lost]
            readings += [reading for reading in lost if reading is not None]
            logger.warning("sparkplug %s: %s: %d tags reported BAD comm_failure", self.name, topic.kind, len(lost))
        return readings

    def _sample(self, topic: Topic, sample: Sample[SparkplugMetric], sent_ms: int | None) -> list[Reading]:
        metric, known = sample.metric, sample.known
        if not known.points or metric.historical:
            return []  # a historical value belongs in a historian, not in the live stream
        try:
            value = number(metric, metric.datatype if metric.datatype is not None else known.datatype)
        except SparkplugError as exc:
            logger.debug("sparkplug %s: %s of %s/%s skipped: %s", self.name, known.name, topic.group, topic.node, exc)
            return []
        quality, reason = metric.quality or ("GOOD", None)
        if metric.is_null:
            quality, reason = "BAD", reason or "device_error"
        timestamp = _iso(metric.timestamp_ms) or _iso(sent_ms) or utc_now_iso()
        try:
            found = [self._reporter.sample(p, value, quality, timestamp, reason=reason) for p in known.points]
        except ValidationError as exc:
            self._throttle.warn("metric", f"sparkplug {self.name}: skipped metric {known.name}: {exc}")
            return []
        return [reading for reading in found if reading is not None]

    async def _ask_rebirth(self, client: aiomqtt.Client, topic: Topic, why: str) -> None:
        key = (topic.group, topic.node)
        now = time.monotonic()
        last = self._rebirth_asked.get(key)
        if last is not None and now - last < self._connection.rebirth_interval_s:
            logger.debug("sparkplug %s: rebirth of %s/%s not asked again yet (%s)", self.name, *key, why)
            return
        self._rebirth_asked[key] = now
        logger.info("sparkplug %s: asking %s/%s to rebirth: %s", self.name, topic.group, topic.node, why)
        command = f"{NAMESPACE}/{topic.group}/NCMD/{topic.node}"
        await client.publish(command, rebirth_request(_now_ms()), qos=0)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _iso(ms: int | None) -> str | None:
    """A Sparkplug timestamp (ms since the epoch) in the wire format; None if absent or out of range."""
    if ms is None:
        return None
    try:
        moment = datetime.fromtimestamp(ms // 1000, UTC).replace(microsecond=(ms % 1000) * 1000)
    except (ValueError, OverflowError, OSError):
        return None
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
