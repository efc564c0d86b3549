"""Reading validation, StreamId parsing and Topic ids: the ingress boundary of app/models.py."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from app.models import Reading, StreamId, Topic

ID_FIELDS = ("tenantId", "wellId", "tagName", "connectionId")

BAD_IDS = [
    "",
    "a" * 65,
    "-well",
    "well*",
    "well?",
    "well[1]",
    "we[ll",
    "we]ll",
    "acme:well",
    "acme/well",
    "well 01",
    "well-01\n",
    "\nwell",
    "wéll",
    "well-\uff10\uff11",  # fullwidth digits
]

GOOD_IDS = ["a", "A", "0", "well-01", "Well_01.b", "a" * 64, "9-lives", "x.y_z-0"]


def wire(**overrides: Any) -> dict[str, Any]:
    """A valid reading as it arrives on the wire (camelCase)."""
    data: dict[str, Any] = {
        "tenantId": "acme",
        "wellId": "well-01",
        "tagName": "tubing_pressure",
        "value": 851.25,
        "quality": "GOOD",
        "timestamp": "2024-05-01T12:30:45.123456Z",
        "sourceProtocol": "modbus",
        "connectionId": "rtu-7",
        "unit": "psi",
    }
    data.update(overrides)
    return data


def test_reading_round_trips_through_camel_case_json() -> None:
    raw = orjson.dumps(wire(ingestedAt="2024-05-01T12:30:46.000001Z"))

    reading = Reading.from_json(raw)

    assert reading.tenant_id == "acme"
    assert reading.well_id == "well-01"
    assert reading.tag_name == "tubing_pressure"
    assert reading.value == 851.25
    assert reading.source_protocol == "modbus"
    assert reading.connection_id == "rtu-7"
    assert orjson.loads(reading.to_json()) == orjson.loads(raw)
    assert Reading.from_json(reading.to_json()) == reading


def test_reading_from_json_accepts_str() -> None:
    assert Reading.from_json(orjson.dumps(wire()).decode()).value == 851.25


def test_to_json_leaves_out_unset_optional_fields() -> None:
    data = wire()
    del data["unit"]

    encoded = orjson.loads(Reading.from_json(orjson.dumps(data)).to_json())

    assert "unit" not in encoded
    assert "ingestedAt" not in encoded
    assert set(encoded) == set(data)


def test_reading_accepts_snake_case_names_in_python() -> None:
    reading = Reading(
        tenant_id="acme",
        well_id="well-01",
        tag_name="flow_rate",
        value=3,
        quality="UNCERTAIN",
        timestamp="2024-05-01T12:30:45.5Z",
        source_protocol="simulator",
        connection_id="sim",
    )

    assert reading.value == 3.0
    assert b'"tagName":"flow_rate"' in reading.to_json()


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, None])
def test_non_finite_or_missing_value_becomes_null_and_bad(value: float | None) -> None:
    reading = Reading.model_validate(wire(value=value, quality="GOOD"))

    assert reading.value is None
    assert reading.quality == "BAD"
    encoded = reading.to_json()
    assert b'"value":null' in encoded
    assert b"NaN" not in encoded
    assert b"Infinity" not in encoded
    assert orjson.loads(encoded)["value"] is None
    assert orjson.loads(encoded)["quality"] == "BAD"


def test_largest_finite_value_is_kept() -> None:
    raw = orjson.dumps(wire()).replace(b"851.25", b"1.7976931348623157e308")

    reading = Reading.from_json(raw)

    assert (reading.value, reading.quality) == (1.7976931348623157e308, "GOOD")


@pytest.mark.parametrize("value", [True, False])
def test_boolean_value_is_refused(value: bool) -> None:
    with pytest.raises(ValidationError, match="boolean"):
        Reading.model_validate(wire(value=value))


def test_boolean_value_in_json_is_refused() -> None:
    raw = orjson.dumps(wire(value=True))
    with pytest.raises(ValidationError):
        Reading.from_json(raw)


@pytest.mark.parametrize("field", ID_FIELDS)
@pytest.mark.parametrize("good", GOOD_IDS)
def test_valid_ids_are_accepted(field: str, good: str) -> None:
    reading = Reading.model_validate(wire(**{field: good}))

    assert orjson.loads(reading.to_json())[field] == good


@pytest.mark.parametrize("field", ID_FIELDS)
@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_ids_are_refused(field: str, bad: str) -> None:
    with pytest.raises(ValidationError):
        Reading.model_validate(wire(**{field: bad}))


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError):
        Reading.model_validate(wire(extra="x"))


def test_unknown_quality_and_protocol_are_refused() -> None:
    with pytest.raises(ValidationError):
        Reading.model_validate(wire(quality="OK"))
    with pytest.raises(ValidationError):
        Reading.model_validate(wire(sourceProtocol="bacnet"))


def test_timestamp_from_aware_datetime_is_utc_with_microseconds() -> None:
    moment = datetime(2024, 5, 1, 14, 30, 45, 7, tzinfo=timezone(timedelta(hours=2)))

    reading = Reading.model_validate(wire(timestamp=moment))

    assert reading.timestamp == "2024-05-01T12:30:45.000007Z"


def test_timestamp_from_utc_datetime() -> None:
    reading = Reading.model_validate(wire(timestamp=datetime(2024, 5, 1, 12, 0, tzinfo=UTC)))

    assert reading.timestamp == "2024-05-01T12:00:00.000000Z"


@pytest.mark.parametrize(
    "text",
    ["2024-05-01T12:30:45.1Z", "2024-05-01T12:30:45.123Z", "2024-05-01T12:30:45.123456Z"],
)
def test_z_timestamp_with_fraction_is_kept_verbatim(text: str) -> None:
    assert Reading.model_validate(wire(timestamp=text)).timestamp == text


def test_z_timestamp_without_fraction_is_normalized() -> None:
    reading = Reading.model_validate(wire(timestamp="2024-05-01T12:30:45Z"))

    assert reading.timestamp == "2024-05-01T12:30:45.000000Z"


def test_offset_timestamp_is_normalized_to_utc_z() -> None:
    reading = Reading.model_validate(wire(timestamp="2024-05-01T14:30:45+02:00"))

    assert reading.timestamp == "2024-05-01T12:30:45.000000Z"


def test_offset_timestamp_with_fraction_is_normalized_to_utc_z() -> None:
    reading = Reading.model_validate(wire(timestamp="2024-05-01T00:30:45.25+02:00"))

    assert reading.timestamp == "2024-04-30T22:30:45.250000Z"


def test_ingested_at_is_normalized_like_timestamp() -> None:
    reading = Reading.model_validate(wire(ingestedAt="2024-05-01T14:30:45+02:00"))

    assert reading.ingested_at == "2024-05-01T12:30:45.000000Z"


@pytest.mark.parametrize(
    "timestamp",
    [
        "2024-05-01T12:30:45",
        "2024-05-01T12:30:45.123",
        datetime(2024, 5, 1, 12, 30, 45),
    ],
)
def test_naive_timestamp_is_refused(timestamp: object) -> None:
    with pytest.raises(ValidationError, match=r"timezone|UTC"):
        Reading.model_validate(wire(timestamp=timestamp))


@pytest.mark.parametrize("timestamp", ["yesterday", "", "2024-13-01T00:00:00Z", 1714566645, "2024-05-01T12:30:45Z" * 3])
def test_malformed_timestamp_is_refused(timestamp: object) -> None:
    with pytest.raises(ValidationError):
        Reading.model_validate(wire(timestamp=timestamp))


@pytest.mark.parametrize("unit", ["psi\n", "ps\ri", "\x00", "deg\tC", "bbl\x7f", "", "u" * 33])
def test_unit_with_control_chars_or_bad_length_is_refused(unit: str) -> None:
    with pytest.raises(ValidationError):
        Reading.model_validate(wire(unit=unit))


@pytest.mark.parametrize("unit", ["psi", "bbl/d", "°C", "m³/h", "u" * 32])
def test_printable_unit_is_accepted(unit: str) -> None:
    assert Reading.model_validate(wire(unit=unit)).unit == unit


def test_reading_is_frozen() -> None:
    reading = Reading.model_validate(wire())
    with pytest.raises(ValidationError):
        reading.value = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0-0", StreamId(0, 0)),
        ("1-2", StreamId(1, 2)),
        ("1714566645123-0", StreamId(1714566645123, 0)),
        ("1714566645123-17", StreamId(1714566645123, 17)),
        ("9999999999999999999-9999999999999999999", StreamId(9999999999999999999, 9999999999999999999)),
    ],
)
def test_stream_id_parses_good_ids(text: str, expected: StreamId) -> None:
    assert StreamId.parse(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "1",
        "1-",
        "-1",
        "-",
        "1-2-3",
        " 1-2",
        "1-2 ",
        "1-2\n",
        "1.5-2",
        "1-2.5",
        "+1-2",
        "1--2",
        "0x1-2",
        "1-*",
        "$",
        str(2**64) + "-0",
        "0-" + str(2**64),
        str(2**70) + "-" + str(2**70),
        "1" * 50 + "-1",
    ],
)
def test_stream_id_refuses_malformed_ids(text: str) -> None:
    with pytest.raises(ValueError, match="stream id"):
        StreamId.parse(text)


def test_stream_id_error_does_not_echo_long_input() -> None:
    with pytest.raises(ValueError, match="stream id") as caught:
        StreamId.parse("x" * 1000)

    assert len(str(caught.value)) < 100


def test_stream_ids_order_by_ms_then_seq() -> None:
    ids = [StreamId.parse(text) for text in ["2-0", "1-10", "1-2", "10-0", "1-9", "0-0"]]

    assert [str(i) for i in sorted(ids)] == ["0-0", "1-2", "1-9", "1-10", "2-0", "10-0"]
    assert StreamId(1, 9) < StreamId(1, 10) < StreamId(2, 0)
    assert max(ids) == StreamId(10, 0)


@pytest.mark.parametrize("text", ["0-0", "1-2", "1714566645123-42", "9999999999999999999-0"])
def test_stream_id_str_round_trips(text: str) -> None:
    parsed = StreamId.parse(text)

    assert str(parsed) == text
    assert StreamId.parse(str(parsed)) == parsed


def test_topic_accepts_good_ids() -> None:
    topic = Topic("acme", "well-01")

    assert str(topic) == "acme/well-01"
    assert topic == Topic("acme", "well-01")
    assert len({topic, Topic("acme", "well-01"), Topic("acme", "well-02")}) == 2


@pytest.mark.parametrize("bad", BAD_IDS)
def test_topic_refuses_bad_tenant(bad: str) -> None:
    with pytest.raises(ValueError, match="ids must match"):
        Topic(bad, "well-01")


@pytest.mark.parametrize("bad", BAD_IDS)
def test_topic_refuses_bad_well(bad: str) -> None:
    with pytest.raises(ValueError, match="ids must match"):
        Topic("acme", bad)


@pytest.mark.parametrize("value", ["NaN", "inf", "1e400", "12.5"])
def test_string_values_are_refused_not_smuggled_in_as_good(value: str) -> None:
    with pytest.raises(ValidationError, match="number"):
        Reading.model_validate(wire(value=value))


def test_an_int_too_large_for_a_float_becomes_bad() -> None:
    reading = Reading.model_validate(wire(value=10**400))
    assert (reading.value, reading.quality) == (None, "BAD")


@pytest.mark.parametrize("text", ["18446744073709551615-0", "99999999999999999999-0"])
def test_stream_id_accepts_twenty_digits_below_the_redis_limit_only(text: str) -> None:
    if int(text.split("-")[0]) < 2**64:
        assert str(StreamId.parse(text)) == text
    else:
        with pytest.raises(ValueError, match="range"):
            StreamId.parse(text)


@pytest.mark.parametrize("text", ["\u0661\u0662-3", "01-2", "1-02"])
def test_stream_id_refuses_non_ascii_digits_and_leading_zeros(text: str) -> None:
    with pytest.raises(ValueError, match="malformed"):
        StreamId.parse(text)


@pytest.mark.parametrize("text", ["2024-01-01 00:00:00.1Z", "2024-01-01T00:00:00.100000+00:00"])
def test_non_canonical_timestamps_are_normalized(text: str) -> None:
    assert Reading.model_validate(wire(timestamp=text)).timestamp == "2024-01-01T00:00:00.100000Z"
