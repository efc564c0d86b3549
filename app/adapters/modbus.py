"""Modbus TCP, RTU over TCP and RTU over serial: poll holding/input registers, coils and discrete
inputs, decode them, report by exception.

A connection's `transport` is "tcp" (MBAP framing), "rtu-over-tcp" (RTU frames with their CRC
over a TCP socket, as serial-to-Ethernet converters pass them) or "serial" (RTU on a serial
port). Every request of a connection, whatever its group, goes on the wire alone and at least
`inter_request_delay_s` after the previous one ended (app/adapters/modbusline.py).

Each group of points is polled on its own interval over one shared connection, in block reads
(app/adapters/modbusplan.py): adjacent points, and points a small gap apart, of one unit id and
table share a request, so a scan of 500 adjacent registers is 4 requests, not 500. Values are
decoded here from the raw 16-bit registers (struct), so every word and byte order a device
may use is supported, including the byte-swapped ones pymodbus cannot decode. Every value of
a request is stamped when that request is answered. Each scan is timed: the last scan's
duration and the scans that took longer than their interval (overruns) are on the adapter's
`scans`, for the worker's metrics, and an overrun is logged as a warning at most once a minute
a group. A value is reported by exception
(app/adapters/reporter.py): when it moved past its deadband, when its quality changed, or
when `refresh_s` has passed since it was last reported. A Modbus exception response (an
illegal address, say) turns only the points of that request BAD (`device_error`); a refused or
timed-out request loses the connection, which closes and reconnects
(app/adapters/reconnect.py) with a short backoff, 0.1 s doubling to 2 s: a PLC is on the
local network and back quickly. Once the device has not answered for `comm_timeout_s`,
every tag is reported BAD `comm_failure`; a tag not polled for three of its group's
intervals (an overrun scan) is reported stale. pymodbus never leaves
this module: not its types, not its errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import struct
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient, ModbusBaseClient
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU

from app.adapters.base import PointTarget, ReadingSink
from app.adapters.modbusline import Line, silent_interval_s
from app.adapters.modbusplan import BIT_TABLES, MAX_BITS, MAX_REGISTERS, Limits, Request, Slot, Span, Table, plan
from app.adapters.reconnect import ReconnectingAdapter, ReconnectLoop, describe
from app.adapters.reporter import STALE_FACTOR, Reporter, Source
from app.adapters.throttle import WarningThrottle
from app.cancellation import pause
from app.errors import ConnectionLost
from app.models import Identifier, Quality, Reading, Reason, utc_now_iso

logger = logging.getLogger(__name__)

T = TypeVar("T")

OVERRUN_WARNING_EVERY_S = 60.0

PointType = Literal["int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "string"]
Order = Literal["big", "little"]
Transport = Literal["tcp", "rtu-over-tcp", "serial"]

# What each transport needs and what it must not be given; the defaults apply only where a field belongs.
_SOCKET_DEFAULTS: dict[str, object] = {"port": 502}
_SERIAL_DEFAULTS: dict[str, object] = {"baudrate": 9600, "bytesize": 8, "parity": "N", "stopbits": 1}
_SOCKET_FIELDS = ("host", "port")
_SERIAL_FIELDS = ("serial_port", *_SERIAL_DEFAULTS)

# struct format and size in 16-bit registers of each type
_LAYOUT: dict[PointType, tuple[str, int]] = {
    "int16": ("h", 1),
    "uint16": ("H", 1),
    "int32": ("i", 2),
    "uint32": ("I", 2),
    "int64": ("q", 4),
    "uint64": ("Q", 4),  # a float holds it exactly only up to 2**53, as it does int64
    "float32": ("f", 2),
    "float64": ("d", 4),
}


class ModbusPoint(PointTarget):
    """One tag read from one register (or run of registers), one bit of a register, a coil or a discrete input.

    `type` is ignored for coils and discrete inputs, and for `bit` (0..15, least significant
    first) of a holding or input register: they read as 0.0 or 1.0. `word_order` says which
    register holds the most significant word; `byte_order` which byte inside each register comes
    first. `unit_id`, when set, overrides the group's and the connection's (several devices
    behind one gateway). The raw value becomes an engineering value by `scale`/`offset` or a
    raw/EU range (out of range: BAD `out_of_range`). A move of at most `deadband` (with
    `deadband_percent`, that percent of the EU span) is not reported.
    """

    polled = True

    table: Table
    address: int = Field(ge=0, lt=65536)
    type: PointType = "uint16"
    word_order: Order = "big"
    byte_order: Order = "big"
    bit: int | None = Field(None, ge=0, le=15)
    unit_id: int | None = Field(None, ge=0, le=255)
    length: int | None = Field(None, ge=1, le=MAX_REGISTERS)
    states: dict[str, float] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _bit_of_a_register(self) -> ModbusPoint:
        if self.bit is not None and self.table in BIT_TABLES:
            raise ValueError(f"bit applies to holding and input registers, not to a {self.table}")
        return self

    @model_validator(mode="after")
    def _a_string_is_a_state(self) -> ModbusPoint:
        # A Reading's value is a finite number (app/models.py): a string register run is read as
        # a multistate tag, its text mapped by `states` to the number the tag reports (a status
        # word such as "RUNNING" -> 1). A number made up from arbitrary text would be reported as
        # if measured, so without `states` a string is refused.
        if self.type == "string":
            if self.length is None or self.states is None:
                raise ValueError(
                    "type 'string' needs length (registers) and states (each text the device may show -> "
                    "the number the tag reports, e.g. {RUNNING = 1, STOPPED = 0}): a reading's value is a number"
                )
            if self.table in BIT_TABLES or self.bit is not None:
                what = "bit" if self.bit is not None else self.table
                raise ValueError(f"a string is read from holding or input registers, not a {what}")
            if not all(math.isfinite(number) for number in self.states.values()):
                raise ValueError("states map each text to a finite number")
        elif self.length is not None or self.states is not None:
            raise ValueError("length and states apply to type 'string' only")
        return self

    @property
    def count(self) -> int:
        """How many registers (or bits) one read of this point takes."""
        if self.table in BIT_TABLES or self.bit is not None:
            return 1
        if self.type == "string":
            return self.length or 1
        return _LAYOUT[self.type][1]


class ModbusGroup(BaseModel):
    """Points polled together every `interval_s`; `unit_id`, when set, overrides the connection's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    interval_s: float = Field(gt=0, le=3600)
    unit_id: int | None = Field(None, ge=0, le=255)
    points: list[ModbusPoint] = Field(min_length=1)


