"""SimulatorAdapter: the demo's field of wells, sampled directly and run against a real sink."""

from __future__ import annotations

import random
from collections.abc import Sequence

import anyio
import pytest

from app.adapters.simulator import PROFILES, SimulatorAdapter, TagProfile, _Signal
from app.models import Reading

pytestmark = pytest.mark.anyio

WELLS = [("acme", "well-01"), ("acme", "well-02"), ("globex", "well-01")]
PROFILE_BY_TAG = {profile.name: profile for profile in PROFILES}


class CollectingSink:
    """A real ReadingSink: keeps every batch it is given; `filled` is set after `want` batches."""

    def __init__(self, want: int = 1) -> None:
        self.batches: list[list[Reading]] = []
        self.want = want
        self.filled = anyio.Event()

    async def submit(self, readings: Sequence[Reading]) -> None:
        self.batches.append(list(readings))
        if len(self.batches) >= self.want:
            self.filled.set()


def comparable(readings: list[Reading]) -> list[tuple[str, str, str, float | None, str]]:
    """Everything of a reading except its wall-clock timestamp."""
    return [(r.tenant_id, r.well_id, r.tag_name, r.value, r.quality) for r in readings]


def test_sample_yields_every_tag_of_every_well_with_units() -> None:
    readings = SimulatorAdapter(WELLS, seed=1).sample()

    assert len(readings) == 4 * len(WELLS)
    assert {(r.tenant_id, r.well_id) for r in readings} == set(WELLS)
    for tenant, well in WELLS:
        tags = {r.tag_name: r.unit for r in readings if (r.tenant_id, r.well_id) == (tenant, well)}
        assert tags == {
            "tubing_pressure": "psi",
            "casing_pressure": "psi",
            "flow_rate": "bbl/d",
            "temperature": "degC",
        }


def test_sampled_readings_are_valid_wire_readings() -> None:
    adapter = SimulatorAdapter(WELLS, name="sim-a", seed=2)

    for reading in adapter.sample():
        assert reading.source_protocol == "simulator"
        assert reading.connection_id == "sim-a"
        assert reading.timestamp.endswith("Z")
        assert reading.quality in {"GOOD", "UNCERTAIN", "BAD"}
        assert (reading.value is None) == (reading.quality == "BAD")
        assert Reading.from_json(reading.to_json()) == reading


def test_one_sample_shares_one_timestamp() -> None:
    readings = SimulatorAdapter(WELLS, seed=3).sample()

    assert len({r.timestamp for r in readings}) == 1


def test_values_stay_within_each_profile_range() -> None:
    adapter = SimulatorAdapter(WELLS, seed=4, bad_ratio=0.0)
    seen: dict[str, list[float]] = {name: [] for name in PROFILE_BY_TAG}

    for _ in range(2000):
        for reading in adapter.sample():
            assert reading.value is not None
            seen[reading.tag_name].append(reading.value)

    for name, values in seen.items():
        profile = PROFILE_BY_TAG[name]
        assert profile.low <= min(values), name
        assert max(values) <= profile.high, name


def test_values_stay_within_range_over_a_long_run() -> None:
    adapter = SimulatorAdapter([("acme", "well-01")], seed=5, bad_ratio=0.0)

    for _ in range(20_000):
        for reading in adapter.sample():
            profile = PROFILE_BY_TAG[reading.tag_name]
            assert reading.value is not None
            assert profile.low <= reading.value <= profile.high


def test_signal_is_clamped_when_drift_and_noise_dwarf_the_range() -> None:
    # The real profiles rarely reach a bound; this one lives on them, so clamping is exercised.
    profile = TagProfile("valve", "%", base=50.0, spread=0.0, drift=500.0, noise=500.0, low=0.0, high=100.0)
    signal = _Signal(profile, level=50.0)
    rng = random.Random(12)

    values = [signal.sample(rng) for _ in range(2000)]

    assert all(0.0 <= value <= 100.0 for value in values)
    assert 0.0 in values
    assert 100.0 in values
    assert 0.0 <= signal.level <= 100.0


def test_bad_ratio_one_makes_every_reading_bad_without_value() -> None:
    adapter = SimulatorAdapter(WELLS, bad_ratio=1.0, seed=6)

    for _ in range(20):
        readings = adapter.sample()
        assert readings
        assert all(r.quality == "BAD" and r.value is None for r in readings)
        assert all(b'"value":null' in r.to_json() for r in readings)


def test_zero_ratios_make_every_reading_good() -> None:
    adapter = SimulatorAdapter(WELLS, bad_ratio=0.0, uncertain_ratio=0.0, seed=7)

    for _ in range(50):
        assert all(r.quality == "GOOD" and r.value is not None for r in adapter.sample())


def test_uncertain_ratio_one_keeps_values() -> None:
    adapter = SimulatorAdapter(WELLS, bad_ratio=0.0, uncertain_ratio=1.0, seed=8)

    readings = adapter.sample()

    assert all(r.quality == "UNCERTAIN" and r.value is not None for r in readings)


def test_same_seed_repeats_the_same_field() -> None:
    first = SimulatorAdapter(WELLS, seed=42, bad_ratio=0.2, uncertain_ratio=0.2)
    second = SimulatorAdapter(WELLS, seed=42, bad_ratio=0.2, uncertain_ratio=0.2)

    for _ in range(100):
        assert comparable(first.sample()) == comparable(second.sample())


def test_different_seeds_give_different_fields() -> None:
    first = SimulatorAdapter(WELLS, seed=1)
    second = SimulatorAdapter(WELLS, seed=2)

    assert comparable(first.sample()) != comparable(second.sample())


def test_no_wells_sample_nothing() -> None:
    assert SimulatorAdapter([], seed=9).sample() == []


async def test_run_submits_batches_to_the_sink() -> None:
    adapter = SimulatorAdapter(WELLS, interval_s=0.01, seed=10)
    sink = CollectingSink(want=5)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(adapter.run, sink)
            await sink.filled.wait()
            tg.cancel_scope.cancel()

    assert len(sink.batches) >= 5
    for batch in sink.batches:
        assert len(batch) == 4 * len(WELLS)
        assert all(isinstance(r, Reading) for r in batch)
        assert {(r.tenant_id, r.well_id) for r in batch} == set(WELLS)


async def test_run_stops_when_cancelled() -> None:
    adapter = SimulatorAdapter(WELLS, interval_s=0.01, seed=11)
    sink = CollectingSink()

    with anyio.fail_after(5):
        with anyio.move_on_after(0.2):
            await adapter.run(sink)
        submitted = len(sink.batches)
        await anyio.sleep(0.1)

    assert submitted >= 1
    assert len(sink.batches) == submitted
