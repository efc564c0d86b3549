"""Sparkplug B on the wire: topic names, and payloads decoded into plain typed values.

The only module (with the generated app/adapters/sparkplug_b_pb2.py) that sees protobuf, so no
message class or `google.protobuf` error leaves it: `decode` returns frozen dataclasses and raises
`SparkplugError` for anything that is not a Sparkplug B payload or topic.

A metric's value is kept as the wire carries it (an unsigned int, a float or a bool) until its
datatype is known: data messages usually send the alias only, and the datatype comes from the
birth (app/adapters/sparkplug_session.py). `number()` then reads it as a measurement: signed
integers are two's complement in the unsigned fields (Sparkplug 3.0, 6.4.16), booleans are 0/1,
and strings, bytes, datasets, templates, arrays and DateTime are not measurements.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal, get_args

from google.protobuf.message import DecodeError

from app.adapters import sparkplug_b_pb2 as pb
from app.models import Quality, Reason

NAMESPACE = "spBv1.0"
REBIRTH = "Node Control/Rebirth"
BD_SEQ = "bdSeq"

Kind = Literal["NBIRTH", "NDEATH", "NDATA", "NCMD", "DBIRTH", "DDEATH", "DDATA", "DCMD"]
_KINDS: frozenset[str] = frozenset(get_args(Kind))

# Datatype numbers of the specification (sparkplug_b.proto's DataType).
_SIGNED_BITS = {1: 8, 2: 16, 3: 32, 4: 64}  # Int8, Int16, Int32, Int64
_NUMERIC = frozenset(range(1, 12))  # Int8 .. Double, and Boolean (11)
_BOOLEAN = 11


class SparkplugError(ValueError):
    """A topic or payload that is not Sparkplug B; the text says why."""


@dataclass(frozen=True, slots=True)
class Topic:
    """`spBv1.0/<group>/<kind>/<node>[/<device>]`: device is None for the node's own messages."""

    group: str
    kind: Kind
    node: str
    device: str | None

    @classmethod
    def parse(cls, text: str) -> Topic:
        parts = text.split("/")
        if len(parts) not in (4, 5) or parts[0] != NAMESPACE or not all(parts[1:]):
            raise SparkplugError(f"not a Sparkplug B topic: {text[:200]!r}")
        kind = parts[2]
        if kind not in _KINDS:
            raise SparkplugError(f"unknown message type {kind[:20]!r}")
        device = parts[4] if len(parts) == 5 else None
        if (device is None) != kind.startswith("N"):
            raise SparkplugError(f"{kind} on a topic {'without' if device is None else 'with'} a device")
        return cls(parts[1], kind, parts[3], device)  # type: ignore[arg-type]  # checked against _KINDS


@dataclass(frozen=True, slots=True)
class Metric:
    """One metric as sent. `raw` is None for a null, or for a value that is not a scalar (string,
    bytes, dataset, template, extension): `scalar` tells those apart."""

    name: str | None
    alias: int | None
    timestamp_ms: int | None
    datatype: int | None
    is_null: bool
    scalar: bool
    raw: int | float | bool | None
    quality: tuple[Quality, Reason | None] | None  # from the `Quality` property, if sent
    historical: bool = False  # a value from the past, sent late: it must not update the live tag


@dataclass(frozen=True, slots=True)
class Payload:
    timestamp_ms: int | None
    seq: int | None
    metrics: tuple[Metric, ...]

    def bd_seq(self) -> int | None:
        """The birth/death sequence number of an NBIRTH or NDEATH, if it carries one."""
        for metric in self.metrics:
            if metric.name == BD_SEQ and isinstance(metric.raw, int) and not isinstance(metric.raw, bool):
                return metric.raw
        return None


def decode(data: bytes) -> Payload:
    """The payload of a Sparkplug B message; raises SparkplugError if it is not one."""
    message = pb.Payload()
    try:
        message.ParseFromString(data)
    except (DecodeError, RuntimeWarning) as exc:
        raise SparkplugError(f"not a Sparkplug B payload: {exc}") from None
    return Payload(
        message.timestamp if message.HasField("timestamp") else None,
        message.seq if message.HasField("seq") else None,
        tuple(_metric(m) for m in message.metrics),
    )


def _metric(m: pb.Payload.Metric) -> Metric:
    field = m.WhichOneof("value")
    raw: int | float | bool | None = None
    scalar = field in ("int_value", "long_value", "float_value", "double_value", "boolean_value")
    if scalar and not m.is_null:
        raw = getattr(m, field)  # a scalar field of the oneof
    return Metric(
        m.name if m.HasField("name") else None,
        m.alias if m.HasField("alias") else None,
        m.timestamp if m.HasField("timestamp") else None,
        m.datatype if m.HasField("datatype") else None,
        m.is_null,
        scalar,
        raw,
        _quality(m.properties) if m.HasField("properties") else None,
        m.is_historical,
    )


def _quality(properties: pb.Payload.PropertySet) -> tuple[Quality, Reason | None] | None:
    """The Sparkplug `Quality` property: 192 GOOD, 500 STALE, 0 BAD; other codes by OPC DA's ranges."""
    for key, value in zip(properties.keys, properties.values, strict=False):
        if key != "Quality" or value.WhichOneof("value") not in ("int_value", "long_value"):
            continue
        code = value.int_value if value.HasField("int_value") else value.long_value
        code = _signed(code, 32)
        if code == 500:
            return "UNCERTAIN", "stale"
        if code >= 192:
            return "GOOD", None
        return ("UNCERTAIN", None) if code >= 64 else ("BAD", "device_error")
    return None


def number(metric: Metric, datatype: int | None) -> float | None:
    """The metric's value as a measurement of `datatype` (the birth's, when the data omits it):
    None when it has no value (null). Raises SparkplugError if it is not a number at all."""
    if metric.is_null:
        return None
    if not metric.scalar or metric.raw is None or (datatype is not None and datatype not in _NUMERIC):
        raise SparkplugError(f"datatype {datatype} is not a number")
    raw = metric.raw
    if isinstance(raw, bool):
        return 1.0 if raw else 0.0
    if isinstance(raw, int):
        if datatype == _BOOLEAN:
            return 1.0 if raw else 0.0
        bits = _SIGNED_BITS.get(datatype or 0)
        return float(_signed(raw, bits) if bits else raw)
    if not math.isfinite(raw):
        return raw  # NaN and infinities: the reading is BAD, not skipped
    return float(raw)


def _signed(raw: int, bits: int) -> int:
    raw &= (1 << bits) - 1
    return raw - (1 << bits) if raw >> (bits - 1) else raw


def rebirth_request(timestamp_ms: int) -> bytes:
    """An NCMD payload asking an edge node to publish its births again."""
    message = pb.Payload(timestamp=timestamp_ms)
    message.metrics.add(name=REBIRTH, timestamp=timestamp_ms, datatype=_BOOLEAN, boolean_value=True)
    return message.SerializeToString()


def state(online: bool, timestamp_ms: int) -> bytes:
    """The host application's STATE payload (Sparkplug 3.0: JSON, not protobuf)."""
    return json.dumps({"online": online, "timestamp": timestamp_ms}, separators=(",", ":")).encode()
