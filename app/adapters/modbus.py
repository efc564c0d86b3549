"""Modbus TCP: poll holding/input registers and coils, decode them, report by exception.

Each group of points is polled on its own interval over one shared connection. Values are
decoded here from the raw 16-bit registers (struct), so every word and byte order a device
may use is supported, including the byte-swapped ones pymodbus cannot decode. Each value is
stamped when its own request is answered. A value is reported by exception
(app/adapters/reporter.py): when it moved past its deadband, when its quality changed, or
when `refresh_s` has passed since it was last reported. A Modbus exception response (an
illegal address, say) turns only the points it concerns BAD (`device_error`); a refused or
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
import logging
import math
import struct
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.pdu import ModbusPDU

from app.adapters.base import PointTarget, ReadingSink
from app.adapters.reconnect import ReconnectingAdapter, ReconnectLoop, describe
from app.adapters.reporter import STALE_FACTOR, Reporter, Source
from app.cancellation import pause
from app.errors import ConnectionLost
from app.models import Identifier, Quality, Reading, Reason, utc_now_iso

logger = logging.getLogger(__name__)

PointType = Literal["int16", "uint16", "int32", "uint32", "float32", "float64"]
Order = Literal["big", "little"]

# struct format and size in 16-bit registers of each type
_LAYOUT: dict[PointType, tuple[str, int]] = {
    "int16": ("h", 1),
    "uint16": ("H", 1),
    "int32": ("i", 2),
    "uint32": ("I", 2),
    "float32": ("f", 2),
    "float64": ("d", 4),
}


class ModbusPoint(PointTarget):
    """One tag read from one register (or run of registers) or coil.

    `type` is ignored for coils, which read as 0.0 or 1.0. `word_order` says which register
    holds the most significant word; `byte_order` which byte inside each register comes first.
    The raw value becomes an engineering value by `scale`/`offset` or a raw/EU range (out of
    range: BAD `out_of_range`). A move of at most `deadband` (with `deadband_percent`, that
    percent of the EU span) is not reported.
    """

    polled = True

    table: Literal["holding", "input", "coil"]
    address: int = Field(ge=0, lt=65536)
    type: PointType = "uint16"
    word_order: Order = "big"
    byte_order: Order = "big"

    @property
    def count(self) -> int:
        """How many registers (or coils) one read of this point takes."""
        return 1 if self.table == "coil" else _LAYOUT[self.type][1]


class ModbusGroup(BaseModel):
    """Points polled together every `interval_s`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    interval_s: float = Field(gt=0, le=3600)
    points: list[ModbusPoint] = Field(min_length=1)


class ModbusConnection(BaseModel):
    """One Modbus TCP device (`unit_id` is its slave/device id) and the groups polled from it.

    A point's `address` is the zero-based protocol address; `address_offset` is added to every
    point's address before it is read (-1 for a device documented with one-based addresses).
    An address that looks like Modicon notation (holding 40001-49999, input 30001-39999) is
    refused unless the connection sets `address_offset`, even to 0: then the file says which it is.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    protocol: Literal["modbus"]
    id: Identifier
    tenant: Identifier
    host: str = Field(min_length=1)
    port: int = Field(502, ge=1, lt=65536)
    unit_id: int = Field(1, ge=0, le=255)
    address_offset: int = 0
    timeout_s: float = Field(2.0, gt=0, le=60)
    refresh_s: float = Field(60.0, gt=0)
    comm_timeout_s: float | None = Field(None, gt=0, le=3600)
    groups: list[ModbusGroup] = Field(min_length=1)

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
        return min(STALE_FACTOR * g.interval_s for g in self.groups if point in g.points)

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

    def _address_problem(self, point: ModbusPoint, explicit_offset: bool) -> str | None:
        """Why `point` cannot be read at `address + address_offset`, or None."""
        name = f"point {point.well}/{point.tag}"
        modicon = {"holding": 40001, "input": 30001}.get(point.table)
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
        unit = "coil" if point.table == "coil" else "register"
        span = f"{unit} {first}" if first == last else f"{unit}s {first}..{last}"
        offset = f" + address_offset {self.address_offset}" if self.address_offset else ""
        return f"{name}: {point.table} address {point.address}{offset} reads {span}, outside 0..65535"

    def feeds(self) -> list[tuple[str, str]]:
        """Every (well, tag) this connection's points feed, in the file's order: a tag fed twice is listed twice."""
        return [(point.well, point.tag) for group in self.groups for point in group.points]


def decode(registers: Sequence[int], point: ModbusPoint) -> float:
    """The raw (unscaled) value of `point` from its registers, in the point's word and byte order."""
    fmt, count = _LAYOUT[point.type]
    if len(registers) != count:
        raise ValueError(f"{point.type} needs {count} registers, got {len(registers)}")
    words = list(registers) if point.word_order == "big" else list(reversed(registers))
    byteorder: Order = point.byte_order
    raw = b"".join((word & 0xFFFF).to_bytes(2, byteorder) for word in words)
    value: float = struct.unpack(">" + fmt, raw)[0]
    return float(value)