class ModbusConnection(BaseModel):
    """One Modbus device, or several behind one gateway or serial line (`unit_id` is the slave/device
    id, which a group or point may override), and the groups polled from it.

    `transport` "tcp" and "rtu-over-tcp" take `host` and `port` (502); "serial" takes
    `serial_port` and the line's `baudrate` (9600), `bytesize` (8: RTU carries whole bytes),
    `parity` ("N", "E" or "O") and `stopbits` (1 or 2). `inter_request_delay_s` is the quiet time
    between two requests: 0 over TCP, and on a serial line the RTU silent interval of 3.5
    characters at its baud rate; a slow radio may need more.

    A point's `address` is the zero-based protocol address; `address_offset` is added to every
    point's address before it is read (-1 for a device documented with one-based addresses).
    An address that looks like Modicon notation (holding 40001-49999, input 30001-39999,
    discrete input 10001-19999) is refused unless the connection sets `address_offset`, even to 0:
    then the file says which it is.

    Each scan of a group reads its points in blocks (app/adapters/modbusplan.py): at most
    `max_registers` registers or `max_bits` coils or discrete inputs a request, joining two points
    of one unit id and table when at most `max_gap` unasked registers (or bits) lie between them.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    protocol: Literal["modbus"]
    id: Identifier
    tenant: Identifier
    transport: Transport = "tcp"
    host: str | None = Field(None, min_length=1)
    port: int | None = Field(None, ge=1, lt=65536)
    serial_port: str | None = Field(None, min_length=1)
    baudrate: int | None = Field(None, ge=50, le=4_000_000)
    bytesize: Literal[8] | None = None
    parity: Literal["N", "E", "O"] | None = None
    stopbits: Literal[1, 2] | None = None
    inter_request_delay_s: float | None = Field(None, ge=0, le=60)
    unit_id: int = Field(1, ge=0, le=255)
    address_offset: int = 0
    timeout_s: float = Field(2.0, gt=0, le=60)
    refresh_s: float = Field(60.0, gt=0)
    comm_timeout_s: float | None = Field(None, gt=0, le=3600)
    max_registers: int = Field(MAX_REGISTERS, ge=1, le=MAX_REGISTERS)
    max_bits: int = Field(MAX_BITS, ge=1, le=MAX_BITS)
    max_gap: int = Field(10, ge=0, le=MAX_BITS)
    groups: list[ModbusGroup] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _transport_defaults(cls, data: Any) -> Any:
        # Defaults by transport, so a dumped connection validates again: a serial one has no port.
        if not isinstance(data, dict):
            return data
        serial = data.get("transport") == "serial"
        defaults = _SERIAL_DEFAULTS if serial else _SOCKET_DEFAULTS
        return data | {field: value for field, value in defaults.items() if data.get(field) is None}

    @model_validator(mode="after")
    def _fields_fit_the_transport(self) -> ModbusConnection:
        serial = self.transport == "serial"
        misplaced = [
            field for field in (_SOCKET_FIELDS if serial else _SERIAL_FIELDS) if getattr(self, field) is not None
        ]
        needed = "serial_port" if serial else "host"
        problems = [
            f"{field} does not apply to transport {self.transport!r}: "
            + ("a serial line is named by serial_port" if serial else "serial line settings are for transport 'serial'")
            for field in misplaced
        ]
        if getattr(self, needed) is None:
            problems.append(f"{needed} is required for transport {self.transport!r}")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def endpoint(self) -> tuple[str, int]:
        """`host` and `port` of a TCP transport."""
        if self.host is None or self.port is None:
            raise ValueError(f"transport {self.transport!r} has no host and port")
        return self.host, self.port

    @property
    def request_gap_s(self) -> float:
        """`inter_request_delay_s`, or by default 0 over TCP and the RTU silent interval on a serial line."""
        if self.inter_request_delay_s is not None:
            return self.inter_request_delay_s
        if self.transport != "serial" or self.baudrate is None:
            return 0.0
        return silent_interval_s(self.baudrate)

    def requests(self, group: ModbusGroup) -> list[Request[ModbusPoint]]:
        """The requests one scan of `group` sends, at the addresses on the wire."""
        spans = [
            Span(point, point.table, self._unit(group, point), point.address + self.address_offset, point.count)
            for point in group.points
        ]
        return plan(spans, Limits(self.max_registers, self.max_bits, self.max_gap))

    def _unit(self, group: ModbusGroup, point: ModbusPoint) -> int:
        for unit in (point.unit_id, group.unit_id):
            if unit is not None:
                return unit
        return self.unit_id

    @property
    def comm_timeout(self) -> float:
        """`comm_timeout_s`, or three polls of the fastest group, and never less than one request's timeout."""
        if self.comm_timeout_s is not None:
            return self.comm_timeout_s
        fastest = min(group.interval_s for group in self.groups)
        return max(STALE_FACTOR * fastest, self.timeout_s + 1.0)

    def stale_after(self, point: PointTarget) -> float | None:
        """`stale_after_s`, or three polls of the point's group: a polled tag is heard at every poll."""
        if point.stale_after_s is not None:
            return point.stale_after_s
        return STALE_FACTOR * self._fastest_poll[id(point)]

    @functools.cached_property
    def _fastest_poll(self) -> dict[int, float]:
        # By identity, computed once: `point in group.points` compares pydantic models field by
        # field, and asked for every point it took minutes to start a device of 5,000 points.
        fastest: dict[int, float] = {}
        for group in self.groups:
            for point in group.points:
                fastest[id(point)] = min(group.interval_s, fastest.get(id(point), math.inf))
        return fastest

    @property
    def wells(self) -> list[str]:
        """Every well this connection feeds, in first-seen order."""
        return list(dict.fromkeys(point.well for group in self.groups for point in group.points))

    @model_validator(mode="after")
    def _addresses_are_zero_based_and_fit(self) -> ModbusConnection:
        explicit_offset = "address_offset" in self.model_fields_set
        problems = [
            problem
            for group in self.groups
            for point in group.points
            if (problem := self._address_problem(point, explicit_offset)) is not None
        ]
        if problems:
            raise ValueError("\n".join(problems))  # one per line, as the site file's errors are
        return self

    @model_validator(mode="after")
    def _points_fit_in_a_request(self) -> ModbusConnection:
        widest = max(point.count for group in self.groups for point in group.points)
        if widest > self.max_registers:
            raise ValueError(f"max_registers {self.max_registers} is less than a point's {widest} registers")
        return self

    def _address_problem(self, point: ModbusPoint, explicit_offset: bool) -> str | None:
        """Why `point` cannot be read at `address + address_offset`, or None."""
        name = f"point {point.well}/{point.tag}"
        modicon = {"holding": 40001, "input": 30001, "discrete_input": 10001}.get(point.table)
        if not explicit_offset and modicon is not None and modicon <= point.address < modicon + 9999:
            register = point.address - modicon
            return (
                f"{name}: address {point.address} looks like Modicon notation ({point.address} = {point.table} "
                f"register {register}): write the zero-based address {register}, or set address_offset on the "
                f"connection if the device documents offset addresses (0 if {point.address} really is zero-based)"
            )
        first = point.address + self.address_offset
        last = first + point.count - 1
        if first >= 0 and last <= 65535:
            return None
        unit = {"coil": "coil", "discrete_input": "discrete input"}.get(point.table, "register")
        span = f"{unit} {first}" if first == last else f"{unit}s {first}..{last}"
        offset = f" + address_offset {self.address_offset}" if self.address_offset else ""
        return f"{name}: {point.table} address {point.address}{offset} reads {span}, outside 0..65535"

    def feeds(self) -> list[tuple[str, str]]:
        """Every (well, tag) this connection's points feed, in the file's order: a tag fed twice is listed twice."""
        return [(point.well, point.tag) for group in self.groups for point in group.points]


