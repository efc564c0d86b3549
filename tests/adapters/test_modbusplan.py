"""The block-read planner on its own: points in, requests out, no device."""

from __future__ import annotations

import pytest

from app.adapters.modbusplan import Limits, Request, Span, Table, plan


def span(name: str, address: int, count: int = 1, table: Table = "holding", unit: int = 1) -> Span[str]:
    return Span(name, table, unit, address, count)


def shape(requests: list[Request[str]]) -> list[tuple[str, int, int, int]]:
    return [(request.table, request.unit, request.start, request.count) for request in requests]


def test_500_adjacent_registers_are_4_requests_of_at_most_125() -> None:
    requests = plan([span(f"p{n}", n) for n in range(500)], Limits())

    assert shape(requests) == [("holding", 1, start, 125) for start in (0, 125, 250, 375)]
    assert [slot.offset for slot in requests[1].slots] == list(range(125))
    assert requests[1].slots[0].point == "p125"


def test_a_gap_over_max_gap_splits_and_a_gap_within_it_joins() -> None:
    spans = [span("a", 0), span("b", 11), span("c", 23, 2)]  # gaps of 10, then 11

    requests = plan(spans, Limits(max_gap=10))

    assert shape(requests) == [("holding", 1, 0, 12), ("holding", 1, 23, 2)]
    assert [(slot.point, slot.offset, slot.count) for slot in requests[0].slots] == [("a", 0, 1), ("b", 11, 1)]


def test_max_gap_zero_joins_only_adjacent_points() -> None:
    requests = plan([span("a", 0), span("b", 1, 2), span("c", 4)], Limits(max_gap=0))

    assert shape(requests) == [("holding", 1, 0, 3), ("holding", 1, 4, 1)]


def test_a_point_never_straddles_two_requests() -> None:
    spans = [span(f"p{n}", n) for n in range(124)] + [span("float64", 124, 4)]

    requests = plan(spans, Limits())

    assert shape(requests) == [("holding", 1, 0, 124), ("holding", 1, 124, 4)]
    assert [(slot.point, slot.offset, slot.count) for slot in requests[1].slots] == [("float64", 0, 4)]


def test_units_and_tables_are_read_apart_in_first_seen_order() -> None:
    spans = [
        span("h2", 0, unit=2),
        span("h1", 1),
        span("i1", 2, table="input"),
        span("h1b", 0),
        span("c1", 3, table="coil"),
        span("d1", 3, table="discrete_input"),
    ]

    assert shape(plan(spans, Limits())) == [
        ("holding", 2, 0, 1),
        ("holding", 1, 0, 2),
        ("input", 1, 2, 1),
        ("coil", 1, 3, 1),
        ("discrete_input", 1, 3, 1),
    ]


def test_points_on_one_register_share_its_read() -> None:
    spans = [span("bit3", 7), span("word", 7), span("bit0", 7), span("next", 8)]

    (request,) = plan(spans, Limits(max_gap=0))

    assert (request.start, request.count) == (7, 2)
    assert [(slot.point, slot.offset) for slot in request.slots] == [("bit3", 0), ("word", 0), ("bit0", 0), ("next", 1)]


def test_bits_are_limited_by_max_bits_and_registers_by_max_registers() -> None:
    coils = [span(f"c{n}", n, table="coil") for n in range(2500)]
    registers = [span(f"r{n}", n) for n in range(10)]

    requests = plan(coils + registers, Limits(max_registers=4, max_bits=2000))

    assert shape(requests) == [
        ("coil", 1, 0, 2000),
        ("coil", 1, 2000, 500),
        ("holding", 1, 0, 4),
        ("holding", 1, 4, 4),
        ("holding", 1, 8, 2),
    ]


def test_a_point_larger_than_a_request_is_refused() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        plan([span("float64", 0, 4)], Limits(max_registers=2))
