"""One alarm's ISA-18.2 state machine, driven with explicit timestamps (seconds): no clock, no sleep."""

from __future__ import annotations

import json

import pytest

from app.alarms.limits import AlarmSpec
from app.alarms.machine import Alarm, AlarmState, Step, Transition
from app.models import Quality, Reason

HI = AlarmSpec("HI", "medium", 100.0, deadband=5.0, on_delay_s=10.0)


def feed(alarm: Alarm, *samples: tuple[float, float | None]) -> tuple[Alarm, list[Transition]]:
    """GOOD readings (time, value) in order; the alarm after them and every transition they caused."""
    transitions: list[Transition] = []
    for at, value in samples:
        step = alarm.on_reading(value, "GOOD" if value is not None else "BAD", None, at)
        alarm = Alarm(alarm.spec, step.state)
        transitions += step.transitions
    return alarm, transitions


def then(alarm: Alarm, step: Step) -> Alarm:
    return Alarm(alarm.spec, step.state)


def moves(transitions: list[Transition]) -> list[tuple[float, str, str, str]]:
    return [(t.at, t.from_state, t.to_state, t.cause) for t in transitions]


def test_issue_17_a_tag_crossing_hi() -> None:
    """No alarm for a spike shorter than the on-delay; no chatter inside the deadband; return to normal
    unacknowledged, then ack, then normal."""
    alarm, spike = feed(Alarm(HI), (0, 90), (1, 130), (5, 90), (30, 90))
    assert spike == []
    assert alarm.state.name == "normal"

    alarm, crossing = feed(alarm, (40, 101), (45, 104), (50, 102))  # above 100 from 40: active at 50
    assert moves(crossing) == [(50, "normal", "unacknowledged", "activated")]
    assert crossing[0].value == 104  # the value that held until the on-delay ended
    assert (crossing[0].limit, crossing[0].priority) == (100.0, "medium")

    alarm, chatter = feed(alarm, (51, 99), (52, 101), (53, 96), (54, 100.5), (55, 95.5))  # inside 95..100
    assert chatter == []

    alarm, back = feed(alarm, (60, 94.9))
    assert moves(back) == [(60, "unacknowledged", "returned_unacknowledged", "cleared")]

    step = alarm.acknowledge("op-1", 70, "pump restarted")
    assert moves(list(step.transitions)) == [(70, "returned_unacknowledged", "normal", "acknowledged")]
    assert (step.transitions[0].by, step.transitions[0].comment) == ("op-1", "pump restarted")
    assert step.state.name == "normal"


def test_a_tick_raises_the_alarm_when_the_on_delay_ends_without_a_new_reading() -> None:
    alarm, _ = feed(Alarm(HI), (0, 120))

    assert alarm.tick(9.9).transitions == ()
    step = alarm.tick(12)
    assert moves(list(step.transitions)) == [(10, "normal", "unacknowledged", "activated")]
    assert step.state.at == 12


def test_a_value_holds_until_the_next_reading_so_a_late_one_still_raises_at_the_delays_end() -> None:
    _, transitions = feed(Alarm(HI), (0, 120), (15, 80))

    assert moves(transitions) == [
        (10, "normal", "unacknowledged", "activated"),
        (15, "unacknowledged", "returned_unacknowledged", "cleared"),
    ]


def test_the_off_delay_keeps_the_alarm_active_through_a_short_dip() -> None:
    spec = AlarmSpec("HI", "medium", 100.0, off_delay_s=5.0)
    alarm, raised = feed(Alarm(spec), (0, 120))
    assert moves(raised) == [(0, "normal", "unacknowledged", "activated")]

    alarm, dip = feed(alarm, (10, 80), (12, 120))
    assert dip == []
    _, cleared = feed(alarm, (20, 80), (30, 80))
    assert moves(cleared) == [(25, "unacknowledged", "returned_unacknowledged", "cleared")]


