"""OPC-UA: one subscription on one server, each monitored node feeding one tag of one well.

Every data change becomes a Reading: the OPC-UA StatusCode maps to GOOD, UNCERTAIN or BAD
and its name is kept as `statusCode` (GoodLocalOverride stays GOOD with reason `override`;
the Bad codes for a device the server cannot reach become `comm_failure`, BadOutOfRange
`out_of_range`, other Bad codes `device_error`; a Bad value is reported as None). The
SourceTimestamp is kept (else the ServerTimestamp, else the time of arrival), the value is
converted to engineering units (app/adapters/base.py) and a client-side absolute deadband
drops small moves (asyncua's own server compares consecutive samples, not the last reported
value, so the deadband is not left to the server). Without a deadband every notification is
reported: the server already reports by exception, so a steady value is silent and a node is
only ever stale with a `stale_after_s`. A node the server refuses to monitor (an unknown
NodeId, say) is logged and reported once as BAD; the others carry on. The server's state is
read every 0.5 s: its answers are the signs of life behind `comm_timeout_s`.

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
from collections.abc import AsyncIterator, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Self

from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.node import Node
from asyncua.crypto import security_policies
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.adapters.base import PointTarget, ReadingSink
from app.adapters.reconnect import ReconnectingAdapter, ReconnectLoop, describe
from app.adapters.reporter import STALE_FACTOR, Reporter, Source
from app.errors import ConnectionLost
from app.models import Identifier, Quality, Reading, Reason, utc_now_iso

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
    comm_timeout_s: float | None = Field(None, gt=0, le=3600)
    nodes: list[OpcuaNode] = Field(min_length=1)

    @property
    def comm_timeout(self) -> float:
        """`comm_timeout_s`, or three publishing intervals, at least 5 s (a reconnect and resubscribe)."""
        if self.comm_timeout_s is not None:
            return self.comm_timeout_s
        return max(5.0, STALE_FACTOR * self.publishing_interval_ms / 1000)

    def stale_after(self, node: PointTarget) -> float | None:
        """Only `stale_after_s`: a server reports by exception, so a steady value is silent, not stale."""
        return node.stale_after_s

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

    def feeds(self) -> list[tuple[str, str]]:
        """Every (well, tag) this connection's nodes feed, in the file's order: a tag fed twice is listed twice."""
        return [(node.well, node.tag) for node in self.nodes]


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
        reporter = Reporter(Source(connection.tenant, "opcua", connection.id), connection.nodes, connection.stale_after)
        super().__init__(loop, reporter, connection.comm_timeout)
        self._connection = connection
        # Normalized NodeId strings, so notifications find their node however the config spelled it.
        self._nodes = {ua.NodeId.from_string(node.node_id).to_string(): node for node in connection.nodes}

    async def run(self, sink: ReadingSink) -> None:
        await self._run_watched(sink, lambda: self._session(sink), self._watch)

    @contextlib.asynccontextmanager
    async def _session(self, sink: ReadingSink) -> AsyncIterator[tuple[Client, _Handler]]:
        client = self._client()
        try:
            with self._translated():
                await self._secure(client)
                await client.connect()
            logger.info("opcua %s connected to %s", self.name, self._connection.endpoint)
            handler = _Handler(self, self._nodes, sink)
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
                reading = self._reporter.sample(config, None, "BAD", utc_now_iso(), reason="device_error")
                refused.extend([reading] if reading is not None else [])
        logger.info("opcua %s monitoring %d of %d nodes", self.name, len(node_ids) - len(refused), len(node_ids))
        if refused:
            await sink.submit(refused)

    async def _watch(self, session: tuple[Client, _Handler]) -> None:
        """Return never; raise ConnectionLost once the server is gone.

        Every `_CHECK_S` the server's state is read: an answer is a sign of life (a frozen
        server stops giving them long before its session times out); a state other than
        Running, or no answer within the request timeout (or comm_timeout_s, when that is
        shorter: no answer for that long is a lost server by definition), is a lost server.
        """
        client, handler = session
        state = client.get_node(ObjectIds.Server_ServerStatus_State)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(handler.lost.wait(), _CHECK_S)
            if handler.lost.is_set():
                raise ConnectionLost(self.name, "the server stopped answering")
            with self._translated():
                await client.check_connection()  # raises ConnectionError once the client gave up
                running = await asyncio.wait_for(state.read_value(), min(_TIMEOUT_S, self._comm_timeout_s))
            if running != ua.ServerState.Running:
                raise ConnectionLost(self.name, f"the server is in state {getattr(running, 'name', running)}")
            self._reconnect.contact()

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
        self._reconnect.contact()
        status = data_value.StatusCode if data_value.StatusCode is not None else ua.StatusCode()
        quality, reason, name = _status(status)
        value = None if quality == "BAD" else _number(raw)
        if value is None and quality != "BAD" and raw is not None:
            logger.warning("opcua %s: %s has a non-numeric value", self.name, node.node_id)
        return self._reporter.sample(node, value, quality, _timestamp(data_value), reason=reason, status_code=name)


# Bad codes that say the server cannot reach the device: the same verdict as losing the server.
_COMM_FAILURES = frozenset(
    {
        StatusCodes.BadCommunicationError,
        StatusCodes.BadNoCommunication,
        StatusCodes.BadNotConnected,
        StatusCodes.BadServerNotConnected,
        StatusCodes.UncertainNoCommunicationLastUsableValue,
    }
)
_OUT_OF_RANGE = frozenset({StatusCodes.BadOutOfRange})


def _status(status: ua.StatusCode) -> tuple[Quality, Reason | None, str | None]:
    """Quality, reason and the status code's name (None for plain Good) of an OPC-UA status.

    The low 16 bits are info bits (overflow, limits); the code itself is the high 16.
    """
    code = status.value & 0xFFFF0000
    named = ua.StatusCode(ua.UInt32(code))
    name = None if code == StatusCodes.Good else named.name
    if named.is_good():
        return "GOOD", "override" if code == StatusCodes.GoodLocalOverride else None, name
    if code in _COMM_FAILURES:
        return ("UNCERTAIN" if named.is_uncertain() else "BAD"), "comm_failure", name
    if named.is_uncertain():
        return "UNCERTAIN", None, name
    return "BAD", "out_of_range" if code in _OUT_OF_RANGE else "device_error", name


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
