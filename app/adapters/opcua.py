"""OPC-UA: one subscription on one server, each monitored node feeding one tag of one well.

Every data change becomes a Reading: the OPC-UA StatusCode maps to GOOD, UNCERTAIN or BAD
(a Bad value arrives as null and is reported as None), the SourceTimestamp is kept (else the
ServerTimestamp, else the time of arrival), then `scale`/`offset` are applied and a client-side
absolute deadband (app/adapters/deadband.py) drops small moves (asyncua's own server compares
consecutive samples, not the last reported value, so the deadband is not left to the server).
Without a deadband every notification is reported: the server already reports by exception. A
node the server refuses to monitor (an unknown NodeId, say) is logged and reported once as BAD;
the others carry on.

Reconnection is ours (app/adapters/reconnect.py), not asyncua's auto_reconnect: each attempt
opens a fresh Client, subscribes again, watches the session (asyncua's watchdog reports a lost
server through `status_change_notification`, and the client state is checked every `_CHECK_S`),
and backs off 0.1 s doubling to 5 s while the server is away. The first connect is retried the
same way. Credentials are looked up by name at each connect in the `credentials` mapping the
caller passes: the process environment is never read here.

Security: policy None (plain channel; a username/password then travel unencrypted), or
Basic256Sha256 with mode Sign or SignAndEncrypt, for which the client certificate, its private key
and the server's certificate (PEM or DER files) are all required and read at every connect. The
client certificate's subjectAltName URI should be the client application URI asyncua announces
(`urn:example.org:FreeOpcUa:opcua-asyncio`), else asyncua logs a warning. Trusting the client
certificate is the server's business. No other policy (Aes128/Aes256, Basic128Rsa15) is offered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Self

from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.node import Node
from asyncua.crypto import security_policies
from asyncua.ua.uaerrors import UaError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.adapters.base import PointTarget, ReadingSink
from app.adapters.deadband import ReportByException
from app.adapters.reconnect import ReconnectingAdapter, ReconnectLoop, describe
from app.errors import ConnectionLost
from app.models import Identifier, Quality, Reading, utc_now_iso

logger = logging.getLogger(__name__)

_CHECK_S = 0.5  # how often the client state is looked at between notifications
_TIMEOUT_S = 4.0  # per request
_WATCHDOG_S = 1.0  # asyncua reads the server state this often and reports a failure
_DISCONNECT_S = 2.0
_SESSION_TIMEOUT_MS = 600_000  # what asyncua servers grant; asking for more only logs a warning


class OpcuaNode(PointTarget):
    """One monitored variable, by NodeId string (`ns=2;s=Well1.TubingPressure`), and its tag.

    The value reported is `raw * scale + offset`; a change of at most `deadband` (in the scaled
    unit) since the last reported value is not reported, unless the quality changed.
    """

    node_id: str = Field(min_length=1, max_length=4096)

    @field_validator("node_id")
    @classmethod
    def _parses_as_a_node_id(cls, value: str) -> str:
        try:
            ua.NodeId.from_string(value)
        except Exception as exc:  # asyncua raises UaStringParsingError, ValueError or others
            raise ValueError(f"not an OPC-UA NodeId string such as 'ns=2;s=Well1.Pressure': {value!r}") from exc
        return value


class OpcuaConnection(BaseModel):
    """An OPC-UA server, how to secure the channel to it, and the nodes monitored on it.

    Credentials are named environment variables, never values. With `security_policy`
    Basic256Sha256 the three certificate/key files are required; `security_mode` applies only then.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    protocol: Literal["opcua"]
    id: Identifier
    tenant: Identifier
    endpoint: str = Field(pattern=r"^opc\.tcp://\S+$", max_length=1024)
    username_env: str | None = None
    password_env: str | None = None
    sampling_interval_ms: float = Field(250, ge=0, le=3_600_000)
    publishing_interval_ms: float = Field(250, ge=0, le=3_600_000)
    security_policy: Literal["None", "Basic256Sha256"] = "None"
    security_mode: Literal["Sign", "SignAndEncrypt"] = "SignAndEncrypt"
    certificate_file: Path | None = None
    private_key_file: Path | None = None
    server_certificate_file: Path | None = None
    nodes: list[OpcuaNode] = Field(min_length=1)

    @model_validator(mode="after")
    def _certificates_for_a_secure_policy(self) -> Self:
        if self.security_policy != "None":
            files = ("certificate_file", "private_key_file", "server_certificate_file")
            missing = [name for name in files if getattr(self, name) is None]
            if missing:
                raise ValueError(f"security_policy {self.security_policy} needs {', '.join(missing)}")
        return self

    @property
    def wells(self) -> list[str]:
        """Every well this connection feeds, in first-seen order."""
        return list(dict.fromkeys(node.well for node in self.nodes))


