"""Modbus TCP: poll holding/input registers and coils, decode them, report by exception.

Each group of points is polled on its own interval over one shared connection. Values are
decoded here from the raw 16-bit registers (struct), so every word and byte order a device
may use is supported, including the byte-swapped ones pymodbus cannot decode. A value is
reported by exception (app/adapters/deadband.py): when it moved past its deadband, when its
quality changed, or when `refresh_s` has passed since it was last reported. A Modbus
exception response (an illegal address, say) turns only the points it concerns BAD; losing
the connection closes it and reconnects (app/adapters/reconnect.py) with a short backoff,
0.1 s doubling to 2 s: a PLC is on the local network and back quickly. pymodbus never leaves
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

from pydantic import BaseModel, ConfigDict, Field
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.pdu import ModbusPDU

from app.adapters.base import PointTarget, ReadingSink
from app.adapters.deadband import ReportByException
from app.adapters.reconnect import ReconnectingAdapter, ReconnectLoop, describe
from app.errors import ConnectionLost
from app.models import Identifier, Quality, Reading, utc_now_iso

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
    The value reported is `raw * scale + offset`. A move of at most `deadband` (with
    `deadband_percent`, that percent of the last reported value) is not reported.
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
    """One Modbus TCP device (`unit_id` is its slave/device id) and the groups polled from it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    protocol: Literal["modbus"]
    id: Identifier
    tenant: Identifier
    host: str = Field(min_length=1)
    port: int = Field(502, ge=1, lt=65536)
    unit_id: int = Field(1, ge=0, le=255)
    timeout_s: float = Field(2.0, gt=0, le=60)
    refresh_s: float = Field(60.0, gt=0)
    groups: list[ModbusGroup] = Field(min_length=1)

    @property
    def wells(self) -> list[str]:
        """Every well this connection feeds, in first-seen order."""
        return list(dict.fromkeys(point.well for group in self.groups for point in group.points))


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
    value: float | None
    quality: Quality


class ModbusAdapter(ReconnectingAdapter):
    """Polls one Modbus TCP device until cancelled, reconnecting by itself.

    Args:
        connection: the device, its groups of points and their reporting rules.
    """

    def __init__(self, connection: ModbusConnection) -> None:
        super().__init__(ReconnectLoop("modbus", connection.id, first_s=0.1, cap_s=2.0, logger=logger))
        self._connection = connection
        self._filter = ReportByException(connection.refresh_s)

    async def run(self, sink: ReadingSink) -> None:
        await self._reconnect.run(self._session, lambda client: self._poll_groups(client, sink))

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[AsyncModbusTcpClient]:
        client = self._client()
        try:
            if not await client.connect():
                raise ConnectionLost(self.name, f"cannot connect to {self._address}")
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
            now = loop.time()
            readings = [self._reading(sample) for sample in samples if self._due(sample, now)]
            if readings:
                await sink.submit(readings)
            next_at += group.interval_s
            if next_at < loop.time():  # fell behind (slow device or sink): don't burst to catch up
                next_at = loop.time()
            await asyncio.sleep(next_at - loop.time())

    def _due(self, sample: _Sample, now: float) -> bool:
        point = sample.point
        return self._filter.due((point.well, point.tag), sample.value, sample.quality, point.report_deadband, now)

    async def _sample(self, client: AsyncModbusTcpClient, point: ModbusPoint) -> _Sample:
        response = await self._read(client, point)
        if response.isError():
            code = getattr(response, "exception_code", None)
            logger.debug("adapter %s: %s %d answered exception %s", self.name, point.table, point.address, code)
            return _Sample(point, None, "BAD")
        if point.table == "coil":
            raw = 1.0 if response.bits[0] else 0.0
        else:
            raw = decode(list(response.registers[: point.count]), point)
        value = raw * point.scale + point.offset
        if not math.isfinite(value):  # a NaN or infinite float register: the device has no value
            return _Sample(point, None, "BAD")
        return _Sample(point, value, "GOOD")

    async def _read(self, client: AsyncModbusTcpClient, point: ModbusPoint) -> ModbusPDU:
        if not client.connected:
            raise ConnectionLost(self.name, "connection dropped")
        unit, count = self._connection.unit_id, point.count
        try:
            if point.table == "coil":
                return await client.read_coils(point.address, count=count, device_id=unit)
            if point.table == "input":
                return await client.read_input_registers(point.address, count=count, device_id=unit)
            return await client.read_holding_registers(point.address, count=count, device_id=unit)
        except Exception as exc:
            raise ConnectionLost(self.name, describe(exc)) from exc

    def _reading(self, sample: _Sample) -> Reading:
        return Reading(
            tenant_id=self._connection.tenant,
            well_id=sample.point.well,
            tag_name=sample.point.tag,
            value=sample.value,
            quality=sample.quality,
            timestamp=utc_now_iso(),
            source_protocol="modbus",
            connection_id=self.name,
            unit=sample.point.unit,
        )