def _bytes(registers: Sequence[int], byte_order: Order) -> bytes:
    """The registers' bytes, each register's in `byte_order`."""
    return b"".join((word & 0xFFFF).to_bytes(2, byte_order) for word in registers)


def text(registers: Sequence[int], point: ModbusPoint) -> str:
    """A string point's text: two ASCII characters a register, the first in the high byte unless
    `byte_order` is "little"; trailing NULs and spaces (a device's padding) dropped."""
    return _bytes(registers, point.byte_order).decode("ascii", "replace").rstrip("\x00 ")


def decode(registers: Sequence[int], point: ModbusPoint) -> float:
    """The raw (unscaled) value of `point` from its registers, in the point's word and byte order."""
    if point.type == "string":
        raise ValueError("a string point has a text, not a number (see `text`)")
    fmt, count = _LAYOUT[point.type]
    if len(registers) != count:
        raise ValueError(f"{point.type} needs {count} registers, got {len(registers)}")
    words = list(registers) if point.word_order == "big" else list(reversed(registers))
    raw = _bytes(words, point.byte_order)
    value: float = struct.unpack(">" + fmt, raw)[0]
    return float(value)


class ScanTimes:
    """One group's scans: how long the last took and how many overran their interval.

    An overrun is logged as a warning, the first at once and then at most once every
    `OVERRUN_WARNING_EVERY_S`: a device that is too slow for its interval is slow at every scan.
    """

    def __init__(self, connection: str, group: str, interval_s: float, points: int, requests: int) -> None:
        self._connection, self._group, self._interval_s = connection, group, interval_s
        self._points, self._requests = points, requests
        self.last_scan_s: float | None = None
        self.overruns = 0
        self._warnings = WarningThrottle(logger, OVERRUN_WARNING_EVERY_S)

    def finished(self, took_s: float) -> None:
        """A scan took `took_s`."""
        self.last_scan_s = took_s
        if took_s <= self._interval_s:
            return
        self.overruns += 1
        self._warnings.warn(
            "overrun",
            f"modbus {self._connection}: scan took {took_s:.3g} s for a {self._interval_s:.3g} s interval "
            f"({self._points} points in {self._requests} requests; group {self._group})",
        )