class _Handler:
    """asyncua's subscription handler: turns notifications into Readings for the sink."""

    def __init__(self, adapter: OpcuaAdapter, nodes: Mapping[str, OpcuaNode], sink: ReadingSink) -> None:
        self._adapter = adapter
        self._nodes = nodes  # by NodeId string as asyncua gives it back
        self._sink = sink
        self.lost = asyncio.Event()

    async def datachange_notification(self, node: Node, val: Any, data: Any) -> None:
        config = self._nodes.get(node.nodeid.to_string())
        if config is None:
            return
        try:
            reading = self._adapter.reading(config, val, data.monitored_item.Value)
            if reading is not None:
                await self._sink.submit([reading])
        except Exception:
            logger.exception("opcua %s: could not report a change of %s", self._adapter.name, config.node_id)

    def status_change_notification(self, status: Any) -> None:
        # asyncua calls this with a StatusChangeNotification when the server shuts down or its
        # watchdog finds the server unreachable; the session is not usable after it.
        code = getattr(status, "Status", status)
        logger.warning("opcua %s: server status changed to %s", self._adapter.name, getattr(code, "name", code))
        self.lost.set()


class OpcuaAdapter(ReconnectingAdapter):
    """Monitors every node of one connection and reports its changes, until cancelled.

    Connection failures are logged once per outage and retried with capped backoff; no asyncua
    exception ever leaves `run()`. `connected` and `errors` tell a health reporter how it goes:
    up and subscribed, and failed connects plus connections lost so far.

    Args:
        connection: the validated connection.
        credentials: where `username_env` and `password_env` are looked up, at every connect.
    """

    def __init__(self, connection: OpcuaConnection, *, credentials: Mapping[str, str] | None = None) -> None:
        loop = ReconnectLoop("opcua", connection.id, first_s=0.1, cap_s=5.0, logger=logger, credentials=credentials)
        super().__init__(loop)
        self._connection = connection
        # Normalized NodeId strings, so notifications find their node however the config spelled it.
        self._nodes = {ua.NodeId.from_string(node.node_id).to_string(): node for node in connection.nodes}
        self._filter = ReportByException()

    async def run(self, sink: ReadingSink) -> None:
        await self._reconnect.run(lambda: self._session(sink), self._watch)

    @contextlib.asynccontextmanager
    async def _session(self, sink: ReadingSink) -> AsyncIterator[tuple[Client, _Handler]]:
        client = self._client()
        try:
            with self._translated():
                await self._secure(client)
                await client.connect()
            logger.info("opcua %s connected to %s", self.name, self._connection.endpoint)
            handler = _Handler(self, self._nodes, sink)
            self._filter.forget()  # report every current value again after a reconnect
            with self._translated():
                await self._subscribe(client, handler, sink)
            yield client, handler
        finally:
            await self._disconnect(client)

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """The socket's and asyncua's failures become ConnectionLost: the failure the loop expects."""
        try:
            yield
        except (OSError, UaError) as exc:  # OSError covers TimeoutError and ConnectionError
            raise ConnectionLost(self.name, describe(exc)) from exc

    def _client(self) -> Client:
        c = self._connection
        client = Client(c.endpoint, timeout=_TIMEOUT_S, watchdog_intervall=_WATCHDOG_S)
        client.session_timeout = _SESSION_TIMEOUT_MS
        username, password = self._reconnect.secret(c.username_env), self._reconnect.secret(c.password_env)
        if username is not None:
            client.set_user(username)
        if password is not None:
            client.set_password(password)
        return client

    async def _secure(self, client: Client) -> None:
        c = self._connection
        if c.security_policy == "None":
            return
        if c.certificate_file is None or c.private_key_file is None or c.server_certificate_file is None:
            raise ValueError("certificate files missing")  # the model validator prevents this
        mode = ua.MessageSecurityMode.Sign if c.security_mode == "Sign" else ua.MessageSecurityMode.SignAndEncrypt
        await client.set_security(
            security_policies.SecurityPolicyBasic256Sha256,
            certificate=c.certificate_file,
            private_key=c.private_key_file,
            server_certificate=str(c.server_certificate_file),  # typed without Path, unlike the others
            mode=mode,
        )

    async def _subscribe(self, client: Client, handler: _Handler, sink: ReadingSink) -> None:
        c = self._connection
        subscription = await client.create_subscription(c.publishing_interval_ms, handler)
        node_ids = list(self._nodes)
        results = await subscription.subscribe_data_change(
            [client.get_node(node_id) for node_id in node_ids], sampling_interval=ua.Double(c.sampling_interval_ms)
        )
        refused: list[Reading] = []
        for node_id, result in zip(node_ids, results, strict=True):
            if isinstance(result, ua.StatusCode):
                config = self._nodes[node_id]
                logger.warning("opcua %s: cannot monitor %s: %s", self.name, config.node_id, result.name)
                refused.append(self._make(config, None, "BAD", utc_now_iso()))
        logger.info("opcua %s monitoring %d of %d nodes", self.name, len(node_ids) - len(refused), len(node_ids))
        if refused:
            await sink.submit(refused)

    async def _watch(self, session: tuple[Client, _Handler]) -> None:
        """Return never; raise ConnectionLost once the server is gone."""
        client, handler = session
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(handler.lost.wait(), _CHECK_S)
            if handler.lost.is_set():
                raise ConnectionLost(self.name, "the server stopped answering")
            with self._translated():
                await client.check_connection()  # raises ConnectionError once the client gave up

    async def _disconnect(self, client: Client) -> None:
        try:
            await asyncio.wait_for(client.disconnect(), _DISCONNECT_S)
        except Exception as exc:  # the server may already be gone
            logger.debug("opcua %s: disconnect: %s", self.name, describe(exc))
        finally:
            # asyncua closes the socket last: a disconnect cut short (its timeout, or the worker
            # stopping) would leave the server holding a half-open connection. Closing twice is a no-op.
            client.disconnect_socket()

    def reading(self, node: OpcuaNode, raw: object, data_value: ua.DataValue) -> Reading | None:
        """The Reading for one notification, or None if it is within the node's deadband."""
        status = data_value.StatusCode if data_value.StatusCode is not None else ua.StatusCode()
        quality: Quality = "GOOD" if status.is_good() else "UNCERTAIN" if status.is_uncertain() else "BAD"
        value = None if quality == "BAD" else _number(raw)
        if value is None:
            if quality != "BAD" and raw is not None:
                logger.warning("opcua %s: %s has a non-numeric value", self.name, node.node_id)
            quality = "BAD"
        else:
            value = value * node.scale + node.offset
        if not self._due(node, value, quality):
            return None
        return self._make(node, value, quality, _timestamp(data_value))

    def _due(self, node: OpcuaNode, value: float | None, quality: Quality) -> bool:
        return self._filter.due(node.node_id, value, quality, node.report_deadband, time.monotonic())

    def _make(self, node: OpcuaNode, value: float | None, quality: Quality, timestamp: str) -> Reading:
        return Reading(
            tenant_id=self._connection.tenant,
            well_id=node.well,
            tag_name=node.tag,
            value=value,
            quality=quality,
            timestamp=timestamp,
            source_protocol="opcua",
            connection_id=self._connection.id,
            unit=node.unit,
        )


def _number(raw: object) -> float | None:
    if isinstance(raw, bool):
        return 1.0 if raw else 0.0
    if isinstance(raw, int | float):
        try:
            return float(raw)
        except OverflowError:
            return None
    return None


def _timestamp(data_value: ua.DataValue) -> str:
    for moment in (data_value.SourceTimestamp, data_value.ServerTimestamp):
        if isinstance(moment, datetime):  # tz-aware UTC from asyncua; a naive one is taken as UTC
            return (moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)).isoformat()
    return utc_now_iso()