@dataclass(frozen=True, slots=True)
class _Sample:
    point: ModbusPoint
    raw: float | None
    quality: Quality
    timestamp: str  # when its request was answered: a slow scan does not make early tags look fresher
    reason: Reason | None = None


class ModbusAdapter(ReconnectingAdapter):
    """Polls one Modbus TCP device until cancelled, reconnecting by itself.

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

    async def run(self, sink: ReadingSink) -> None:
        await self._run_watched(sink, self._session, lambda client: self._poll_groups(client, sink))

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[AsyncModbusTcpClient]:
        client = self._client()
        try:
            if not await client.connect():
                raise ConnectionLost(self.name, f"cannot connect to {self._address}")
            # The session is up (a sign of life, the backoff reset) only once the device answers:
            # the kernel completes the TCP handshake for a frozen device, and so does a Modbus TCP
            # gateway whose serial device is gone, so a mere connect would keep such a device
            # looking alive forever. An exception response is an answer too.
            await self._read(client, self._connection.groups[0].points[0])
            logger.info("modbus %s connected to %s", self.name, self._address)
            yield client
        finally:
            client.close()

    @property
    def _address(self) -> str:
        return f"{self._connection.host}:{self._connection.port}"

    def _client(self) -> AsyncModbusTcpClient:
        # Reconnection is ours (capped backoff, one place); pymodbus's own would retry behind our back.
        return AsyncModbusTcpClient(
            self._connection.host,
            port=self._connection.port,
            timeout=self._connection.timeout_s,
            retries=0,
            reconnect_delay=0,
            name=self.name,
        )

    async def _poll_groups(self, client: AsyncModbusTcpClient, sink: ReadingSink) -> None:
        """Poll every group until one loses the connection (which ends them all)."""
        async with asyncio.TaskGroup() as tasks:
            for group in self._connection.groups:
                tasks.create_task(self._poll(client, group, sink))

    async def _poll(self, client: AsyncModbusTcpClient, group: ModbusGroup, sink: ReadingSink) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            samples = [await self._sample(client, point) for point in group.points]
            readings = [reading for sample in samples if (reading := self._report(sample)) is not None]
            if readings:
                await sink.submit(readings)
            next_at += group.interval_s
            if next_at < loop.time():  # fell behind (slow device or sink): don't burst to catch up
                next_at = loop.time()
            await pause(next_at - loop.time())

    def _report(self, sample: _Sample) -> Reading | None:
        return self._reporter.sample(sample.point, sample.raw, sample.quality, sample.timestamp, reason=sample.reason)

    async def _sample(self, client: AsyncModbusTcpClient, point: ModbusPoint) -> _Sample:
        response = await self._read(client, point)
        self._reconnect.contact()
        stamp = utc_now_iso()
        if response.isError():
            code = getattr(response, "exception_code", None)
            logger.debug("adapter %s: %s %d answered exception %s", self.name, point.table, point.address, code)
            return _Sample(point, None, "BAD", stamp, "device_error")
        if point.table == "coil":
            raw = 1.0 if response.bits[0] else 0.0
        else:
            raw = decode(list(response.registers[: point.count]), point)
        if not math.isfinite(raw):  # a NaN or infinite float register: the device has no value
            return _Sample(point, None, "BAD", stamp, "device_error")
        return _Sample(point, raw, "GOOD", stamp)

    async def _read(self, client: AsyncModbusTcpClient, point: ModbusPoint) -> ModbusPDU:
        if not client.connected:
            raise ConnectionLost(self.name, "connection dropped")
        unit, count = self._connection.unit_id, point.count
        address = point.address + self._connection.address_offset
        try:
            if point.table == "coil":
                return await client.read_coils(address, count=count, device_id=unit)
            if point.table == "input":
                return await client.read_input_registers(address, count=count, device_id=unit)
            return await client.read_holding_registers(address, count=count, device_id=unit)
        except Exception as exc:
            raise ConnectionLost(self.name, describe(exc)) from exc
