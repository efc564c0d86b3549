"""Prometheus text exposition read back into samples, with Prometheus's own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

SampleKey = tuple[str, tuple[tuple[str, str], ...]]
Samples = dict[SampleKey, float]


def key(name: str, **labels: str) -> SampleKey:
    return (name, tuple(sorted(labels.items())))


def parse_samples(text: str) -> Samples:
    return {
        key(sample.name, **sample.labels): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 when absent (a counter that never moved may not be there)."""
    return samples.get(key(name, **labels), 0.0)
