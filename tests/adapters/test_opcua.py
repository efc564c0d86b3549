"""OpcuaAdapter against a real asyncua Server in-process on loopback, with a real collecting sink."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from asyncua import ua
from asyncua.common.node import Node
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from asyncua.server.server import Server
from asyncua.ua.status_codes import StatusCodes
from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier
from pydantic import ValidationError

from app.adapters.opcua import OpcuaAdapter, OpcuaConnection
from tests.adapters import sinks
from tests.adapters.sinks import CollectingSink
from tests.conftest import free_port, wait_until

pytestmark = pytest.mark.anyio

NAMESPACE = "urn:wellstream:test"
VARIABLES = ("TubingPressure", "CasingPressure", "Temperature", "Flow", "Level")


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"  # module scope, so one OPC-UA server (about 1-3 s to init) serves the whole module


class Plc:
    """An asyncua Server on a fixed loopback port with Double variables ns=<idx>;s=Well1.<name>."""

    def __init__(self, port: int, certificate: tuple[Path, Path] | None = None) -> None:
        self.port = port
        self.endpoint = f"opc.tcp://127.0.0.1:{port}/wellstream/"
        self.server = Server()
        self.vars: dict[str, Node] = {}
        self.idx = 0
        self.certificate = certificate  # (certificate, key): then only Basic256Sha256 SignAndEncrypt

    async def init(self) -> None:
        await self.server.init()
        self.server.set_endpoint(self.endpoint)
        if self.certificate is None:
            self.server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        else:
            self.server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
            await self.server.load_certificate(self.certificate[0])
            await self.server.load_private_key(self.certificate[1])
        self.idx = await self.server.register_namespace(NAMESPACE)
        well = await self.server.nodes.objects.add_object(
            ua.NodeId(ua.String("Well1"), ua.Int16(self.idx)), ua.QualifiedName("Well1", self.idx)
        )
        for name in VARIABLES:
            self.vars[name] = await well.add_variable(
                ua.NodeId(ua.String(f"Well1.{name}"), ua.Int16(self.idx)),
                ua.QualifiedName(name, self.idx),
                0.0,
                varianttype=ua.VariantType.Double,
            )

    def node_id(self, name: str) -> str:
        return f"ns={self.idx};s=Well1.{name}"

    async def write(
        self, name: str, value: float | None, status: int = StatusCodes.Good, source: datetime | None = None
    ) -> None:
        await self.vars[name].write_value(
            ua.DataValue(
                ua.Variant(value, ua.VariantType.Double),
                StatusCode=ua.StatusCode(ua.UInt32(status)),
                SourceTimestamp=source or datetime.now(UTC),  # type: ignore[arg-type]  # ua.DateTime is a datetime
            )
        )


@pytest.fixture(scope="module")
async def plc() -> AsyncIterator[Plc]:
    plc = Plc(free_port())
    await plc.init()
    await plc.server.start()
    yield plc
    await plc.server.stop()


def connection(plc: Plc, *nodes: dict[str, Any], **extra: Any) -> OpcuaConnection:
    fields: dict[str, Any] = {"protocol": "opcua", "id": "ua1", "tenant": "acme", "endpoint": plc.endpoint}
    fields |= {"sampling_interval_ms": 0, "publishing_interval_ms": 50}
    return OpcuaConnection.model_validate({**fields, "nodes": [{"well": "w1", **node} for node in nodes], **extra})


@contextlib.asynccontextmanager
async def running_adapter(conn: OpcuaConnection, **kwargs: Any) -> AsyncIterator[tuple[OpcuaAdapter, CollectingSink]]:
    """The adapter running as a task (see sinks.running); it is disconnected once cancelled."""
    adapter = OpcuaAdapter(conn, **kwargs)
    async with sinks.running(adapter) as sink:
        yield adapter, sink
    assert not adapter.connected


@contextlib.asynccontextmanager
async def running(conn: OpcuaConnection, **kwargs: Any) -> AsyncIterator[CollectingSink]:
    async with running_adapter(conn, **kwargs) as (_, sink):
        yield sink


async def test_values_quality_and_source_timestamps(plc: Plc) -> None:
    with anyio.fail_after(20):
        stamp = datetime(2026, 3, 1, 12, 30, 15, 250000, tzinfo=UTC)
        await plc.write("TubingPressure", 1500.5, source=stamp)
        conn = connection(plc, {"node_id": plc.node_id("TubingPressure"), "tag": "tubing", "unit": "psi"})
        async with running(conn) as sink:
            first = await sink.wait_for("tubing", 1500.5)
            assert first.timestamp == "2026-03-01T12:30:15.250000Z"
            assert (first.unit, first.source_protocol, first.connection_id) == ("psi", "opcua", "ua1")
            assert (first.tenant_id, first.well_id) == ("acme", "w1")
            await plc.write("TubingPressure", 1490.0, StatusCodes.UncertainLastUsableValue)
            await sink.wait_for("tubing", 1490.0, "UNCERTAIN")
            await plc.write("TubingPressure", 1480.0, StatusCodes.BadSensorFailure)
            await sink.wait_for("tubing", None, "BAD")
            await plc.write("TubingPressure", 1470.0)
            await sink.wait_for("tubing", 1470.0)


async def test_scale_and_offset(plc: Plc) -> None:
    with anyio.fail_after(20):
        await plc.write("Temperature", 100.0)
        conn = connection(plc, {"node_id": plc.node_id("Temperature"), "tag": "temp", "scale": 1.8, "offset": 32.0})
        async with running(conn) as sink:
            await sink.wait_for("temp", 212.0)
            await plc.write("Temperature", 0.0)
            await sink.wait_for("temp", 32.0)


async def test_deadband_suppresses_small_changes(plc: Plc) -> None:
    with anyio.fail_after(20):
        await plc.write("Flow", 10.0)
        await plc.write("Level", 0.0)
        conn = connection(
            plc,
            {"node_id": plc.node_id("Flow"), "tag": "flow", "deadband": 1.0},
            {"node_id": plc.node_id("Level"), "tag": "marker"},
        )
        async with running(conn) as sink:
            await sink.wait_for("flow", 10.0)
            await sink.wait_for("marker", 0.0)
            for n, value in enumerate((10.4, 10.8, 11.0, 9.2), start=1):  # all within 1.0 of the last reported 10.0
                await plc.write("Flow", value)
                # Written after the value, so notified in the same publish or a later one, and handled
                # after it: once the marker is in, the value was seen (and dropped), not merely late.
                await plc.write("Level", float(n))
                await sink.wait_for("marker", float(n))
            await plc.write("Flow", 11.5)
            await sink.wait_for("flow", 11.5)
            await plc.write("Flow", 11.5, StatusCodes.UncertainLastUsableValue)  # quality change: reported
            await sink.wait_for("flow", 11.5, "UNCERTAIN")
        assert [(r.value, r.quality) for r in sink.of("flow")] == [(10.0, "GOOD"), (11.5, "GOOD"), (11.5, "UNCERTAIN")]


async def test_unknown_node_is_bad_for_that_tag_only(plc: Plc) -> None:
    with anyio.fail_after(20):
        await plc.write("Level", 3.25)
        conn = connection(
            plc,
            {"node_id": plc.node_id("Level"), "tag": "level"},
            {"node_id": f"ns={plc.idx};s=Well1.NoSuchTag", "tag": "missing"},
        )
        async with running(conn) as sink:
            await sink.wait_for("level", 3.25)
            await sink.wait_for("missing", None, "BAD")
            await plc.write("Level", 3.5)
            await sink.wait_for("level", 3.5)
        assert len(sink.of("missing")) == 1


async def test_server_restart_is_survived() -> None:
    with anyio.fail_after(20):
        first = Plc(free_port())
        await first.init()
        await first.server.start()
        second = Plc(first.port)
        try:
            await first.write("CasingPressure", 1.0)
            conn = connection(first, {"node_id": first.node_id("CasingPressure"), "tag": "casing"})
            async with running_adapter(conn) as (adapter, sink):
                await sink.wait_for("casing", 1.0)
                assert (adapter.connected, adapter.errors) == (True, 0)
                await second.init()  # before the stop, so the outage is short; binds the port only on start
                await first.server.stop()
                await second.server.start()
                await second.write("CasingPressure", 2.0)
                await sink.wait_for("casing", 2.0)
                await second.write("CasingPressure", 3.0)
                await sink.wait_for("casing", 3.0)
                assert adapter.errors >= 1  # the lost connection at least
                await wait_until(lambda: adapter.connected)
        finally:
            with contextlib.suppress(Exception):
                await first.server.stop()
            with contextlib.suppress(Exception):
                await second.server.stop()


async def test_a_server_that_is_not_up_yet_is_waited_for() -> None:
    with anyio.fail_after(20):
        late = Plc(free_port())
        await late.init()  # does not bind the port yet
        try:
            conn = connection(late, {"node_id": late.node_id("Level"), "tag": "level"})
            async with running_adapter(conn) as (adapter, sink):
                await wait_until(lambda: adapter.errors >= 1)  # refused, and retried
                assert sink.batches == []
                assert not adapter.connected
                await late.server.start()
                await late.write("Level", 7.0)
                await sink.wait_for("level", 7.0)
                assert adapter.connected
        finally:
            await late.server.stop()


async def make_certificate(directory: Path, name: str, uri: str, use: ObjectIdentifier) -> tuple[Path, Path]:
    """A self-signed certificate (DER) and its key (PEM), with `uri` as subjectAltName URI."""
    cert, key = directory / f"{name}.der", directory / f"{name}.pem"
    await setup_self_signed_certificate(key, cert, uri, socket.gethostname(), [use], {"commonName": name})
    return cert, key


async def test_basic256sha256_sign_and_encrypt(tmp_path: Path) -> None:
    with anyio.fail_after(20):
        server_cert = await make_certificate(
            tmp_path, "server", "urn:freeopcua:python:server", ExtendedKeyUsageOID.SERVER_AUTH
        )
        client_cert, client_key = await make_certificate(
            tmp_path, "client", "urn:example.org:FreeOpcUa:opcua-asyncio", ExtendedKeyUsageOID.CLIENT_AUTH
        )
        secure = Plc(free_port(), certificate=server_cert)
        await secure.init()
        await secure.server.start()
        try:
            await secure.write("Level", 42.0)
            node = {"node_id": secure.node_id("Level"), "tag": "level"}
            conn = connection(
                secure,
                node,
                security_policy="Basic256Sha256",
                certificate_file=str(client_cert),
                private_key_file=str(client_key),
                server_certificate_file=str(server_cert[0]),
            )
            assert conn.security_mode == "SignAndEncrypt"
            async with running_adapter(conn) as (adapter, sink):
                await sink.wait_for("level", 42.0)
                assert (adapter.connected, adapter.errors) == (True, 0)
                await secure.write("Level", 43.5)
                await sink.wait_for("level", 43.5)

            async with running_adapter(connection(secure, node)) as (plain, refused):
                # Policy None is not offered: every attempt fails. An attempt is counted once its
                # connection is closed, so the adapter is asleep in its backoff when cancelled here
                # (cancelled mid-attempt, asyncua can leave a connection the server's stop waits 20 s for).
                await wait_until(lambda: plain.errors >= 2)
                assert refused.batches == []
                assert not plain.connected
        finally:
            await secure.server.stop()


@pytest.mark.parametrize(
    "change",
    [
        {"extra": 1},
        {"nodes": []},
        {"endpoint": "http://plc:4840"},
        {"nodes": [{"node_id": "ns=2;x=oops", "well": "w", "tag": "t"}]},
        {"nodes": [{"node_id": "ns=2;s=A", "well": "w", "tag": "t*"}]},
        {"nodes": [{"node_id": "ns=2;s=A", "well": "w", "tag": "t", "deadband": -1}]},
        {"security_policy": "Basic256"},
        {"security_mode": "None"},
        {"security_policy": "Basic256Sha256"},
        {"security_policy": "Basic256Sha256", "certificate_file": "c.der", "private_key_file": "k.pem"},
    ],
)
def test_connection_config_is_validated(change: dict[str, Any]) -> None:
    valid = {
        "protocol": "opcua",
        "id": "ua",
        "tenant": "acme",
        "endpoint": "opc.tcp://plc:4840",
        "nodes": [{"node_id": "ns=2;s=Well1.TubingPressure", "well": "w1", "tag": "t"}],
    }
    parsed = OpcuaConnection.model_validate(valid)
    assert (parsed.sampling_interval_ms, parsed.publishing_interval_ms, parsed.wells) == (250, 250, ["w1"])
    with pytest.raises(ValidationError):
        OpcuaConnection.model_validate(valid | change)


def test_a_secure_policy_names_the_missing_files() -> None:
    fields = {
        "protocol": "opcua",
        "id": "ua",
        "tenant": "acme",
        "endpoint": "opc.tcp://plc:4840",
        "nodes": [{"node_id": "ns=2;s=A", "well": "w1", "tag": "t"}],
        "security_policy": "Basic256Sha256",
        "certificate_file": "client.der",
    }
    with pytest.raises(ValidationError, match="needs private_key_file, server_certificate_file"):
        OpcuaConnection.model_validate(fields)
    parsed = OpcuaConnection.model_validate(
        fields | {"private_key_file": "client.pem", "server_certificate_file": "server.der", "security_mode": "Sign"}
    )
    assert (parsed.security_mode, parsed.server_certificate_file) == ("Sign", Path("server.der"))


async def test_status_codes_are_kept_and_an_override_stays_good_with_its_reason(plc: Plc) -> None:
    with anyio.fail_after(20):
        await plc.write("TubingPressure", 1500.0)
        conn = connection(plc, {"node_id": plc.node_id("TubingPressure"), "tag": "tubing"})
        async with running(conn) as sink:
            plain = await sink.wait_for("tubing", 1500.0)
            assert (plain.reason, plain.status_code) == (None, None)
            await plc.write("TubingPressure", 1501.0, StatusCodes.GoodLocalOverride)
            overridden = await sink.wait_for("tubing", 1501.0)
            assert (overridden.reason, overridden.status_code) == ("override", "GoodLocalOverride")
            await plc.write("TubingPressure", 1502.0, StatusCodes.BadSensorFailure)
            failed = await sink.wait_for("tubing", None, "BAD")
            assert (failed.reason, failed.status_code) == ("device_error", "BadSensorFailure")
            await plc.write("TubingPressure", 1503.0, StatusCodes.BadNoCommunication)
            unreachable = await sink.wait_for("tubing", None, "BAD", reason="comm_failure")
            assert (unreachable.reason, unreachable.status_code) == ("comm_failure", "BadNoCommunication")
            await plc.write("TubingPressure", 1504.0, StatusCodes.UncertainLastUsableValue)
            uncertain = await sink.wait_for("tubing", 1504.0, "UNCERTAIN")
            assert (uncertain.reason, uncertain.status_code) == (None, "UncertainLastUsableValue")
