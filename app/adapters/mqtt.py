"""MQTT: topic filters on one broker, each feeding one tag of one well.

A payload is a plain number (`12.5`, `nan`) or a JSON object whose value, quality and
timestamp fields are named by the connection. Quality is GOOD, BAD or UNCERTAIN in any case
and defaults to GOOD; the timestamp is ISO-8601 with a zone or epoch seconds/milliseconds and
defaults to the time of arrival. A payload that cannot become a valid Reading is logged with
its topic and skipped. Every message is reported unless its tag has a `deadband`: then it is
reported by exception (app/adapters/deadband.py), and every `refresh_s` if the connection has one.

aiomqtt 2.x has no automatic reconnect: each attempt (app/adapters/reconnect.py) opens a fresh
client, subscribes again and backs off 0.1 s doubling to 5 s while the broker is away.
Credentials are looked up by name at each connect in the `credentials` mapping the caller
passes: only app/settings.py reads the process environment, and a live mapping of it picks up
rotated secrets.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import ssl
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Literal

import aiomqtt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.adapters.base import PointTarget, ReadingSink
from app.adapters.reconnect import ReconnectingAdapter, ReconnectLoop
from app.adapters.reporter import Reporter, Source
from app.errors import ConnectionLost, PayloadError
from app.models import Identifier, Quality, Reading, Reason, utc_now_iso

logger = logging.getLogger(__name__)

# As epoch seconds 1e11 is the year 5138, so any larger timestamp is taken as milliseconds.
_EPOCH_MILLIS_FROM = 1e11
_QUALITIES: dict[str, Quality] = {"GOOD": "GOOD", "BAD": "BAD", "UNCERTAIN": "UNCERTAIN"}


class _Unusable(ValueError):
    """Why a payload cannot become a Reading; `decode` names the connection (PayloadError)."""


class MqttTag(PointTarget):
    """One topic filter (`+` and `#` allowed) and the tag of the well its messages feed.

    With a `deadband` (in the scaled unit, or percent of the last reported value), a message is
    only reported when its value moved past it since the last report, or its quality changed.
    """

    topic: str = Field(min_length=1, max_length=1024)

    @field_validator("topic")
    @classmethod
    def _topic_filter(cls, value: str) -> str:
        aiomqtt.Wildcard(value)  # raises ValueError on a malformed filter, e.g. `a/#/b` or `a/b+`
        return value


class BrokerAccess(BaseModel):
    """Where an MQTT client connects and as whom, for the mqtt and sparkplug connections alike.
    Credentials are named environment variables, never values."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field(min_length=1, max_length=255)
    port: int = Field(1883, ge=1, le=65535)
    username_env: str | None = None
    password_env: str | None = None
    tls: bool = False
    keepalive_s: int = Field(10, ge=1, le=3600)
    client_id: str | None = Field(None, min_length=1, max_length=128)

    def client(self, loop: ReconnectLoop, *, clean_session: bool, will: aiomqtt.Will | None = None) -> aiomqtt.Client:
        """A client of this broker, its credentials read (by `loop`, which warns if unset) now."""
        return aiomqtt.Client(
            self.host,
            self.port,
            username=loop.secret(self.username_env),
            password=loop.secret(self.password_env),
            identifier=self.client_id,
            clean_session=clean_session,
            keepalive=self.keepalive_s,
            timeout=max(5.0, float(self.keepalive_s)),
            tls_context=ssl.create_default_context() if self.tls else None,
            will=will,
            logger=logger,
        )


