"""Modbus RTU: over a serial line (a socat pseudo-terminal pair, a pymodbus ModbusSerialServer at its
far end) and over TCP (a pymodbus ModbusTcpServer with the RTU framer), several unit ids behind one
connection, the pause between requests, and the transport's settings."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import ValidationError
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.server.base import ModbusBaseServer
from pymodbus.simulator import SimDevice

from app.adapters.modbus import ModbusAdapter, ModbusConnection
from tests.adapters import sinks
from tests.adapters.test_modbus_blocks import CountingDevices, first_scan, holding, serving, values
from tests.conftest import wait_until

pytestmark = pytest.mark.anyio


class PtyPair:
    """Two linked pseudo-terminals from socat: what is written to `client` is read at `server`, and back."""

    def __init__(self, folder: Path) -> None:
        self.client, self.server = folder / "a", folder / "b"
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        links = [f"pty,raw,echo=0,link={link}" for link in (self.client, self.server)]
        self._process = await asyncio.create_subprocess_exec(
            "socat", "-d", "-d", *links, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        await wait_until(lambda: self.client.exists() and self.server.exists())

    async def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            await self._process.wait()
            self._process = None


class RtuDevices(CountingDevices):
    """CountingDevices speaking RTU: at the far end of `pty` when given, else over TCP on `port`.

    `busy` holds each read's (started, answered) times on the server's monotonic clock.
    """

    def __init__(self, units: tuple[int, ...] = (1,), pty: PtyPair | None = None) -> None:
        super().__init__(units)
        self.pty = pty
        self.busy: list[tuple[float, float]] = []
        self._rtu_server: ModbusBaseServer | None = None

    def _device(self, unit: int) -> SimDevice:
        device = super()._device(unit)
        counting = device.action
        assert counting is not None

        async def action(*args: Any) -> None:
            started = time.monotonic()
            await counting(*args)
            self.busy.append((started, time.monotonic()))

        return dataclasses.replace(device, action=action)

    async def start(self) -> None:
        devices = [self._device(unit) for unit in self.holding]
        if self.pty is None:
            self._rtu_server = ModbusTcpServer(devices, framer=FramerType.RTU, address=("127.0.0.1", self.port))
        else:
            self._rtu_server = ModbusSerialServer(devices, framer=FramerType.RTU, port=str(self.pty.server))
        await self._rtu_server.serve_forever(background=True)

    async def stop(self) -> None:
        if self._rtu_server is not None:
            await self._rtu_server.shutdown()  # type: ignore[no-untyped-call]
            self._rtu_server = None


@pytest.fixture
async def pty(tmp_path: Path) -> AsyncIterator[PtyPair]:
    pair = PtyPair(tmp_path)
    with anyio.fail_after(5):
        await pair.start()
    yield pair
    await pair.stop()


def rtu_connection(
    devices: RtuDevices, *groups: list[dict[str, Any]], interval_s: float = 10, **extra: Any
) -> ModbusConnection:
    """A connection to `devices` over their transport; each group a list of points."""
    if devices.pty is None:
        where: dict[str, Any] = {"transport": "rtu-over-tcp", "host": "127.0.0.1", "port": devices.port}
    else:
        where = {"transport": "serial", "serial_port": str(devices.pty.client)}
    fields = {"protocol": "modbus", "id": "rtu1", "tenant": "acme", **where}
    listed = [{"interval_s": interval_s, "points": [{"well": "w1", **point} for point in points]} for points in groups]
    return ModbusConnection.model_validate({**fields, "groups": listed, **extra})


async def test_a_serial_line_reads_blocks_of_two_unit_ids(pty: PtyPair) -> None:
    with anyio.fail_after(15):
        devices = RtuDevices(units=(1, 2), pty=pty)
        devices.holding[1][:3] = [11, 12, 13]
        devices.holding[2][7] = 27
        async with serving(devices):
            points = [holding(0, "a"), holding(1, "b"), holding(2, "c"), holding(7, "d", unit_id=2)]
            sink = await first_scan(rtu_connection(devices, points))
        assert values(sink) == {"a": 11.0, "b": 12.0, "c": 13.0, "d": 27.0}
        assert devices.scan_reads() == [(1, "holding", 0, 3), (2, "holding", 7, 1)]


async def test_rtu_over_tcp_reads_blocks_of_two_unit_ids() -> None:
    with anyio.fail_after(15):
        devices = RtuDevices(units=(1, 2))
        devices.holding[1][:2] = [101, 102]
        devices.holding[2][:2] = [201, 202]
        await devices.start()
        try:
            points = [holding(0, "a"), holding(1, "b"), holding(0, "c", unit_id=2), holding(1, "d", unit_id=2)]
            sink = await first_scan(rtu_connection(devices, points))
        finally:
            await devices.stop()
        assert values(sink) == {"a": 101.0, "b": 102.0, "c": 201.0, "d": 202.0}
        assert devices.scan_reads() == [(1, "holding", 0, 2), (2, "holding", 0, 2)]


async def test_requests_of_all_groups_are_spaced_by_inter_request_delay_s() -> None:
    with anyio.fail_after(15):
        devices = RtuDevices(units=(1, 2))
        await devices.start()
        try:
            # two groups polling as fast as they may, three requests a scan between them
            groups = [[holding(0, "a"), holding(50, "b")], [holding(0, "c", unit_id=2)]]
            conn = rtu_connection(devices, *groups, interval_s=0.01, max_gap=0, inter_request_delay_s=0.1)
            async with sinks.running(ModbusAdapter(conn)):
                await wait_until(lambda: len(devices.busy) >= 8)
        finally:
            await devices.stop()
        starts = sorted(started for started, _ in devices.busy)
        gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
        assert min(gaps) >= 0.1 * 0.9, gaps


async def test_requests_of_concurrent_groups_never_overlap_on_the_wire() -> None:
    # RTU answers carry no transaction id: an overlap would hand one group another's registers.
    # pymodbus 3.16 also locks each request, so this guards the property, not only our Line.
    with anyio.fail_after(15):
        devices = RtuDevices(units=(1, 2))
        devices.delay_s = 0.02  # each answer takes a while: a second request would arrive during it
        await devices.start()
        try:
            groups = [[holding(0, "a")], [holding(10, "b")], [holding(0, "c", unit_id=2)]]
            async with sinks.running(ModbusAdapter(rtu_connection(devices, *groups, interval_s=0.01))):
                await wait_until(lambda: len(devices.busy) >= 12)
        finally:
            await devices.stop()
        spans = sorted(devices.busy)
        assert all(answered <= next_started for (_, answered), (next_started, _) in itertools.pairwise(spans))


async def test_a_serial_device_that_goes_away_is_bad_comm_failure_and_is_reconnected(pty: PtyPair) -> None:
    with anyio.fail_after(15):
        devices = RtuDevices(pty=pty)
        devices.holding[1][0] = 1
        async with serving(devices):
            conn = rtu_connection(devices, [holding(0, "t")], interval_s=0.05, timeout_s=0.2, comm_timeout_s=0.5)
            async with sinks.running(ModbusAdapter(conn)) as sink:
                await sink.wait_for("t", 1.0)
                await devices.stop()
                await pty.stop()  # the converter unplugged: the port itself is gone
                await sink.wait_for("t", None, "BAD", reason="comm_failure")
                devices.holding[1][0] = 2
                await pty.start()
                await devices.start()
                await sink.wait_for("t", 2.0)


async def test_a_silent_serial_device_is_bad_comm_failure_and_is_read_again(pty: PtyPair) -> None:
    with anyio.fail_after(15):
        devices = RtuDevices(pty=pty)
        async with serving(devices):
            conn = rtu_connection(devices, [holding(0, "t")], interval_s=0.05, timeout_s=0.2, comm_timeout_s=0.5)
            async with sinks.running(ModbusAdapter(conn)) as sink:
                await sink.wait_for("t", 0.0)
                await devices.stop()  # the port stays, nothing answers on it
                await sink.wait_for("t", None, "BAD", reason="comm_failure")
                devices.holding[1][0] = 3
                await devices.start()
                await sink.wait_for("t", 3.0)


POINT = {"table": "holding", "address": 0, "well": "w", "tag": "t"}
BASE = {"protocol": "modbus", "id": "mb", "tenant": "acme", "groups": [{"interval_s": 1, "points": [POINT]}]}
SERIAL = {"transport": "serial", "serial_port": "/dev/ttyUSB0"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"transport": "serial"}, "serial_port is required for transport 'serial'"),
        (SERIAL | {"host": "plc"}, "host does not apply to transport 'serial'"),
        (SERIAL | {"port": 502}, "port does not apply to transport 'serial'"),
        ({"host": "plc", "serial_port": "/dev/ttyUSB0"}, "serial_port does not apply to transport 'tcp'"),
        ({"host": "plc", "baudrate": 19200}, "baudrate does not apply to transport 'tcp'"),
        ({"transport": "rtu-over-tcp", "host": "gw", "parity": "E"}, "parity does not apply to transport 'rtu-ov"),
        ({"transport": "rtu-over-tcp"}, "host is required for transport 'rtu-over-tcp'"),
        ({}, "host is required for transport 'tcp'"),
        ({"host": "plc", "transport": "udp"}, "'tcp', 'rtu-over-tcp' or 'serial'"),
        (SERIAL | {"parity": "X"}, "'N', 'E' or 'O'"),
        (SERIAL | {"stopbits": 3}, "Input should be 1 or 2"),
        (SERIAL | {"bytesize": 7}, "Input should be 8"),
        (SERIAL | {"baudrate": 0}, "greater than or equal to 50"),
        (SERIAL | {"serial_port": ""}, "at least 1 character"),
        ({"host": "plc", "inter_request_delay_s": -1}, "greater than or equal to 0"),
    ],
)
def test_transport_settings_are_validated(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModbusConnection.model_validate(BASE | fields)


def test_each_transport_has_its_defaults_and_a_dump_validates_again() -> None:
    tcp = ModbusConnection.model_validate(BASE | {"host": "plc"})
    serial = ModbusConnection.model_validate(BASE | SERIAL)
    fast = ModbusConnection.model_validate(BASE | SERIAL | {"baudrate": 38400, "parity": "E", "stopbits": 2})
    assert (tcp.transport, tcp.port, tcp.baudrate, tcp.request_gap_s) == ("tcp", 502, None, 0.0)
    assert (serial.host, serial.port, serial.baudrate, serial.bytesize, serial.parity, serial.stopbits) == (
        None,
        None,
        9600,
        8,
        "N",
        1,
    )
    assert serial.request_gap_s == pytest.approx(3.5 * 11 / 9600)  # the RTU silent interval: 4 ms at 9600
    assert fast.request_gap_s == 0.00175  # fixed by the spec above 19200 baud
    assert ModbusConnection.model_validate(BASE | SERIAL | {"inter_request_delay_s": 0}).request_gap_s == 0
    for parsed in (tcp, serial, fast):
        assert ModbusConnection.model_validate(parsed.model_dump()) == parsed
