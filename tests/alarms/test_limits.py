"""A tag's alarm limits: what the site file may say, what it refuses, and what each alarm is called."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from app.alarms.limits import AlarmKey, AlarmSpec, TagAlarms, alarm_id
from app.models import is_valid_id


def refused(**fields: Any) -> str:
    with pytest.raises(ValidationError) as error:
        TagAlarms.model_validate(fields)
    return str(error.value)


def test_a_bare_number_is_a_limit_with_the_default_priority_and_the_tags_defaults() -> None:
    alarms = TagAlarms.model_validate({"hihi": 100, "hi": {"value": 90, "priority": "high", "deadband": 1}, "lo": 10})
    alarms = alarms.model_copy(update={"deadband": 2.0, "on_delay_s": 5.0})

    assert [spec.kind for spec in alarms.specs()] == ["HIHI", "HI", "LO", "COMMS"]
    hihi, hi, lo, comms = alarms.specs()
    assert hihi == AlarmSpec("HIHI", "high", 100.0, deadband=2.0, on_delay_s=5.0)
    assert hi == AlarmSpec("HI", "high", 90.0, deadband=1.0, on_delay_s=5.0)
    assert lo.priority == "medium"
    assert comms == AlarmSpec("COMMS", "high")


def test_comms_may_be_off_or_take_a_priority() -> None:
    assert [s.kind for s in TagAlarms(comms=False).specs()] == []
    assert TagAlarms(comms="critical").specs() == [AlarmSpec("COMMS", "critical")]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"hi": 120, "hihi": 100}, "hi 120 is above hihi 100: limits rise lolo < lo < hi < hihi"),
        ({"lo": 50, "hi": 50}, "lo 50 is equal to hi 50"),
        ({"lolo": 20, "lo": 10, "hi": 90}, "lolo 20 is above lo 10"),
        ({"lolo": 20, "hi": 10}, "lolo 20 is above hi 10"),
    ],
)
def test_limits_out_of_order_are_refused_naming_both(fields: dict[str, Any], message: str) -> None:
    assert message in refused(**fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"hi": 95, "hihi": 100, "deadband": 5},
            "the deadband of hihi (5) must be smaller than the gap between hi 95 and hihi 100 (5)",
        ),
        (
            {"lo": 10, "hi": 20, "deadband": 5},
            "the deadbands of lo (5) and hi (5) must be smaller than the gap between lo 10 and hi 20 (10)",
        ),
        ({"lolo": 0, "lo": {"value": 3, "deadband": 1}, "deadband": 3}, "the deadband of lolo (3) must be smaller"),
    ],
)
def test_a_deadband_reaching_past_the_next_limit_is_refused(fields: dict[str, Any], message: str) -> None:
    assert message in refused(**fields)


def test_a_deadband_reaching_away_from_the_next_limit_is_fine() -> None:
    # hi's deadband reaches down, away from hihi; lo's reaches up, away from lolo
    alarms = TagAlarms.model_validate({"lolo": 0, "lo": {"value": 1, "deadband": 50}, "hi": 99, "hihi": 100})

    assert len(alarms.specs()) == 5


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"hi": float("nan")}, "hi.value"),
        ({"hi": {"value": float("inf")}}, "hi.value"),
        ({"on_delay_s": -1}, "on_delay_s"),
        ({"hi": {"value": 1, "off_delay_s": -0.5}}, "hi.off_delay_s"),
        ({"deadband": -1}, "deadband"),
        ({"hi": {"value": 1, "priority": 1}}, "hi.priority"),
        ({"hi": {"value": 1, "colour": "red"}}, "Extra inputs"),
        ({"discrete": [{"name": "a.b", "value": 1}]}, "discrete.0.name"),
    ],
)
def test_numbers_must_be_finite_delays_non_negative_and_fields_known(fields: dict[str, Any], message: str) -> None:
    assert message in refused(**fields)


def test_discrete_alarms_name_a_state_each_and_stand_alone() -> None:
    alarms = TagAlarms.model_validate(
        {"discrete": [{"name": "tripped", "value": 2, "priority": "high"}, {"name": "open", "value": 1}]}
    )

    assert [(s.kind, s.setpoint, s.priority) for s in alarms.specs()] == [
        ("DISCRETE:tripped", 2.0, "high"),
        ("DISCRETE:open", 1.0, "medium"),
        ("COMMS", None, "high"),
    ]
    twice = [{"name": "a", "value": 1}, {"name": "a", "value": 2}, {"name": "b", "value": 2}]
    message = refused(discrete=twice, hi=5)
    assert "discrete alarm names must be unique: a" in message
    assert "discrete alarm values must be unique: 2" in message
    assert "discrete alarms are for a tag whose value is a state: not with hihi, hi, lo or lolo" in message


def test_an_alarm_id_is_readable_and_fits_the_id_pattern() -> None:
    assert alarm_id("well-01", "tubing_pressure", "HIHI") == "well-01.tubing_pressure.HIHI"
    assert AlarmKey("acme", "well-01", "door", "DISCRETE:open").id == "well-01.door.DISCRETE-open"


def test_an_alarm_id_that_would_be_ambiguous_or_too_long_is_hashed_and_never_meets_a_readable_one() -> None:
    dotted = {alarm_id("a.b", "c", "HI"), alarm_id("a", "b.c", "HI")}
    long = alarm_id("w" * 64, "t" * 64, "DISCRETE:" + "n" * 24)

    assert len(dotted | {alarm_id("a", "b", "HI")}) == 3
    assert all(i.count(".") == 0 and i.startswith("HI-") for i in dotted)
    assert long.startswith("DISCRETE-" + "n" * 24 + "-")
    assert all(is_valid_id(i) for i in (*dotted, long))
    assert alarm_id("w" * 64, "t" * 64, "HI") != alarm_id("w" * 64, "t" * 63, "HI")
