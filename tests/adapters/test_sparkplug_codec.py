"""The Sparkplug B wire format: the generated module, topics and payload values (no broker needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.adapters import sparkplug_b_pb2 as pb
from app.adapters.sparkplug_payload import SparkplugError, Topic, decode, number, rebirth_request, state

ADAPTERS = Path(__file__).resolve().parents[2] / "app" / "adapters"


def payload(**metric: Any) -> bytes:
    message = pb.Payload(timestamp=1, seq=0)
    message.metrics.add(**metric)
    return message.SerializeToString()


def test_the_committed_generated_module_is_what_protoc_makes_of_the_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools is in the dev extras")
    command = [sys.executable, "-m", "grpc_tools.protoc", f"-I{ADAPTERS}", f"--python_out={tmp_path}"]
    subprocess.run([*command, f"--pyi_out={tmp_path}", str(ADAPTERS / "sparkplug_b.proto")], check=True)

    for name in ("sparkplug_b_pb2.py", "sparkplug_b_pb2.pyi"):
        assert (tmp_path / name).read_text() == (ADAPTERS / name).read_text(), f"regenerate {name} (see the .proto)"


def test_field_numbers_are_the_specifications() -> None:
    metric = pb.Payload.Metric.DESCRIPTOR.fields_by_name
    numbers = {name: metric[name].number for name in ("name", "alias", "timestamp", "datatype", "is_null")}

    assert numbers == {"name": 1, "alias": 2, "timestamp": 3, "datatype": 4, "is_null": 7}
    assert [metric[n].number for n in ("int_value", "long_value", "double_value", "boolean_value")] == [10, 11, 13, 14]
    assert [pb.Payload.DESCRIPTOR.fields_by_name[n].number for n in ("timestamp", "metrics", "seq")] == [1, 2, 3]


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        ({"datatype": 1, "int_value": 0xFF}, -1.0),  # Int8
        ({"datatype": 2, "int_value": 0x8000}, -32768.0),  # Int16
        ({"datatype": 3, "int_value": (-5) & 0xFFFFFFFF}, -5.0),  # Int32
        ({"datatype": 4, "long_value": (-7) & 0xFFFFFFFFFFFFFFFF}, -7.0),  # Int64
        ({"datatype": 7, "int_value": 0xFFFFFFFF}, 4294967295.0),  # UInt32
        ({"datatype": 9, "float_value": 1.5}, 1.5),
        ({"datatype": 11, "boolean_value": True}, 1.0),
        ({"datatype": 10, "is_null": True}, None),
    ],
)
def test_numbers_are_read_by_their_datatype(metric: dict[str, Any], expected: float | None) -> None:
    (decoded,) = decode(payload(name="m", **metric)).metrics

    assert number(decoded, decoded.datatype) == expected


@pytest.mark.parametrize(
    "metric",
    [{"datatype": 12, "string_value": "x"}, {"datatype": 17, "bytes_value": b"x"}, {"datatype": 13, "long_value": 5}],
)
def test_strings_bytes_and_datetimes_are_not_numbers(metric: dict[str, Any]) -> None:
    (decoded,) = decode(payload(name="m", **metric)).metrics

    with pytest.raises(SparkplugError):
        number(decoded, decoded.datatype)


@pytest.mark.parametrize(
    ("code", "expected"), [(192, ("GOOD", None)), (500, ("UNCERTAIN", "stale")), (0, ("BAD", "device_error"))]
)
def test_the_quality_property_is_read(code: int, expected: tuple[str, str | None]) -> None:
    message = pb.Payload()
    metric = message.metrics.add(name="m", datatype=10, double_value=1.0)
    metric.properties.keys.append("Quality")
    metric.properties.values.add(type=3, int_value=code)

    (decoded,) = decode(message.SerializeToString()).metrics

    assert decoded.quality == expected


def test_topics_are_parsed_and_bad_ones_refused() -> None:
    assert Topic.parse("spBv1.0/G/DDATA/n/d") == Topic("G", "DDATA", "n", "d")
    assert Topic.parse("spBv1.0/G/NBIRTH/n") == Topic("G", "NBIRTH", "n", None)
    for bad in (
        "spBv1.0/G/NDATA",
        "spBv1.0/G/XDATA/n",
        "spBv1.0/G/DDATA/n",
        "spBv1.0/G/NDATA/n/d",
        "spAv1.0/G/NDATA/n",
    ):
        with pytest.raises(SparkplugError):
            Topic.parse(bad)


def test_garbage_is_not_a_payload_and_commands_round_trip() -> None:
    with pytest.raises(SparkplugError, match="not a Sparkplug B payload"):
        decode(b"\xff\xfe\x00garbage")

    (metric,) = decode(rebirth_request(42)).metrics
    assert (metric.name, metric.raw, metric.timestamp_ms) == ("Node Control/Rebirth", True, 42)
    assert state(False, 42) == b'{"online":false,"timestamp":42}'
