"""What a Sparkplug host application must remember of each edge node: sans-IO, no MQTT here.

Per node (group, node): the bdSeq of its current NBIRTH, the last `seq` (0..255, wrapping, one
counter for the node and all its devices), and the metrics its NBIRTH and each DBIRTH declared,
by alias and by name, with their datatype and the points (site-file targets) each one feeds,
resolved once at birth. `Sessions.receive` takes one decoded message and answers with an
`Outcome`: the samples to report, the points to turn BAD comm_failure (a death), and whether
the node must be asked to rebirth (data before a birth, a seq gap, an unknown alias or device).

A seq gap is answered at once, without the specification's optional reorder window: one MQTT
connection delivers a node's messages in order, so a gap is a lost message, not a late one.
The data that revealed the gap is still used: its values are the node's latest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from app.adapters.sparkplug_payload import BD_SEQ, Metric, Payload, Topic

P = TypeVar("P")
# Resolves (group, node, device or None, metric name) to the points it feeds.
Resolve = Callable[[str, str, str | None, str], Sequence[P]]


@dataclass(frozen=True, slots=True)
class Known(Generic[P]):
    """A metric declared by a birth."""

    name: str
    datatype: int | None
    points: tuple[P, ...]


@dataclass(slots=True)
class _Declared(Generic[P]):
    """The metrics one birth declared."""

    by_alias: dict[int, Known[P]] = field(default_factory=dict)
    by_name: dict[str, Known[P]] = field(default_factory=dict)

    def points(self) -> list[P]:
        return [point for known in self.by_name.values() for point in known.points]


@dataclass(slots=True)
class _Node(Generic[P]):
    bd_seq: int | None
    seq: int | None
    metrics: _Declared[P]
    devices: dict[str, _Declared[P]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Sample(Generic[P]):
    """A metric of a data or birth message and what it feeds."""

    metric: Metric
    known: Known[P]


@dataclass(slots=True)
class Outcome(Generic[P]):
    """What one message means: samples to report, points now lost, and whether to ask for a rebirth (why)."""

    samples: list[Sample[P]] = field(default_factory=list)
    lost: list[P] = field(default_factory=list)
    rebirth: str | None = None
    ignored: str | None = None  # why the message changed nothing (a stale NDEATH)


class Sessions(Generic[P]):
    """Every edge node heard since the last `clear()`.

    Args:
        resolve: the points a metric feeds; called once per metric per birth.
    """

    def __init__(self, resolve: Resolve[P]) -> None:
        self._resolve = resolve
        self._nodes: dict[tuple[str, str], _Node[P]] = {}

    def clear(self) -> None:
        """Forget every node (a new broker session may have missed anything): the next data asks for births."""
        self._nodes.clear()

    def receive(self, topic: Topic, payload: Payload) -> Outcome[P]:
        key = (topic.group, topic.node)
        if topic.kind == "NBIRTH":
            return self._node_birth(topic, payload)
        if topic.kind == "NDEATH":
            return self._node_death(key, payload)
        if topic.kind in ("NCMD", "DCMD"):
            return Outcome(ignored="a command")
        node = self._nodes.get(key)
        if node is None:
            return Outcome(rebirth=f"{topic.kind} before the node's birth")
        outcome: Outcome[P] = Outcome()
        if not _in_sequence(node, payload):
            outcome.rebirth = f"seq {payload.seq} after {node.seq}"
        node.seq = payload.seq
        if topic.kind == "DBIRTH" and topic.device is not None:
            declared = self._declare(topic, payload)
            node.devices[topic.device] = declared
            outcome.samples = _samples(payload, declared)
        elif topic.kind == "DDEATH" and topic.device is not None:
            gone = node.devices.pop(topic.device, None)
            outcome.lost = gone.points() if gone is not None else []
        elif topic.kind == "NDATA":
            self._data(node.metrics, payload, outcome)
        elif topic.kind == "DDATA" and topic.device is not None:
            device = node.devices.get(topic.device)
            if device is None:
                outcome.rebirth = f"DDATA from device {topic.device!r} before its birth"
            else:
                self._data(device, payload, outcome)
        return outcome

    def _node_birth(self, topic: Topic, payload: Payload) -> Outcome[P]:
        key = (topic.group, topic.node)
        declared = self._declare(topic, payload)
        self._nodes[key] = _Node(payload.bd_seq(), payload.seq, declared)
        # A rebirth forgets the devices: each sends its DBIRTH again right after.
        return Outcome(samples=_samples(payload, declared))

    def _node_death(self, key: tuple[str, str], payload: Payload) -> Outcome[P]:
        node = self._nodes.get(key)
        if node is None:
            return Outcome(ignored="NDEATH of a node not born")
        if payload.bd_seq() != node.bd_seq:
            return Outcome(ignored=f"stale NDEATH: bdSeq {payload.bd_seq()}, the birth's is {node.bd_seq}")
        del self._nodes[key]
        return Outcome(lost=_all_points(node))

    def _declare(self, topic: Topic, payload: Payload) -> _Declared[P]:
        declared: _Declared[P] = _Declared()
        for metric in payload.metrics:
            if metric.name is None or (metric.name == BD_SEQ and topic.device is None):
                continue
            points = tuple(self._resolve(topic.group, topic.node, topic.device, metric.name))
            known = Known(metric.name, metric.datatype, points)
            declared.by_name[metric.name] = known
            if metric.alias is not None:
                declared.by_alias[metric.alias] = known
        return declared

    @staticmethod
    def _data(declared: _Declared[P], payload: Payload, outcome: Outcome[P]) -> None:
        for metric in payload.metrics:
            known = _lookup(declared, metric)
            if known is None:
                outcome.rebirth = outcome.rebirth or f"unknown metric {metric.name or metric.alias!r}"
            else:
                outcome.samples.append(Sample(metric, known))


def _lookup(declared: _Declared[P], metric: Metric) -> Known[P] | None:
    if metric.alias is not None and metric.alias in declared.by_alias:
        return declared.by_alias[metric.alias]
    return declared.by_name.get(metric.name) if metric.name is not None else None


def _samples(payload: Payload, declared: _Declared[P]) -> list[Sample[P]]:
    return [
        Sample(metric, declared.by_name[metric.name])
        for metric in payload.metrics
        if metric.name is not None and metric.name in declared.by_name
    ]


def _in_sequence(node: _Node[P], payload: Payload) -> bool:
    if node.seq is None or payload.seq is None:
        return True  # a node that does not number its messages cannot be checked
    return payload.seq == (node.seq + 1) % 256


def _all_points(node: _Node[P]) -> list[P]:
    return node.metrics.points() + [p for device in node.devices.values() for p in device.points()]
