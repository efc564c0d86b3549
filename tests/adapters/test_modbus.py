"""ModbusAdapter against a real pymodbus ModbusTcpServer on loopback, with a real collecting sink."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import pytest
from pydantic import ValidationError
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from app.adapters.modbus import ModbusAdapter, ModbusConnection, ModbusPoint, decode
from tests.adapters import sinks
from tests.adapters.sinks import CollectingSink
from tests.conftest import free_port, wait_until

pytestmark = pytest.mark.anyio

UNIT_ID = 1
HOLDING_SIZE = 100
WRITE_REGISTERS = 16  # function code
WRITE_COILS = 15


class Device:
    """A ModbusTcpServer on a fixed loopback port: holding registers 0-99, input 0-9, coils 0-15.

    Keeps its register values across a stop/start, like a device that reboots.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.holding = [0] * HOLDING_SIZE
        self.inputs = [0] * 10
        self.coils = [False] * 16
        self._server: ModbusTcpServer | None = None

    async def start(self) -> None:
        simdata = (
            [SimData(address=0, values=list(self.coils), datatype=DataType.BITS)],
            [SimData(address=0, values=[False] * 16, datatype=DataType.BITS)],
            [SimData(address=0, values=list(self.holding), datatype=DataType.REGISTERS)],
            [SimData(address=0, values=list(self.inputs), datatype=DataType.REGISTERS)],
        )
        self._server = ModbusTcpServer(SimDevice(id=UNIT_ID, simdata=simdata), address=("127.0.0.1", self.port))
        await self._server.serve_forever(background=True)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]
            self._server = None

    async def write(self, address: int, registers: Sequence[int]) -> None:
        self.holding[address : address + len(registers)] = registers
        if self._server is not None:
            await self._server.async_setValues(UNIT_ID, WRITE_REGISTERS, address, list(registers))

    async def write_coil(self, address: int, value: bool) -> None:
        self.coils[address] = value
        if self._server is not None:
            await self._server.async_setValues(UNIT_ID, WRITE_COILS, address, [value])


@pytest.fixture
async def device() -> AsyncIterator[Device]:
    device = Device()
    await device.start()
    yield device
    await device.stop()


def connection(device: Device, *points: dict[str, Any], interval_s: float = 0.05, **extra: Any) -> ModbusConnection:
    groups = [{"interval_s": interval_s, "points": [{"well": "w1", **point} for point in points]}]
    fields = {"protocol": "modbus", "id": "mb1", "tenant": "acme", "host": "127.0.0.1", "port": device.port}
    return ModbusConnection.model_validate({**fields, "groups": groups, **extra})


def running(conn: ModbusConnection) -> contextlib.AbstractAsyncContextManager[CollectingSink]:
    return sinks.running(ModbusAdapter(conn))


def registers(fmt: str, value: float, word_order: str = "big", byte_order: str = "big") -> list[int]:
    """What a device holds for `value`: big-endian words, then reordered as the device would."""
    raw = struct.pack(">" + fmt, value)
    words = [int.from_bytes(raw[i : i + 2], "big" if byte_order == "big" else "little") for i in range(0, len(raw), 2)]
    return words if word_order == "big" else words[::-1]


# (type, struct format, value) for every data type; floats chosen to be exact in their width
TYPES = [
    ("int16", "h", -1234),
    ("uint16", "H", 54321),
    ("int32", "i", -123456),
    ("uint32", "I", 3_000_000_000),
    ("float32", "f", 123.375),
    ("float64", "d", -98765.4321),
]


def test_decode_known_register_images() -> None:
    """Fixed images from a device manual, independent of struct packing in the test."""

    def point(type_: str, word_order: str = "big", byte_order: str = "big") -> ModbusPoint:
        return ModbusPoint.model_validate(
            {"table": "holding", "address": 0, "type": type_, "word_order": word_order, "byte_order": byte_order}
            | {"well": "w1", "tag": "t"}
        )

    assert decode([0xFB2E], point("int16")) == -1234
    assert decode([0xFFFE, 0x1DC0], point("int32")) == -123456
    assert decode([0x1DC0, 0xFFFE], point("int32", "little")) == -123456
    assert decode([0x42F6, 0xC000], point("float32")) == 123.375  # ABCD
    assert decode([0xC000, 0x42F6], point("float32", "little")) == 123.375  # CDAB
    assert decode([0xF642, 0x00C0], point("float32", "big", "little")) == 123.375  # BADC
    assert decode([0x00C0, 0xF642], point("float32", "little", "little")) == 123.375  # DCBA


