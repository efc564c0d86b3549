"""Modbus block reads: which requests one scan sends for a group's points.

A pure function of the points and the limits, so it is tested without a device. Points of one
unit id and one table are sorted by address and coalesced, greedily, into requests of at most
`max_count` registers (or bits): a point joins the request before it when the registers between
them (the gap, read and thrown away) number at most `max_gap` and the request stays within
`max_count`. A point is never split across two requests. Points that overlap (several bits of
one register, two tags on one register) share the read.

Joining across a gap reads registers no point asked for: on a device with holes in its map, a
gap over an undefined register makes the device refuse the whole block (every point of it BAD
`device_error`); `max_gap = 0` joins only adjacent points.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

Table = Literal["holding", "input", "coil", "discrete_input"]
BIT_TABLES: frozenset[Table] = frozenset({"coil", "discrete_input"})
MAX_REGISTERS = 125  # the most one FC3/FC4 request may read (Modbus application protocol, 6.3)
MAX_BITS = 2000  # the most one FC1/FC2 request may read

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Span(Generic[T]):
    """What one point needs read: `count` registers (or bits) from `address` of `table` on `unit`."""

    point: T
    table: Table
    unit: int
    address: int
    count: int

    @property
    def end(self) -> int:
        return self.address + self.count


@dataclass(frozen=True, slots=True)
class Slot(Generic[T]):
    """A point served by a request: its registers (or bit) start at `offset` in the answer."""

    point: T
    offset: int
    count: int


@dataclass(frozen=True, slots=True)
class Request(Generic[T]):
    """One read: `count` registers (or bits) from `start` of `table` on `unit`, serving `slots`."""

    table: Table
    unit: int
    start: int
    count: int
    slots: tuple[Slot[T], ...]


@dataclass(frozen=True, slots=True)
class Limits:
    """The largest request, in registers and in bits, and the largest gap joined over."""

    max_registers: int = MAX_REGISTERS
    max_bits: int = MAX_BITS
    max_gap: int = 10

    def max_count(self, table: Table) -> int:
        return self.max_bits if table in BIT_TABLES else self.max_registers


def plan(spans: Sequence[Span[T]], limits: Limits) -> list[Request[T]]:
    """The requests that read every span, by (unit, table) in first-seen order, then by address.

    Raises:
        ValueError: a span is larger than one request may be.
    """
    by_key: dict[tuple[int, Table], list[Span[T]]] = {}
    for span in spans:
        if span.count > limits.max_count(span.table):
            raise ValueError(f"{span.count} {span.table} values do not fit in one request")
        by_key.setdefault((span.unit, span.table), []).append(span)
    return [request for runs in by_key.values() for request in _coalesce(runs, limits)]


def _coalesce(spans: list[Span[T]], limits: Limits) -> list[Request[T]]:
    """Spans of one unit and table joined into requests (sorted is stable: ties keep the file's order)."""
    ordered = sorted(spans, key=lambda span: span.address)
    max_count = limits.max_count(ordered[0].table)
    runs: list[list[Span[T]]] = [[ordered[0]]]
    start, end = ordered[0].address, ordered[0].end
    for span in ordered[1:]:
        joined_end = max(end, span.end)
        if span.address - end <= limits.max_gap and joined_end - start <= max_count:
            runs[-1].append(span)
            end = joined_end
        else:
            runs.append([span])
            start, end = span.address, span.end
    return [_request(run) for run in runs]


def _request(run: list[Span[T]]) -> Request[T]:
    start = run[0].address
    count = max(span.end for span in run) - start
    slots = tuple(Slot(span.point, span.address - start, span.count) for span in run)
    return Request(run[0].table, run[0].unit, start, count, slots)
