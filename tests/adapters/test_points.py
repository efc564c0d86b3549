"""A point's engineering units: scale/offset or a raw/EU range, fault limits, and percent deadband of the span."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.adapters.base import Converted
from app.adapters.modbus import ModbusPoint

# A 4-20 mA transmitter on a 0-3000 psi range, read by a card that gives 6400 counts at 4 mA and
# 32000 at 20 mA; NAMUR NE 43 calls 3.8-20.5 mA a signal and anything outside it a fault.
LOOP = {
    "well": "w1",
    "tag": "pressure",
    "table": "holding",
    "address": 0,
    "raw_min": 6400,
    "raw_max": 32000,
    "eu_min": 0,
    "eu_max": 3000,
    "fault_below": 6080,
    "fault_above": 32800,
}


def test_a_range_maps_raw_counts_linearly_onto_engineering_units() -> None:
    point = ModbusPoint.model_validate(LOOP)

    assert point.convert(6400) == Converted(0.0, "GOOD")
    assert point.convert(19200) == Converted(1500.0, "GOOD")
    assert point.convert(32000) == Converted(3000.0, "GOOD")


def test_a_broken_loop_at_zero_counts_is_bad_out_of_range_not_a_negative_pressure() -> None:
    point = ModbusPoint.model_validate(LOOP)

    assert point.convert(0) == Converted(None, "BAD", "out_of_range")
    assert point.convert(40000) == Converted(None, "BAD", "out_of_range")


def test_between_the_range_and_the_fault_limits_a_value_is_clamped() -> None:
    point = ModbusPoint.model_validate(LOOP)

    assert point.convert(6200) == Converted(0.0, "GOOD")
    assert point.convert(32500) == Converted(3000.0, "GOOD")


def test_without_fault_limits_anything_outside_the_raw_range_is_a_fault() -> None:
    point = ModbusPoint.model_validate({k: v for k, v in LOOP.items() if not k.startswith("fault")})

    assert point.convert(6399) == Converted(None, "BAD", "out_of_range")
    assert point.convert(6400) == Converted(0.0, "GOOD")


def test_scale_and_offset_stay_as_they_were() -> None:
    point = ModbusPoint(well="w", tag="t", table="holding", address=0, scale=0.1, offset=-5)

    assert point.convert(100) == Converted(5.0, "GOOD")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"eu_max": None}, "needs all of"),
        ({"scale": 2.0}, "either scale/offset"),
        ({"raw_max": 6400}, "span more than one value"),
        ({"fault_below": 7000}, "fault_below must be at or below"),
        ({"fault_above": 31000}, "fault_above must be at or above"),
    ],
)
def test_an_inconsistent_range_is_refused(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModbusPoint.model_validate({**LOOP, **change})


def test_a_percent_deadband_is_a_percent_of_the_span_so_it_means_the_same_near_zero() -> None:
    point = ModbusPoint.model_validate({**LOOP, "deadband": 1.0, "deadband_percent": True})

    band = point.report_deadband
    assert band is not None
    assert band.amount == pytest.approx(30.0)  # 1 % of 3000 psi, wherever the value is
    assert band.exceeded(0.0, 31.0)
    assert not band.exceeded(0.0, 29.0)


def test_a_percent_deadband_without_a_span_is_refused() -> None:
    with pytest.raises(ValidationError, match="percent of the EU span"):
        ModbusPoint(well="w", tag="t", table="holding", address=0, deadband=1.0, deadband_percent=True)