class MqttConnection(BrokerAccess):
    """A broker and the tags read from it. Credentials are named environment variables, never values."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    protocol: Literal["mqtt"]
    id: Identifier
    tenant: Identifier
    qos: Literal[0, 1, 2] = 1
    persistent_session: bool = False
    value_field: str = Field("value", min_length=1)
    quality_field: str = Field("quality", min_length=1)
    timestamp_field: str = Field("timestamp", min_length=1)
    refresh_s: float | None = Field(None, gt=0, description="with a deadband: report an unchanged value this often")
    comm_timeout_s: float = Field(5.0, gt=0, le=3600)
    status_topic: str | None = Field(None, min_length=1, max_length=1024)
    offline_payload: str = Field("offline", min_length=1, max_length=256)
    tags: list[MqttTag] = Field(min_length=1)

    @property
    def comm_timeout(self) -> float:
        return self.comm_timeout_s

    def stale_after(self, tag: PointTarget) -> float | None:
        """Only `stale_after_s`: many devices publish on change, so silence is not staleness by itself."""
        return tag.stale_after_s

    @model_validator(mode="after")
    def _persistent_session_needs_a_client_id(self) -> MqttConnection:
        if self.persistent_session and self.client_id is None:
            raise ValueError("persistent_session needs a fixed client_id")
        return self

    @property
    def wells(self) -> list[str]:
        """Every well this connection feeds, in first-seen order."""
        return list(dict.fromkeys(tag.well for tag in self.tags))

    def feeds(self) -> list[tuple[str, str]]:
        """Every (well, tag) this connection's tags feed, in the file's order: a tag fed twice is listed twice."""
        return [(tag.well, tag.tag) for tag in self.tags]


ROUTES_KEPT = 10_000  # topic names whose matching tags are remembered


class MqttAdapter(ReconnectingAdapter):
    """Subscribes to every tag's filter and turns each message into Readings, until cancelled.

    A message whose topic matches several filters yields one Reading per matching tag, submitted
    together. Connection failures are logged once per outage and retried with capped backoff;
    no aiomqtt or paho exception ever leaves `run()`.

    Args:
        connection: the validated connection.
        credentials: where `username_env` and `password_env` are looked up, at every connect.
    """

    # The client's keepalive is the liveness check: while it holds, the broker is alive.
    connected_is_alive = True

    def __init__(self, connection: MqttConnection, *, credentials: Mapping[str, str] | None = None) -> None:
        loop = ReconnectLoop("mqtt", connection.id, first_s=0.1, cap_s=5.0, logger=logger, credentials=credentials)
        source = Source(connection.tenant, "mqtt", connection.id)
        reporter = Reporter(source, connection.tags, connection.stale_after, connection.refresh_s)
        super().__init__(loop, reporter, connection.comm_timeout)
        self._connection = connection
        topics = [tag.topic for tag in connection.tags]
        if connection.status_topic is not None:
            topics.append(connection.status_topic)
        self._filters = list(dict.fromkeys(topics))
        # Topic name -> the tags it feeds, in the file's order. Matching a topic against every
        # filter (aiomqtt parses the filter each time) cost ~55 % of a core at 300 messages/s
        # with 1,000 tags (bench/mqttrate): a filter without a wildcard is looked up instead, only
        # the wildcard ones are matched, and the answer is kept per topic (cleared when full, so
        # a broker sending endless new topics cannot grow it).
        self._exact: dict[str, list[tuple[int, MqttTag]]] = {}
        self._wildcards: list[tuple[int, MqttTag]] = []
        for index, tag in enumerate(connection.tags):
            if "+" in tag.topic or "#" in tag.topic:
                self._wildcards.append((index, tag))
            else:
                self._exact.setdefault(tag.topic, []).append((index, tag))
        self._routes: dict[str, tuple[MqttTag, ...]] = {}

    async def run(self, sink: ReadingSink) -> None:
        await self._run_watched(sink, self._session, lambda client: self._serve(client, sink))

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[aiomqtt.Client]:
        # Around the yield too: the broker going away surfaces while messages are read, and on leaving.
        try:
            async with self._client() as client:
                await self._subscribe(client)
                logger.info("mqtt %s subscribed to %d filters", self.name, len(self._filters))
                yield client
        except aiomqtt.MqttError as exc:
            raise ConnectionLost(self.name, f"broker connection failed: {exc}") from exc

    async def _serve(self, client: aiomqtt.Client, sink: ReadingSink) -> None:
        async for message in client.messages:
            await self._handle(message.topic, message.payload, sink, retained=message.retain)

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        for topic_filter in self._filters:
            granted = await client.subscribe(topic_filter, qos=self._connection.qos)
            # A refused filter (e.g. by the broker's ACL) is not an error to paho; say so once per connect.
            if any(code >= 0x80 if isinstance(code, int) else code.is_failure for code in granted):
                logger.warning("mqtt %s: broker refused the subscription to %s", self.name, topic_filter)

    def _client(self) -> aiomqtt.Client:
        return self._connection.client(self._reconnect, clean_session=not self._connection.persistent_session)

    async def _handle(self, topic: aiomqtt.Topic, payload: object, sink: ReadingSink, retained: bool = False) -> None:
        self._reconnect.contact()
        if self._connection.status_topic is not None and topic.matches(self._connection.status_topic):
            await self._status(payload, sink)
        tags = self._routes.get(topic.value)
        if tags is None:
            tags = self._route(topic)
        if not tags:
            return
        try:
            readings = self.decode(tags, payload, retained=retained)
        except PayloadError as exc:
            logger.warning("mqtt %s: skipped a message on %s: %s", self.name, topic.value, exc.detail)
            return
        if readings:
            await sink.submit(readings)

    def _route(self, topic: aiomqtt.Topic) -> tuple[MqttTag, ...]:
        found = self._exact.get(topic.value, []) + [(i, t) for i, t in self._wildcards if topic.matches(t.topic)]
        if len(self._routes) >= ROUTES_KEPT:
            self._routes.clear()
        tags = self._routes[topic.value] = tuple(tag for _, tag in sorted(found, key=lambda pair: pair[0]))
        return tags

    async def _status(self, payload: object, sink: ReadingSink) -> None:
        """A device's own word (its last will, typically) that it is offline: every tag is BAD at once."""
        text = payload.decode("utf-8", "replace") if isinstance(payload, bytes | bytearray) else str(payload)
        if text.strip() == self._connection.offline_payload:
            readings = self._reporter.lost()
            logger.warning("mqtt %s: the device says it is offline: %d tags reported BAD", self.name, len(readings))
            if readings:
                await sink.submit(readings)

    def decode(self, tags: Sequence[MqttTag], payload: object, *, retained: bool = False) -> list[Reading]:
        """The readings that are news for `tags` from one payload (within a deadband: none);
        raises PayloadError if it is not usable.

        A retained message is the broker's copy of an older one: it keeps its own timestamp, and
        without one it is UNCERTAIN (reason `retained`) rather than stamped as if it were new.
        """
        try:
            return self._decode(tags, payload, retained)
        except _Unusable as exc:
            raise PayloadError(self.name, str(exc)) from None

    def _decode(self, tags: Sequence[MqttTag], payload: object, retained: bool) -> list[Reading]:
        if not isinstance(payload, bytes | bytearray | str):
            raise _Unusable(f"payload of type {type(payload).__name__}")
        value, quality, timestamp = _parse(
            bytes(payload) if not isinstance(payload, str) else payload, self._connection
        )
        reason: Reason | None = None
        if timestamp is None:
            timestamp = utc_now_iso()
            if retained and quality == "GOOD":
                quality, reason = "UNCERTAIN", "retained"
        now = time.monotonic()
        try:
            readings = [self._reporter.sample(tag, value, quality, timestamp, reason=reason, now=now) for tag in tags]
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'reading'}: {e['msg']}" for e in exc.errors())
            raise _Unusable(problems) from None
        return [reading for reading in readings if reading is not None]