async def test_every_type_in_both_word_orders_decodes(device: Device) -> None:
    with anyio.fail_after(15):
        points: list[dict[str, Any]] = []
        expected: dict[str, float] = {}
        address = 0
        for type_, fmt, value in TYPES:
            for word_order in ("big", "little"):
                for byte_order in ("big", "little"):
                    regs = registers(fmt, value, word_order, byte_order)
                    await device.write(address, regs)
                    tag = f"{type_}_{word_order}_{byte_order}"
                    point = {"table": "holding", "address": address, "type": type_, "tag": tag}
                    points.append(point | {"word_order": word_order, "byte_order": byte_order})
                    expected[tag] = float(value)
                    address += len(regs)
        async with running(connection(device, *points)) as sink:
            await wait_until(lambda: len(sink.batches) >= 1)
            first = sink.batches[0]
        assert {reading.tag_name: reading.value for reading in first} == expected
        assert all(reading.quality == "GOOD" for reading in first)
        assert {(r.source_protocol, r.connection_id, r.tenant_id, r.well_id) for r in first} == {
            ("modbus", "mb1", "acme", "w1")
        }


async def test_input_registers_coils_scale_and_unit(device: Device) -> None:
    with anyio.fail_after(15):
        device.inputs[3] = 2500
        await device.stop()
        await device.start()  # input registers are read-only from the client side: set them at boot
        await device.write(10, [1234])
        await device.write_coil(2, True)
        conn = connection(
            device,
            {"table": "input", "address": 3, "tag": "pressure", "scale": 0.1, "offset": -50.0, "unit": "psi"},
            {"table": "coil", "address": 2, "tag": "pump_on", "type": "float64"},  # type is ignored for coils
            {"table": "coil", "address": 3, "tag": "valve_open"},
            {"table": "holding", "address": 10, "tag": "raw"},
        )
        async with running(conn) as sink:
            await sink.wait_for("pressure", 200.0)
            await sink.wait_for("pump_on", 1.0)
            await sink.wait_for("valve_open", 0.0)
            await sink.wait_for("raw", 1234.0)
            await device.write_coil(2, False)
            await device.write_coil(3, True)
            await sink.wait_for("pump_on", 0.0)
            await sink.wait_for("valve_open", 1.0)
        pressure = sink.latest("pressure")
        assert pressure is not None
        assert pressure.unit == "psi"


async def test_illegal_address_is_bad_for_that_tag_only(device: Device) -> None:
    with anyio.fail_after(15):
        await device.write(0, [42])
        conn = connection(
            device,
            {"table": "holding", "address": 0, "tag": "good"},
            {"table": "holding", "address": 5000, "tag": "missing"},
            {"table": "holding", "address": HOLDING_SIZE - 1, "type": "uint32", "tag": "straddles_end"},
        )
        async with running(conn) as sink:
            await sink.wait_for("good", 42.0)
            await sink.wait_for("missing", None, "BAD")
            await sink.wait_for("straddles_end", None, "BAD")
            await device.write(0, [43])
            await sink.wait_for("good", 43.0)
            missing = sink.latest("missing")
            assert missing is not None
            assert (missing.value, missing.quality) == (None, "BAD")


async def test_nan_float_is_bad_and_recovers(device: Device) -> None:
    with anyio.fail_after(15):
        await device.write(0, [0x7FC0, 0x0000])  # float32 quiet NaN
        async with running(
            connection(device, {"table": "holding", "address": 0, "type": "float32", "tag": "t"})
        ) as sink:
            await sink.wait_for("t", None, "BAD")
            await device.write(0, registers("f", 1.5))
            await sink.wait_for("t", 1.5)


async def test_unchanged_and_within_deadband_values_are_not_reported(device: Device) -> None:
    with anyio.fail_after(15):
        await device.write(0, [100, 100, 1000])
        conn = connection(
            device,
            {"table": "holding", "address": 0, "tag": "moving"},
            {"table": "holding", "address": 1, "tag": "banded", "deadband": 5.0},
            # 0.2 % of a 0-5000 span: 10 units, near zero as near full scale
            {"table": "holding", "address": 2, "tag": "percent", "deadband": 0.2, "deadband_percent": True}
            | {"raw_min": 0, "raw_max": 5000, "eu_min": 0, "eu_max": 5000},
            refresh_s=60.0,
        )
        async with running(conn) as sink:
            await wait_until(lambda: len(sink.batches) >= 1)
            assert len(sink.batches[0]) == 3
            await device.write(1, [105, 1010])  # exactly on the deadbands: not reported
            await device.write(0, [101])
            await sink.wait_for("moving", 101.0)
            await device.write(1, [106, 1011])  # past both deadbands
            await sink.wait_for("banded", 106.0)
            await sink.wait_for("percent", 1011.0)
        after_first = sorted((r.tag_name, r.value) for batch in sink.batches[1:] for r in batch)
        assert after_first == [("banded", 106.0), ("moving", 101.0), ("percent", 1011.0)]