@dataclass(frozen=True, slots=True)
class _Sample:
    point: ModbusPoint
    raw: float | None
    quality: Quality
    timestamp: str  # when its request was answered: a slow scan does not make early tags look fresher
    reason: Reason | None = None


class ModbusAdapter(ReconnectingAdapter):
    """Polls one Modbus connection (TCP, RTU over TCP or serial) until cancelled, reconnecting by itself.

    Args:
        connection: the device, its groups of points and their reporting rules.
    """

    def __init__(self, connection: ModbusConnection) -> None:
        points = [point for group in connection.groups for point in group.points]
        reporter = Reporter(
            Source(connection.tenant, "modbus", connection.id), points, connection.stale_after, connection.refresh_s
        )
        loop = ReconnectLoop("modbus", connection.id, first_s=0.1, cap_s=2.0, logger=logger)
        super().__init__(loop, reporter, connection.comm_timeout)
        self._connection = connection
        self._line = Line(connection.request_gap_s)
        self._plans = [connection.requests(group) for group in connection.groups]
        self._scans = {
            str(index): ScanTimes(connection.id, str(index), group.interval_s, len(group.points), len(requests))
            for index, (group, requests) in enumerate(zip(connection.groups, self._plans, strict=True))
        }

    @property
    def scans(self) -> Mapping[str, ScanTimes]:
        """Each group's scan times, by the group's index in the file (read-only: the group's poll writes them)."""
        return self._scans

    async def run(self, sink: ReadingSink) -> None:
        await self._run_watched(sink, self._session, lambda client: self._poll_groups(client, sink))

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[ModbusBaseClient]:
        client = self._client()
        try:
            if not await client.connect():
                raise ConnectionLost(self.name, f"cannot connect to {self._address}")
            # The session is up (a sign of life, the backoff reset) only once the device answers:
            # the kernel completes the TCP handshake for a frozen device, and so does a Modbus TCP
            # gateway whose serial device is gone, so a mere connect would keep such a device
            # looking alive forever. An exception response is an answer too.
            await self._read(client, self._plans[0][0])
            logger.info("modbus %s connected to %s", self.name, self._address)
            yield client
        finally:
            client.close()

    @property
    def _address(self) -> str:
        conn = self._connection
        if conn.transport == "serial":
            return f"{conn.serial_port} ({conn.baudrate} baud {conn.bytesize}{conn.parity}{conn.stopbits})"
        host, port = conn.endpoint
        return f"{host}:{port}" + (" (RTU framing)" if conn.transport == "rtu-over-tcp" else "")

    def _client(self) -> ModbusBaseClient:
        # Reconnection is ours (capped backoff, one place); pymodbus's own would retry behind our back.
        conn = self._connection
        if conn.transport == "serial":
            return AsyncModbusSerialClient(
                _given(conn.serial_port),
                framer=FramerType.RTU,
                baudrate=_given(conn.baudrate),
                bytesize=_given(conn.bytesize),
                parity=_given(conn.parity),
                stopbits=_given(conn.stopbits),
                timeout=conn.timeout_s,
                retries=0,
                reconnect_delay=0,
                name=self.name,
            )
        host, port = conn.endpoint
        return AsyncModbusTcpClient(
            host,
            port=port,
            framer=FramerType.RTU if conn.transport == "rtu-over-tcp" else FramerType.SOCKET,
            timeout=conn.timeout_s,
            retries=0,
            reconnect_delay=0,
            name=self.name,
        )

    async def _poll_groups(self, client: ModbusBaseClient, sink: ReadingSink) -> None:
        """Poll every group until one loses the connection (which ends them all)."""
        async with asyncio.TaskGroup() as tasks:
            for group, requests, scan in zip(self._connection.groups, self._plans, self._scans.values(), strict=True):
                tasks.create_task(self._poll(client, group.interval_s, requests, scan, sink))

    async def _poll(
        self,
        client: ModbusBaseClient,
        interval_s: float,
        requests: list[Request[ModbusPoint]],
        scan: ScanTimes,
        sink: ReadingSink,
    ) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            started = loop.time()
            samples = [sample for request in requests for sample in await self._block(client, request)]
            # the device's part only: a slow sink is the publisher's to report, not the device's
            scan.finished(loop.time() - started)
            readings = [reading for sample in samples if (reading := self._report(sample)) is not None]
            if readings:
                await sink.submit(readings)
            next_at += interval_s
            if next_at < loop.time():  # fell behind (slow device or sink): don't burst to catch up
                next_at = loop.time()
            await pause(next_at - loop.time())

    def _report(self, sample: _Sample) -> Reading | None:
        return self._reporter.sample(sample.point, sample.raw, sample.quality, sample.timestamp, reason=sample.reason)

    async def _block(self, client: ModbusBaseClient, request: Request[ModbusPoint]) -> list[_Sample]:
        response = await self._read(client, request)
        self._reconnect.contact()
        stamp = utc_now_iso()
        if response.isError():
            code = getattr(response, "exception_code", None)
            logger.debug(
                "adapter %s: unit %d %s %d+%d answered exception %s",
                self.name,
                request.unit,
                request.table,
                request.start,
                request.count,
                code,
            )
            return [_Sample(slot.point, None, "BAD", stamp, "device_error") for slot in request.slots]
        if request.table in BIT_TABLES:
            bits: list[bool] = list(response.bits)
            return [_Sample(slot.point, 1.0 if bits[slot.offset] else 0.0, "GOOD", stamp) for slot in request.slots]
        registers: list[int] = list(response.registers)
        return [_sampled(slot, registers, stamp) for slot in request.slots]

    async def _read(self, client: ModbusBaseClient, request: Request[ModbusPoint]) -> ModbusPDU:
        if not client.connected:
            raise ConnectionLost(self.name, "connection dropped")
        read = {
            "holding": client.read_holding_registers,
            "input": client.read_input_registers,
            "coil": client.read_coils,
            "discrete_input": client.read_discrete_inputs,
        }[request.table]
        try:
            async with self._line.turn():
                return await read(request.start, count=request.count, device_id=request.unit)
        except Exception as exc:
            raise ConnectionLost(self.name, describe(exc)) from exc


def _given(value: T | None) -> T:
    """A serial line setting, which the connection's validation filled in for transport 'serial'."""
    if value is None:
        raise ValueError("a serial line setting is missing")
    return value


def _sampled(slot: Slot[ModbusPoint], registers: Sequence[int], stamp: str) -> _Sample:
    """The sample of one point from its request's registers."""
    point = slot.point
    if point.bit is not None:
        return _Sample(point, float(registers[slot.offset] >> point.bit & 1), "GOOD", stamp)
    if point.type == "string":
        assert point.states is not None  # validated
        state = point.states.get(text(registers[slot.offset : slot.offset + slot.count], point))
        if state is None:  # a text the site file does not know: no number to report
            return _Sample(point, None, "BAD", stamp, "device_error")
        return _Sample(point, state, "GOOD", stamp)
    raw = decode(registers[slot.offset : slot.offset + slot.count], point)
    if not math.isfinite(raw):  # a NaN or infinite float register: the device has no value
        return _Sample(point, None, "BAD", stamp, "device_error")
    return _Sample(point, raw, "GOOD", stamp)
