"""The simulated patient: scenario NEWS2 trajectories, seamless ECG, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from clients.simulator import PatientSimulator
from edge_nodes.scoring.news2 import LatestVitals, News2Score, SpO2Scale, compute_news2
from edge_nodes.scoring.validation import impossible_reason


def _news2(sim: PatientSimulator, t_s: float) -> News2Score:
    vitals = sim.vitals_at(t_s)
    latest = LatestVitals()
    latest.update(
        device_time_unix_ns=round(t_s * 1e9),
        heart_rate_bpm=vitals["heart_rate_bpm"],
        spo2_percent=vitals["spo2_percent"],
        respiration_rate_bpm=vitals["respiration_rate_bpm"],
        systolic_mmhg=vitals["systolic_mmhg"],
        temperature_c=vitals["temperature_c"],
        consciousness=int(vitals["consciousness"]),
        oxygen_support=int(vitals["oxygen_support"]),
    )
    return compute_news2(latest, SpO2Scale(sim.spo2_scale))


def test_scenarios_are_listed() -> None:
    assert PatientSimulator.scenarios() == ("stable", "deteriorating")


def test_unknown_scenario_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="stable, deteriorating"):
        PatientSimulator("exploding")


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("spo2_scale", [1, 2])
def test_stable_patient_stays_at_news2_two_or_less(seed: int, spo2_scale: int) -> None:
    sim = PatientSimulator("stable", seed=seed, spo2_scale=spo2_scale)
    for t in np.arange(0.0, 600.0, 5.0):
        score = _news2(sim, float(t))
        assert score.complete
        assert score.total <= 2, (t, score)
        v = sim.vitals_at(float(t))
        assert 60 <= v["heart_rate_bpm"] <= 80
        assert 14 <= v["respiration_rate_bpm"] <= 16
        assert 36.6 <= v["temperature_c"] <= 37.0
        if spo2_scale == 1:
            assert 96 <= v["spo2_percent"] <= 99


@pytest.mark.parametrize("seed", [0, 5])
@pytest.mark.parametrize("spo2_scale", [1, 2])
def test_deteriorating_patient_climbs_from_low_to_high(seed: int, spo2_scale: int) -> None:
    sim = PatientSimulator("deteriorating", seed=seed, deterioration_s=180.0, spo2_scale=spo2_scale)
    assert _news2(sim, 0.0).total <= 2
    totals = [_news2(sim, float(t)).total for t in np.arange(0.0, 181.0, 10.0)]
    assert totals[-1] >= 7
    assert max(totals[:6]) < 7  # a climb, not a jump
    # Once high it stays high.
    for t in np.arange(180.0, 900.0, 15.0):
        assert _news2(sim, float(t)).total >= 7


def test_deteriorating_ends_on_oxygen_and_newly_confused() -> None:
    v = PatientSimulator("deteriorating", deterioration_s=100.0).vitals_at(100.0)
    assert v["oxygen_support"] == 2
    assert v["consciousness"] == 2
    assert 124 <= v["heart_rate_bpm"] <= 136
    assert v["systolic_mmhg"] <= 90
    assert 39.0 <= v["temperature_c"] <= 39.6


@pytest.mark.parametrize("scenario", ["stable", "deteriorating"])
def test_vitals_are_always_physiologically_possible(scenario: str) -> None:
    sim = PatientSimulator(scenario, seed=4)
    for t in np.arange(0.0, 400.0, 3.0):
        v = sim.vitals_at(float(t))
        assert set(v) == {
            "heart_rate_bpm",
            "spo2_percent",
            "respiration_rate_bpm",
            "systolic_mmhg",
            "diastolic_mmhg",
            "temperature_c",
            "consciousness",
            "oxygen_support",
        }
        assert impossible_reason(**v) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("fs", [250.0, 500.0])
def test_ecg_chunks_concatenate_to_one_seamless_signal(fs: float) -> None:
    n = round(0.04 * fs)
    chunked = PatientSimulator("deteriorating", seed=3, ecg_rate_hz=fs, deterioration_s=20.0)
    whole = PatientSimulator("deteriorating", seed=3, ecg_rate_hz=fs, deterioration_s=20.0)
    pieces = [chunked.ecg_chunk(i * n / fs, n) for i in range(750)]
    one = whole.ecg_chunk(0.0, 750 * n)
    assert one.dtype == np.float32
    np.testing.assert_array_equal(np.concatenate(pieces), one)


def test_ecg_has_lead_ii_morphology_and_amplitude() -> None:
    sim = PatientSimulator(seed=0, ecg_rate_hz=500.0)
    ecg = sim.ecg_chunk(0.0, 5000)
    assert 1.0 <= float(ecg.max()) <= 1.6  # R waves
    assert -0.6 <= float(ecg.min()) <= -0.1  # S waves
    assert abs(float(np.median(ecg))) < 0.15  # baseline near 0 mV


def test_same_seed_is_deterministic_and_other_seeds_differ() -> None:
    a, b, c = (PatientSimulator("deteriorating", seed=s) for s in (9, 9, 10))
    assert a.vitals_at(42.0) == b.vitals_at(42.0)
    np.testing.assert_array_equal(a.ecg_chunk(3.0, 1000), b.ecg_chunk(3.0, 1000))
    assert not np.array_equal(a.ecg_chunk(3.0, 1000), c.ecg_chunk(3.0, 1000))


def test_ecg_does_not_depend_on_call_order() -> None:
    a, b = PatientSimulator(seed=1), PatientSimulator(seed=1)
    late = a.ecg_chunk(100.0, 250)
    b.ecg_chunk(0.0, 250)
    np.testing.assert_array_equal(b.ecg_chunk(100.0, 250), late)


def test_ecg_after_hours_forgets_old_beats_but_replays_them_identically() -> None:
    fresh = PatientSimulator(seed=6).ecg_chunk(1.0, 500)
    sim = PatientSimulator(seed=6)
    sim.ecg_chunk(1.0, 10)
    for t in range(0, 7200, 30):  # two hours, as a long demo would
        sim.ecg_chunk(float(t), 10)
    assert len(sim._beat_t) < 5000  # bounded, not ~9000 beats
    np.testing.assert_array_equal(sim.ecg_chunk(1.0, 500), fresh)