def test_acknowledging_twice_is_one_transition_and_acking_normal_is_none() -> None:
    alarm, _ = feed(Alarm(HI), (0, 120), (10, 120))
    first = alarm.acknowledge("op-1", 11)
    second = then(alarm, first).acknowledge("op-2", 12)

    assert moves(list(first.transitions)) == [(11, "unacknowledged", "acknowledged", "acknowledged")]
    assert second.transitions == ()
    assert second.state.name == "acknowledged"
    assert Alarm(HI).acknowledge("op-1", 1).transitions == ()

    _, cleared = feed(then(alarm, second), (20, 50))
    assert moves(cleared) == [(20, "acknowledged", "normal", "cleared")]


def test_a_shelved_alarm_follows_its_condition_silently_and_comes_back_as_it_says() -> None:
    shelved = Alarm(HI).shelve("op-1", until=100, at=0, comment="sensor being replaced")
    assert moves(list(shelved.transitions)) == [(0, "normal", "shelved", "shelved")]
    assert shelved.transitions[0].until == 100

    alarm, quiet = feed(then(Alarm(HI), shelved), (10, 130), (50, 130))
    assert quiet == []
    assert alarm.state.active  # the condition is recorded
    assert alarm.acknowledge("op-1", 60).transitions == ()

    expired = alarm.tick(150)
    assert moves(list(expired.transitions)) == [(100, "shelved", "unacknowledged", "shelve_expired")]
    assert expired.transitions[0].by is None


def test_a_shelve_that_expires_with_the_condition_gone_comes_back_normal() -> None:
    alarm, _ = feed(Alarm(HI), (0, 130), (10, 130))
    alarm = then(alarm, alarm.shelve("op-1", until=50, at=11))
    alarm, quiet = feed(alarm, (20, 50))
    assert quiet == []

    assert moves(list(alarm.tick(60).transitions)) == [(50, "shelved", "normal", "shelve_expired")]


def test_unshelving_and_reshelving_are_operator_transitions() -> None:
    alarm = then(Alarm(HI), Alarm(HI).shelve("op-1", until=100, at=0))
    longer = alarm.shelve("op-1", until=200, at=5)
    assert moves(list(longer.transitions)) == [(5, "shelved", "shelved", "shelved")]
    assert longer.state.shelved_until == 200

    back = then(alarm, longer).unshelve("op-2", 6)
    assert moves(list(back.transitions)) == [(6, "shelved", "normal", "unshelved")]
    assert back.transitions[0].by == "op-2"
    assert Alarm(HI).unshelve("op-2", 6).transitions == ()
    with pytest.raises(ValueError, match="a shelve must end after it starts"):
        Alarm(HI).shelve("op-1", until=5, at=5)


def test_out_of_service_ignores_everything_until_returned_then_starts_normal() -> None:
    alarm, _ = feed(Alarm(HI), (0, 130), (10, 130))
    removed = alarm.remove_from_service("op-1", 11, "transmitter removed")
    assert moves(list(removed.transitions)) == [(11, "unacknowledged", "out_of_service", "removed_from_service")]

    alarm, ignored = feed(then(alarm, removed), (20, 50), (30, 60))
    assert ignored == []
    assert (alarm.state.value, alarm.state.raw) == (130, True), "readings out of service are not even recorded"
    for action in (alarm.acknowledge("op-1", 61), alarm.shelve("op-1", 100, 61), alarm.tick(100)):
        assert action.transitions == ()
        assert action.state.name == "out_of_service"

    returned = alarm.return_to_service("op-1", 70)
    assert moves(list(returned.transitions)) == [(70, "out_of_service", "normal", "returned_to_service")]
    _, fresh = feed(then(alarm, returned), (71, 130), (81, 130))  # judged afresh: the on-delay counts from 71
    assert moves(fresh) == [(81, "normal", "unacknowledged", "activated")]


def test_hihi_and_hi_are_both_active_above_hihi() -> None:
    hihi, hi = Alarm(AlarmSpec("HIHI", "critical", 150.0)), Alarm(AlarmSpec("HI", "medium", 100.0))

    _, hihi_moves = feed(hihi, (0, 160))
    _, hi_moves = feed(hi, (0, 160))
    assert [(t.to_state, t.priority, t.limit) for t in hihi_moves + hi_moves] == [
        ("unacknowledged", "critical", 150.0),
        ("unacknowledged", "medium", 100.0),
    ]