async def test_unchanged_values_are_refreshed_after_refresh_s(device: Device) -> None:
    with anyio.fail_after(15):
        await device.write(0, [7, 8])
        conn = connection(
            device,
            {"table": "holding", "address": 0, "tag": "a"},
            {"table": "holding", "address": 1, "tag": "b"},
            refresh_s=0.5,
        )
        async with running(conn) as sink:
            await wait_until(lambda: len(sink.batches) >= 2)
        first, second = sink.batches[:2]
        assert [(r.tag_name, r.value) for r in second] == [(r.tag_name, r.value) for r in first] == [("a", 7), ("b", 8)]


async def test_groups_poll_independently(device: Device) -> None:
    with anyio.fail_after(15):
        await device.write(0, [1, 2])
        base = connection(device, {"table": "holding", "address": 0, "tag": "fast"})
        slow = {"interval_s": 0.2, "points": [{"table": "holding", "address": 1, "well": "w2", "tag": "slow"}]}
        conn = ModbusConnection.model_validate(base.model_dump() | {"groups": [*base.model_dump()["groups"], slow]})
        async with running(conn) as sink:
            await sink.wait_for("fast", 1.0)
            await sink.wait_for("slow", 2.0)
            await device.write(0, [10, 20])
            await sink.wait_for("fast", 10.0)
            await sink.wait_for("slow", 20.0)
        slow_reading = sink.latest("slow")
        assert slow_reading is not None
        assert slow_reading.well_id == "w2"


async def test_server_restart_is_survived(device: Device) -> None:
    with anyio.fail_after(15):
        await device.write(0, [1])
        async with running(connection(device, {"table": "holding", "address": 0, "tag": "t"})) as sink:
            await sink.wait_for("t", 1.0)
            await device.stop()
            await anyio.sleep(0.3)  # a few failed polls and reconnect attempts
            device.holding[0] = 2
            await device.start()
            await sink.wait_for("t", 2.0)
            await device.write(0, [3])
            await sink.wait_for("t", 3.0)


async def test_a_device_that_is_not_up_yet_is_waited_for() -> None:
    with anyio.fail_after(15):
        device = Device()
        device.holding[0] = 5
        async with running(connection(device, {"table": "holding", "address": 0, "tag": "t"})) as sink:
            await anyio.sleep(0.3)  # refused connections, backing off
            assert sink.batches == []
            await device.start()
            try:
                await sink.wait_for("t", 5.0)
            finally:
                await device.stop()


@pytest.mark.parametrize(
    "change",
    [
        {"extra": 1},
        {"groups": []},
        {"groups": [{"interval_s": 0, "points": [{"table": "coil", "address": 0, "well": "w", "tag": "t"}]}]},
        {"groups": [{"interval_s": 1, "points": []}]},
        {"groups": [{"interval_s": 1, "points": [{"table": "coil", "address": 65536, "well": "w", "tag": "t"}]}]},
        {"groups": [{"interval_s": 1, "points": [{"table": "discrete", "address": 0, "well": "w", "tag": "t"}]}]},
        {"groups": [{"interval_s": 1, "points": [{"table": "coil", "address": 0, "well": "w", "tag": "t*"}]}]},
    ],
)
def test_connection_config_is_validated(change: dict[str, Any]) -> None:
    point = {"table": "holding", "address": 0, "well": "w", "tag": "t"}
    valid = {
        "protocol": "modbus",
        "id": "mb",
        "tenant": "acme",
        "host": "plc",
        "groups": [{"interval_s": 1, "points": [point]}],
    }
    parsed = ModbusConnection.model_validate(valid)
    assert (parsed.port, parsed.unit_id, parsed.groups[0].points[0].type) == (502, 1, "uint16")
    with pytest.raises(ValidationError):
        ModbusConnection.model_validate(valid | change)


async def test_a_broken_4_20_ma_loop_at_zero_counts_is_bad_out_of_range_and_recovers(device: Device) -> None:
    with anyio.fail_after(15):
        await device.write(0, [0])
        loop = {"raw_min": 6400, "raw_max": 32000, "eu_min": 0, "eu_max": 3000, "fault_below": 6080}
        async with running(connection(device, {"table": "holding", "address": 0, "tag": "p", **loop})) as sink:
            broken = await sink.wait_for("p", None, "BAD", reason="out_of_range")
            await device.write(0, [19200])
            healed = await sink.wait_for("p", 1500.0)
    assert broken.reason == "out_of_range"
    assert healed.reason is None


async def test_each_value_is_stamped_when_its_own_request_is_answered(device: Device) -> None:
    with anyio.fail_after(15):
        await device.write(0, [1, 2])
        points = [{"table": "holding", "address": n, "tag": f"t{n}"} for n in (0, 1)]
        # adjacent points share a block read: one register a request keeps them two requests
        async with running(connection(device, *points, interval_s=10, max_registers=1)) as sink:
            await wait_until(lambda: len(sink.batches) >= 1)
        first, second = sink.batches[0]
    # One scan, two requests: the second answer cannot be stamped before the first.
    assert first.timestamp < second.timestamp
