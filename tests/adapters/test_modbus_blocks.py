"""Block reads, unit ids, discrete inputs, register bits, 64-bit types and scan overruns, against a
real pymodbus server that records every read it answers (its devices' `action` hook)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from prometheus_client import generate_latest
from pydantic import ValidationError
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from app.adapters.modbus import ModbusAdapter, ModbusConnection
from app.ingest.metrics import ingest_registry
from app.ingest.publisher import Publisher
from app.ingest.worker import ConnectionHealth
from app.streams.memory import MemoryRegistry, MemoryStreamLog
from tests.adapters import sinks
from tests.adapters.sinks import CollectingSink
from tests.adapters.test_modbus import registers
from tests.conftest import free_port, wait_until
from tests.prometheus import parse_samples, value

pytestmark = pytest.mark.anyio

SIZE = 600  # registers and bits of each table, on each device
READS = {1: "coil", 2: "discrete_input", 3: "holding", 4: "input"}  # function code -> table


class CountingDevices:
    """A ModbusTcpServer serving devices (unit ids) `units`, each with its own tables of SIZE
    values, that records every read as (unit, table, address, count) and answers after `delay_s`."""

    def __init__(self, units: tuple[int, ...] = (1,)) -> None:
        self.port = free_port()
        self.holding = {unit: [0] * SIZE for unit in units}
        self.discrete = {unit: [False] * SIZE for unit in units}
        self.reads: list[tuple[int, str, int, int]] = []
        self.delay_s = 0.0
        self._server: ModbusTcpServer | None = None

    def _device(self, unit: int) -> SimDevice:
        async def action(fc: int, _start: int, address: int, count: int, _regs: list[int], new: Any) -> None:
            if new is None and fc in READS:
                self.reads.append((unit, READS[fc], address, count))
            if self.delay_s:
                await asyncio.sleep(self.delay_s)

        simdata = (
            [SimData(address=0, values=[False] * SIZE, datatype=DataType.BITS)],
            [SimData(address=0, values=list(self.discrete[unit]), datatype=DataType.BITS)],
            [SimData(address=0, values=list(self.holding[unit]), datatype=DataType.REGISTERS)],
            [SimData(address=0, values=[0] * SIZE, datatype=DataType.REGISTERS)],
        )
        return SimDevice(id=unit, simdata=simdata, action=action)

    async def start(self) -> None:
        devices = [self._device(unit) for unit in self.holding]
        self._server = ModbusTcpServer(devices, address=("127.0.0.1", self.port))
        await self._server.serve_forever(background=True)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]
            self._server = None

    def scan_reads(self) -> list[tuple[int, str, int, int]]:
        """The reads after the session's first (its sign of life): one scan's, when the interval is long."""
        return self.reads[1:]


@contextlib.asynccontextmanager
async def serving(devices: CountingDevices) -> AsyncIterator[CountingDevices]:
    await devices.start()
    try:
        yield devices
    finally:
        await devices.stop()


def connection(
    devices: CountingDevices,
    *points: dict[str, Any],
    interval_s: float = 10,
    group: dict[str, Any] | None = None,
    **extra: Any,
) -> ModbusConnection:
    groups = [{"interval_s": interval_s, **(group or {}), "points": [{"well": "w1", **point} for point in points]}]
    fields = {"protocol": "modbus", "id": "mb1", "tenant": "acme", "host": "127.0.0.1", "port": devices.port}
    return ModbusConnection.model_validate({**fields, "groups": groups, **extra})


def holding(address: int, tag: str, **extra: Any) -> dict[str, Any]:
    return {"table": "holding", "address": address, "tag": tag, **extra}


async def first_scan(conn: ModbusConnection) -> CollectingSink:
    """Runs the adapter for one scan (the interval is long) and returns what it reported."""
    async with sinks.running(ModbusAdapter(conn)) as sink:
        await wait_until(lambda: len(sink.batches) >= 1)
    return sink


def values(sink: CollectingSink) -> dict[str, float | None]:
    return {reading.tag_name: reading.value for reading in sink.batches[0]}


async def test_500_adjacent_registers_are_read_in_4_requests_a_scan() -> None:
    with anyio.fail_after(15):
        devices = CountingDevices()
        devices.holding[1][:500] = [1000 + n for n in range(500)]
        async with serving(devices):
            sink = await first_scan(connection(devices, *(holding(n, f"t{n}") for n in range(500))))
        assert values(sink) == {f"t{n}": 1000.0 + n for n in range(500)}
        assert devices.scan_reads() == [(1, "holding", start, 125) for start in (0, 125, 250, 375)]


async def test_a_gap_over_max_gap_splits_and_a_gap_within_it_joins() -> None:
    with anyio.fail_after(15):
        devices = CountingDevices()
        devices.holding[1][0], devices.holding[1][11], devices.holding[1][23] = 1, 2, 3
        points = [holding(0, "a"), holding(11, "b"), holding(23, "c")]  # gaps of 10 and 11 registers
        async with serving(devices):
            sink = await first_scan(connection(devices, *points, max_gap=10))
        assert values(sink) == {"a": 1.0, "b": 2.0, "c": 3.0}
        assert devices.scan_reads() == [(1, "holding", 0, 12), (1, "holding", 23, 1)]


async def test_a_point_across_a_125_register_boundary_is_not_split() -> None:
    with anyio.fail_after(15):
        devices = CountingDevices()
        devices.holding[1][124:128] = registers("d", -98765.4321)
        points = [holding(n, f"t{n}") for n in range(124)] + [holding(124, "wide", type="float64")]
        async with serving(devices):
            sink = await first_scan(connection(devices, *points))
        assert values(sink)["wide"] == -98765.4321
        assert devices.scan_reads() == [(1, "holding", 0, 124), (1, "holding", 124, 4)]


async def test_several_unit_ids_share_one_connection() -> None:
    with anyio.fail_after(15):
        devices = CountingDevices(units=(1, 2, 3))
        for unit in (1, 2, 3):
            devices.holding[unit][0] = 100 * unit
        # the connection's unit 1; the group's unit 2; a point's own unit 3
        conn = connection(devices, holding(0, "two"), holding(0, "three", unit_id=3), group={"unit_id": 2})
        conn_1 = connection(devices, holding(0, "one"))
        async with serving(devices):
            sink = await first_scan(conn)
            sink_1 = await first_scan(conn_1)
        assert values(sink) == {"two": 200.0, "three": 300.0}
        assert values(sink_1) == {"one": 100.0}
        assert sorted(read[0] for read in devices.reads) == [1, 1, 2, 2, 3]  # and two signs of life


async def test_discrete_inputs_are_read_in_blocks() -> None:
    with anyio.fail_after(15):
        devices = CountingDevices()
        devices.discrete[1][:3] = [True, False, True]
        points = [{"table": "discrete_input", "address": n, "tag": f"d{n}"} for n in range(3)]
        async with serving(devices):
            sink = await first_scan(connection(devices, *points))
        assert values(sink) == {"d0": 1.0, "d1": 0.0, "d2": 1.0}
        # one request (the simulator's hook counts bits in 16-bit words, so its count is not the request's)
        assert [read[:3] for read in devices.scan_reads()] == [(1, "discrete_input", 0)]


async def test_bits_of_a_register_share_its_read() -> None:
    with anyio.fail_after(15):
        devices = CountingDevices()
        devices.holding[1][5] = 0b1000_0000_0010_0101
        points = [holding(5, f"bit{bit}", bit=bit, type="float32") for bit in (0, 1, 2, 5, 15)]
        async with serving(devices):
            sink = await first_scan(connection(devices, *points, holding(5, "word")))
        assert values(sink) == {"bit0": 1.0, "bit1": 0.0, "bit2": 1.0, "bit5": 1.0, "bit15": 1.0, "word": 32805.0}
        assert devices.scan_reads() == [(1, "holding", 5, 1)]


async def test_int64_and_uint64_decode_in_all_four_orders() -> None:
    with anyio.fail_after(15):
        devices = CountingDevices()
        points: list[dict[str, Any]] = []
        expected: dict[str, float] = {}
        address = 0
        for type_, fmt, number in (("int64", "q", -(2**40) - 12345), ("uint64", "Q", 2**63 + 2**52)):
            for word_order in ("big", "little"):
                for byte_order in ("big", "little"):
                    devices.holding[1][address : address + 4] = registers(fmt, number, word_order, byte_order)
                    tag = f"{type_}_{word_order}_{byte_order}"
                    order = {"word_order": word_order, "byte_order": byte_order}
                    points.append(holding(address, tag, type=type_, **order))
                    expected[tag] = float(number)
                    address += 4
        async with serving(devices):
            sink = await first_scan(connection(devices, *points))
        assert values(sink) == expected


def ascii_registers(text: str, length: int, byte_order: str = "big") -> list[int]:
    """`text` as a device holds it: two characters a register, NUL-padded to `length` registers."""
    raw = text.encode("ascii").ljust(2 * length, b"\x00")
    return [int.from_bytes(raw[n : n + 2], "big" if byte_order == "big" else "little") for n in range(0, len(raw), 2)]


async def test_a_string_is_a_multistate_tag_mapped_by_its_states() -> None:
    with anyio.fail_after(15):
        devices = CountingDevices()
        states = {"RUNNING": 1, "STOPPED": 0, "TRIPPED": -1}
        devices.holding[1][0:4] = ascii_registers("RUNNING", 4)
        devices.holding[1][4:8] = ascii_registers("STOPPED ", 4, "little")  # space-padded, low byte first
        devices.holding[1][8:12] = ascii_registers("FAULT 7", 4)  # a text the site file does not know
        points = [
            holding(0, "pump", type="string", length=4, states=states),
            holding(4, "valve", type="string", length=4, states=states, byte_order="little"),
            holding(8, "panel", type="string", length=4, states=states),
        ]
        async with serving(devices):
            sink = await first_scan(connection(devices, *points))
        assert values(sink) == {"pump": 1.0, "valve": 0.0, "panel": None}
        panel = next(r for r in sink.batches[0] if r.tag_name == "panel")
        assert (panel.quality, panel.reason) == ("BAD", "device_error")
        assert devices.scan_reads() == [(1, "holding", 0, 12)], "one block, as any registers"


async def test_an_exception_response_turns_only_the_points_of_its_block_bad() -> None:
    with anyio.fail_after(15):
        devices = CountingDevices()
        devices.holding[1][0:2] = [7, 8]
        # 598..600 is one block, and 600 is past the device's map: the device refuses the whole block
        points = [holding(0, "a"), holding(1, "b"), holding(SIZE - 2, "near_end"), holding(SIZE, "past_end")]
        async with serving(devices):
            sink = await first_scan(connection(devices, *points))
        assert {r.tag_name: (r.value, r.quality, r.reason) for r in sink.batches[0]} == {
            "a": (7.0, "GOOD", None),
            "b": (8.0, "GOOD", None),
            "near_end": (None, "BAD", "device_error"),
            "past_end": (None, "BAD", "device_error"),
        }
        # the refused block never reaches the device's hook: only its neighbour's read is recorded
        assert devices.scan_reads() == [(1, "holding", 0, 2)]


async def test_every_point_of_one_request_has_its_answer_time() -> None:
    with anyio.fail_after(15):
        devices = CountingDevices()
        async with serving(devices):
            sink = await first_scan(connection(devices, *(holding(n, f"t{n}") for n in range(3)), holding(50, "far")))
        stamps = [reading.timestamp for reading in sink.batches[0]]
        assert stamps[0] == stamps[1] == stamps[2] < stamps[3]


async def test_a_scan_longer_than_its_interval_is_an_overrun_warned_once_and_in_the_metrics(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="app.adapters.modbus")
    with anyio.fail_after(15):
        devices = CountingDevices()
        devices.delay_s = 0.04  # three requests a scan: at least 0.12 s for a 0.05 s interval
        points = [holding(address, f"t{address}") for address in (0, 20, 40)]
        adapter = ModbusAdapter(connection(devices, *points, interval_s=0.05, max_gap=0))
        async with serving(devices), sinks.running(adapter):
            await wait_until(lambda: adapter.scans["0"].overruns >= 3)
        publisher = Publisher(MemoryStreamLog(MemoryRegistry()))
        text = generate_latest(ingest_registry([ConnectionHealth(adapter, publisher, "modbus")], publisher))
    warnings = [record.getMessage() for record in caplog.records if "scan took" in record.getMessage()]
    assert len(warnings) == 1, warnings  # rate-limited: not one a scan
    assert warnings[0].startswith("modbus mb1: scan took ")
    assert "for a 0.05 s interval (3 points in 3 requests; group 0" in warnings[0]
    samples = parse_samples(text.decode())
    labels = {"connection": "mb1", "group": "0"}
    assert value(samples, "wellstream_ingest_scan_overruns_total", **labels) >= 3
    assert value(samples, "wellstream_ingest_scan_seconds", **labels) >= 0.12


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_registers": 126}, "less than or equal to 125"),
        ({"max_bits": 2001}, "less than or equal to 2000"),
        ({"max_gap": -1}, "greater than or equal to 0"),
        ({"max_registers": 2, "point": {"type": "float64"}}, "max_registers 2 is less than a point's 4 registers"),
        ({"point": {"type": "string", "length": 8}}, "needs length .registers. and states"),
        ({"point": {"type": "string", "states": {"ON": 1}}}, "needs length .registers. and states"),
        ({"point": {"type": "string", "length": 2, "states": {"ON": float("nan")}}}, "each text to a finite number"),
        ({"point": {"type": "string", "length": 2, "states": {"ON": 1}, "table": "coil"}}, "not a coil"),
        ({"point": {"length": 2}}, "apply to type 'string' only"),
        ({"point": {"type": "string", "length": 126, "states": {"ON": 1}}}, "less than or equal to 125"),
        ({"point": {"bit": 16}}, "less than or equal to 15"),
        ({"point": {"table": "coil", "bit": 0}}, "bit applies to holding and input registers"),
        ({"point": {"unit_id": 256}}, "less than or equal to 255"),
        ({"point": {"table": "discrete_input", "address": 10001}}, "looks like Modicon notation"),
    ],
)
def test_block_and_type_settings_are_validated(change: dict[str, Any], message: str) -> None:
    point = {"table": "holding", "address": 0, "well": "w", "tag": "t"} | change.pop("point", {})
    fields = {"protocol": "modbus", "id": "mb", "tenant": "acme", "host": "plc"}
    with pytest.raises(ValidationError, match=message):
        ModbusConnection.model_validate(fields | {"groups": [{"interval_s": 1, "points": [point]}]} | change)


def test_block_limits_default_to_the_protocols_maximum() -> None:
    point = {"table": "holding", "address": 0, "well": "w", "tag": "t"}
    fields = {"protocol": "modbus", "id": "mb", "tenant": "acme", "host": "plc"}
    parsed = ModbusConnection.model_validate(fields | {"groups": [{"interval_s": 1, "points": [point]}]})
    assert (parsed.max_registers, parsed.max_bits, parsed.max_gap) == (125, 2000, 10)
