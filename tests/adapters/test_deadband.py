"""ReportByException: which samples are news. Time is passed in, so refreshes need no sleeping."""

from __future__ import annotations

from app.adapters.deadband import Deadband, ReportByException
from app.models import Quality

Sample = tuple[float | None, Quality, float]  # value, quality, now
EXACT = Deadband()  # only an unchanged value is not news


def reported(samples: list[Sample], deadband: Deadband | None = EXACT, refresh_s: float | None = None) -> list[Sample]:
    """The samples one key lets through, in order."""
    news = ReportByException(refresh_s)
    return [sample for sample in samples if news.due("key", *sample[:2], deadband, sample[2])]


def good(*values: float) -> list[Sample]:
    return [(value, "GOOD", float(n)) for n, value in enumerate(values)]


def test_without_a_deadband_only_a_changed_value_is_news() -> None:
    assert reported(good(5.0, 5.0, 5.0, 5.5, 5.5)) == [(5.0, "GOOD", 0.0), (5.5, "GOOD", 3.0)]


def test_an_absolute_deadband_is_measured_from_the_last_reported_value() -> None:
    samples = good(100.0, 105.0, 95.0, 104.0, 106.0, 101.5, 100.9)

    # 105 and 95 are on the band, 104 within it; 106 is past it, and so is 100.9 from 106 (101.5 is not)
    assert [value for value, _, _ in reported(samples, Deadband(5.0))] == [100.0, 106.0, 100.9]


def test_a_slow_drift_is_reported_once_it_adds_up() -> None:
    samples = good(*(10.0 + 0.3 * n for n in range(8)))

    assert [round(value or 0, 1) for value, _, _ in reported(samples, Deadband(1.0))] == [10.0, 11.2]


def test_a_quality_change_is_news_whatever_the_value() -> None:
    samples: list[Sample] = [(7.0, "GOOD", 0), (7.0, "UNCERTAIN", 1), (7.0, "UNCERTAIN", 2), (7.1, "GOOD", 3)]

    assert reported(samples, Deadband(1.0)) == [(7.0, "GOOD", 0), (7.0, "UNCERTAIN", 1), (7.1, "GOOD", 3)]


def test_a_missing_value_differs_from_any_number_but_not_from_another_missing_one() -> None:
    samples: list[Sample] = [(None, "BAD", 0), (None, "BAD", 1), (3.0, "BAD", 2), (None, "BAD", 3)]

    assert reported(samples, Deadband(10.0)) == [(None, "BAD", 0), (3.0, "BAD", 2), (None, "BAD", 3)]


def test_an_unchanged_value_is_reported_again_every_refresh_s() -> None:
    samples: list[Sample] = [(5.0, "GOOD", now) for now in (0.0, 0.5, 0.99, 1.0, 1.5, 1.99, 2.0)]

    assert [now for _, _, now in reported(samples, Deadband(1.0), refresh_s=1.0)] == [0.0, 1.0, 2.0]


def test_a_refresh_counts_from_the_last_report_not_the_last_sample() -> None:
    samples: list[Sample] = [(5.0, "GOOD", 0.0), (9.0, "GOOD", 0.6), (9.0, "GOOD", 1.2), (9.0, "GOOD", 1.6)]

    assert [now for _, _, now in reported(samples, Deadband(1.0), refresh_s=1.0)] == [0.0, 0.6, 1.6]


def test_no_deadband_reports_every_sample() -> None:
    samples = good(5.0, 5.0, 5.0)

    assert reported(samples, None) == samples


def test_keys_are_filtered_apart_and_forget_makes_every_next_sample_news() -> None:
    news = ReportByException()
    assert news.due("a", 1.0, "GOOD", Deadband(), 0)
    assert news.due("b", 1.0, "GOOD", Deadband(), 0)
    assert not news.due("a", 1.0, "GOOD", Deadband(), 1)
    news.forget()
    assert news.due("a", 1.0, "GOOD", Deadband(), 2)
    assert news.due("b", 1.0, "GOOD", Deadband(), 2)