def test_low_limits_raise_at_or_below_and_clear_above_the_deadband() -> None:
    lo = Alarm(AlarmSpec("LO", "medium", 10.0, deadband=2.0))
    _, transitions = feed(lo, (0, 10), (1, 11.9), (2, 12.1))

    assert moves(transitions) == [
        (0, "normal", "unacknowledged", "activated"),
        (2, "unacknowledged", "returned_unacknowledged", "cleared"),
    ]


@pytest.mark.parametrize(("quality", "reason"), [("BAD", "device_error"), ("BAD", "out_of_range"), ("BAD", None)])
def test_a_reading_without_a_value_neither_raises_nor_clears_a_limit(quality: Quality, reason: Reason | None) -> None:
    active, _ = feed(Alarm(AlarmSpec("HI", "medium", 100.0)), (0, 120))
    step = active.on_reading(50.0, quality, reason, 5)  # a BAD reading's value, if any, is not trusted
    assert step.transitions == ()
    assert step.state.name == "unacknowledged"
    assert step.state.value == 120  # the last known value

    pending, _ = feed(Alarm(HI), (0, 120))  # on-delay 10 running
    after_bad = then(pending, pending.on_reading(None, quality, reason, 5))
    assert after_bad.tick(100).transitions == (), "an unknown value cancels the pending on-delay"


def test_an_uncertain_reading_is_judged_by_its_value() -> None:
    alarm = Alarm(AlarmSpec("HI", "medium", 100.0))

    step = alarm.on_reading(120, "UNCERTAIN", "stale", 0)

    assert moves(list(step.transitions)) == [(0, "normal", "unacknowledged", "activated")]


def test_comms_is_raised_by_device_loss_and_cleared_by_the_next_reading_that_is_not() -> None:
    comms = Alarm(AlarmSpec("COMMS", "high"))
    sequence: list[tuple[float | None, Quality, Reason | None, float]] = [
        (50.0, "GOOD", None, 0),
        (None, "BAD", "device_error", 1),  # a bad point is not a lost device
        (None, "BAD", "comm_failure", 2),
        (None, "UNCERTAIN", "comm_failure", 3),  # OPC-UA's last usable value: still no communication
        (50.0, "UNCERTAIN", "stale", 4),
    ]
    transitions: list[Transition] = []
    for value, quality, reason, at in sequence:
        step = comms.on_reading(value, quality, reason, at)
        comms, transitions = then(comms, step), transitions + list(step.transitions)

    assert moves(transitions) == [
        (2, "normal", "unacknowledged", "activated"),
        (4, "unacknowledged", "returned_unacknowledged", "cleared"),
    ]
    assert transitions[0].limit is None
    silent = Alarm(AlarmSpec("COMMS", "high")).on_reading(5.0, "UNCERTAIN", "comm_failure", 0)
    assert silent.transitions == ()


def test_a_discrete_alarm_is_active_while_the_state_has_its_value() -> None:
    tripped = Alarm(AlarmSpec("DISCRETE:tripped", "high", 2.0))
    _, transitions = feed(tripped, (0, 1), (1, 2), (2, 2.0000000000001), (3, 1))

    assert moves(transitions) == [
        (1, "normal", "unacknowledged", "activated"),
        (3, "unacknowledged", "returned_unacknowledged", "cleared"),
    ]


def test_time_never_runs_backwards() -> None:
    alarm, _ = feed(Alarm(AlarmSpec("HI", "medium", 100.0)), (10, 50))

    step = alarm.on_reading(120, "GOOD", None, 5)

    assert moves(list(step.transitions)) == [(10, "normal", "unacknowledged", "activated")]


def test_the_state_survives_a_json_round_trip() -> None:
    alarm, _ = feed(Alarm(HI), (0, 120), (10, 120), (11, 50))
    alarm = then(alarm, alarm.shelve("op-1", until=100, at=12))

    stored = json.dumps(alarm.state.to_dict())
    restored = AlarmState.from_dict(json.loads(stored))

    assert restored == alarm.state
    assert Alarm(HI, restored).tick(200) == alarm.tick(200)
    transition = alarm.tick(200).transitions[0]
    assert Transition.model_validate(json.loads(json.dumps(transition.model_dump(mode="json")))) == transition