def _parse(payload: bytes | str, c: MqttConnection) -> tuple[float | None, Quality, str | None]:
    """Value, quality and the payload's own timestamp (None: it has none)."""
    try:
        return float(payload), "GOOD", None
    except ValueError:
        pass
    try:
        document: object = json.loads(payload)
    except ValueError:
        raise _Unusable("neither a number nor JSON") from None
    if not isinstance(document, dict):
        raise _Unusable(f"JSON {type(document).__name__}, expected an object or a number")
    if c.value_field not in document:
        raise _Unusable(f"no {c.value_field!r} field")
    value = _value(document[c.value_field])
    quality = _quality(document.get(c.quality_field))
    timestamp = _timestamp(document.get(c.timestamp_field))
    return value, quality, timestamp


def _value(raw: object) -> float | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise _Unusable(f"value must be a number or null, not {type(raw).__name__}")
    try:
        return float(raw)
    except (ValueError, OverflowError):
        raise _Unusable("value is not a number") from None


def _quality(raw: object) -> Quality:
    if raw is None:
        return "GOOD"
    quality = _QUALITIES.get(raw.upper()) if isinstance(raw, str) else None
    if quality is None:
        raise _Unusable("quality must be GOOD, BAD or UNCERTAIN")
    return quality


def _timestamp(raw: object) -> str | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw  # Reading validates it: ISO-8601 with a zone
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise _Unusable("timestamp must be ISO-8601 or epoch seconds/milliseconds")
    seconds = raw / 1000 if abs(raw) >= _EPOCH_MILLIS_FROM else raw
    try:
        return datetime.fromtimestamp(seconds, UTC).isoformat()
    except (ValueError, OverflowError, OSError):
        raise _Unusable("timestamp out of range") from None
