"""The Reporter's verdicts, with time given explicitly: a lost connection and a tag that stopped updating."""

from __future__ import annotations

from app.adapters.base import PointTarget
from app.adapters.reporter import Reporter, Source

STAMP = "2026-12-04T05:00:00.000000Z"
LATER = "2026-12-04T05:00:01.000000Z"


def reporter(stale_after_s: float | None = 3.0) -> tuple[Reporter, PointTarget, PointTarget]:
    a = PointTarget(well="w1", tag="a", unit="psi")
    b = PointTarget(well="w1", tag="b")
    return Reporter(Source("acme", "modbus", "plc"), [a, b], lambda _: stale_after_s), a, b


def test_lost_reports_every_tag_bad_comm_failure_once_and_the_next_sample_is_news() -> None:
    tags, a, _ = reporter()
    tags.sample(a, 5.0, "GOOD", STAMP, now=0)

    lost = tags.lost()
    assert {(r.tag_name, r.value, r.quality, r.reason) for r in lost} == {
        ("a", None, "BAD", "comm_failure"),
        ("b", None, "BAD", "comm_failure"),
    }, "a tag never heard of is lost too: its well must not look fine"
    assert tags.lost() == [], "once per outage"
    back = tags.sample(a, 5.0, "GOOD", LATER, now=10)
    assert back is not None
    assert (back.value, back.quality, back.reason) == (5.0, "GOOD", None)


def test_a_tag_silent_past_its_interval_is_stale_with_its_last_value_and_timestamp() -> None:
    tags, a, b = reporter()
    tags.sample(a, 5.0, "GOOD", STAMP, now=100)
    tags.sample(b, 1.0, "GOOD", STAMP, now=100)
    tags.sample(b, 1.0, "GOOD", LATER, now=102)  # deadbanded away, but heard: not stale

    assert tags.overdue(now=103) == []
    (stale,) = tags.overdue(now=104)
    assert (stale.tag_name, stale.value, stale.quality, stale.reason, stale.timestamp) == (
        "a",
        5.0,
        "UNCERTAIN",
        "stale",
        STAMP,
    )
    assert tags.overdue(now=105) == [], "said once"
    fresh = tags.sample(a, 5.0, "GOOD", LATER, now=106)
    assert fresh is not None, "an unchanged value after stale is news"
    assert fresh.quality == "GOOD"


def test_without_an_expected_interval_a_tag_is_never_stale() -> None:
    tags, a, _ = reporter(stale_after_s=None)
    tags.sample(a, 5.0, "GOOD", STAMP, now=0)

    assert tags.overdue(now=10_000) == []


def test_a_sample_without_a_number_is_bad_device_error() -> None:
    tags, a, _ = reporter()

    reading = tags.sample(a, float("nan"), "GOOD", STAMP, now=0)
    assert reading is not None
    assert (reading.value, reading.quality, reading.reason) == (None, "BAD", "device_error")
