"""Modbus TCP: poll holding/input registers and coils, decode them, report by exception.

Each group of points is polled on its own interval over one shared connection. Values are
decoded here from the raw 16-bit registers (struct), so every word and byte order a device
may use is supported, including the byte-swapped ones pymodbus cannot decode. A value is
reported when it moved past its deadband, when its quality changed, or when `refresh_s` has
passed since it was last reported. A Modbus exception response (an illegal address, say)
turns only the points it concerns BAD; losing the connection closes it and reconnects with
a short capped backoff. pymodbus never leaves this module: not its types, not its errors.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.pdu import ModbusPDU

from app.adapters.base import ReadingSink
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

BACKOFF_START_S = 0.1
BACKOFF_MAX_S = 2.0


class ModbusPoint(BaseModel):
    """One tag read from one register (or run of registers) or coil.

    `type` is ignored for coils, which read as 0.0 or 1.0. `word_order` says which register
    holds the most significant word; `byte_order` which byte inside each register comes first.
    The value reported is `raw * scale + offset`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    table: Literal["holding", "input", "coil"]
    address: int = Field(ge=0, lt=65536)
    type: PointType = "uint16"
    word_order: Order = "big"
    byte_order: Order = "big"
    well: Identifier
    tag: Identifier
    unit: str | None = None
    scale: float = 1.0
    offset: float = 0.0
    deadband: float = Field(0.0, ge=0)
    deadband_percent: bool = False

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


class ModbusConnectionLost(Exception):
    """The device stopped answering, or the connection dropped; the adapter reconnects."""

    def __init__(self, connection_id: str, reason: str) -> None:
        super().__init__(connection_id, reason)
        self.connection_id = connection_id
        self.reason = reason

    def __str__(self) -> str:
        return f"modbus connection {self.connection_id}: {self.reason}"


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


@dataclass(frozen=True, slots=True)
class _Reported:
    value: float | None
    quality: Quality
    at: float  # loop time


class _ExceptionFilter:
    """Report by exception: moved past the deadband, changed quality, or due for a refresh."""

    def __init__(self, refresh_s: float) -> None:
        self._refresh_s = refresh_s
        self._last: dict[tuple[str, str], _Reported] = {}

    def due(self, sample: _Sample, now: float) -> bool:
        key = (sample.point.well, sample.point.tag)
        last = self._last.get(key)
        if last is None or now - last.at >= self._refresh_s or self._changed(sample, last):
            self._last[key] = _Reported(sample.value, sample.quality, now)
            return True
        return False

    @staticmethod
    def _changed(sample: _Sample, last: _Reported) -> bool:
        if sample.quality != last.quality:
            return True
        if sample.value is None or last.value is None:
            return sample.value is not last.value
        point = sample.point
        threshold = point.deadband * abs(last.value) / 100.0 if point.deadband_percent else point.deadband
        return abs(sample.value - last.value) > threshold


class ModbusAdapter:
    """Polls one Modbus TCP device until cancelled, reconnecting by itself.

    Args:
        connection: the device, its groups of points and their reporting rules.
    """

    def __init__(self, connection: ModbusConnection) -> None:
        self.name = connection.id
        self._connection = connection
        self._filter = _ExceptionFilter(connection.refresh_s)
        self.connected = False  # read by the ingest health line
        self.errors = 0

    async def run(self, sink: ReadingSink) -> None:
        backoff = BACKOFF_START_S
        failing = False
        while True:
            client = self._client()
            try:
                if await client.connect():
                    logger.info("adapter %s connected to %s", self.name, self._address)
                    backoff, failing = BACKOFF_START_S, False
                    self.connected = True
                    await self._poll_groups(client, sink)
                raise ModbusConnectionLost(self.name, f"cannot connect to {self._address}")
            except Exception as exc:  # never CancelledError: that is a BaseException
                self.connected = False
                self.errors += 1
                level = logging.DEBUG if failing else logging.WARNING  # each outage is logged once
                logger.log(level, "adapter %s: %s; reconnecting", self.name, _describe(exc))
                failing = True
            finally:
                client.close()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

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
            readings = [self._reading(sample) for sample in samples if self._filter.due(sample, now)]
            if readings:
                await sink.submit(readings)
            next_at += group.interval_s
            if next_at < loop.time():  # fell behind (slow device or sink): don't burst to catch up
                next_at = loop.time()
            await asyncio.sleep(next_at - loop.time())

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
            raise ModbusConnectionLost(self.name, "connection dropped")
        unit, count = self._connection.unit_id, point.count
        try:
            if point.table == "coil":
                return await client.read_coils(point.address, count=count, device_id=unit)
            if point.table == "input":
                return await client.read_input_registers(point.address, count=count, device_id=unit)
            return await client.read_holding_registers(point.address, count=count, device_id=unit)
        except Exception as exc:
            raise ModbusConnectionLost(self.name, _describe(exc)) from exc

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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(inner) for inner in exc.exceptions)
    if isinstance(exc, ModbusConnectionLost):
        return exc.reason
    return str(exc) or type(exc).__name__
