"""R-peak heart rate recovers the simulated patient's rate from chunked, noisy ECG."""

from __future__ import annotations

import numpy as np
import pytest

from clients.simulator import PatientSimulator
from edge_nodes.scoring.ecg import RPeakDetector

CHUNK_S = 0.04
NS = 1_000_000_000


def _feed_simulated(
    detector: RPeakDetector,
    sim: PatientSimulator,
    seconds: float,
    *,
    start_s: float = 0.0,
    noise_mv: float = 0.0,
    t0_ns: int = 1_700_000_000 * NS,
) -> None:
    fs = sim.ecg_rate_hz
    n = round(CHUNK_S * fs)
    rng = np.random.default_rng(7)
    first = round(start_s / CHUNK_S)
    for i in range(first, first + round(seconds / CHUNK_S)):
        chunk = sim.ecg_chunk(i * n / fs, n)
        if noise_mv:
            t = (i * n + np.arange(n)) / fs
            # White noise (muscle, electronics) and mains hum at 50 Hz.
            hum = noise_mv * np.sin(2 * np.pi * 50 * t)
            chunk = (chunk + rng.normal(0.0, noise_mv, n) + hum).astype(np.float32)
        detector.feed(chunk, t0_ns + round(i * n * NS / fs))


def _true_rate(sim: PatientSimulator, end_s: float, window_s: float = 8.0) -> float:
    times = np.arange(end_s - window_s, end_s, 0.25)
    return float(np.mean([sim.vitals_at(float(t))["heart_rate_bpm"] for t in times]))


@pytest.mark.parametrize("fs", [250.0, 500.0])
@pytest.mark.parametrize("bpm", [50.0, 75.0, 120.0, 160.0])
@pytest.mark.parametrize("noise_mv", [0.0, 0.08])
def test_detector_recovers_simulated_rate_within_2_bpm(
    fs: float, bpm: float, noise_mv: float
) -> None:
    sim = PatientSimulator(seed=11, ecg_rate_hz=fs, heart_rate_bpm=bpm)
    detector = RPeakDetector(fs)
    _feed_simulated(detector, sim, 20.0, noise_mv=noise_mv)
    rate, peaks = detector.heart_rate_bpm()
    assert rate is not None
    assert rate == pytest.approx(_true_rate(sim, 20.0), abs=2.0)
    assert peaks == pytest.approx(bpm * 8 / 60, abs=2)


def test_detector_follows_deteriorating_patient() -> None:
    sim = PatientSimulator("deteriorating", seed=2, ecg_rate_hz=250.0, deterioration_s=60.0)
    detector = RPeakDetector(250.0)
    _feed_simulated(detector, sim, 90.0)
    rate, _ = detector.heart_rate_bpm()
    assert rate == pytest.approx(_true_rate(sim, 90.0), abs=2.0)


def test_flat_line_gives_no_rate() -> None:
    detector = RPeakDetector(500.0)
    for i in range(250):
        detector.feed(np.zeros(20), i * 40_000_000)
    assert detector.heart_rate_bpm() == (None, 0)


def test_low_level_noise_on_a_disconnected_lead_gives_no_rate() -> None:
    detector = RPeakDetector(250.0)
    rng = np.random.default_rng(0)
    for i in range(250):
        detector.feed(rng.normal(0.0, 0.01, 10), i * 40_000_000)
    rate, _ = detector.heart_rate_bpm()
    assert rate is None


def test_no_rate_before_three_seconds() -> None:
    sim = PatientSimulator(seed=1, ecg_rate_hz=250.0, heart_rate_bpm=120.0)
    detector = RPeakDetector(250.0)
    _feed_simulated(detector, sim, 2.8)
    assert detector.heart_rate_bpm()[0] is None
    _feed_simulated(detector, sim, 1.2, start_s=2.8)
    assert detector.heart_rate_bpm()[0] is not None


def test_gap_in_time_resets_the_window() -> None:
    sim = PatientSimulator(seed=1, ecg_rate_hz=250.0, heart_rate_bpm=75.0)
    detector = RPeakDetector(250.0)
    _feed_simulated(detector, sim, 10.0)
    assert detector.heart_rate_bpm()[0] is not None
    # Resume 30 s later: the old 8 s no longer describe the patient.
    detector.feed(sim.ecg_chunk(40.0, 250), 1_700_000_040 * NS)
    assert detector.heart_rate_bpm() == (None, 0)


def test_time_going_backwards_resets_but_a_resent_chunk_is_ignored() -> None:
    sim = PatientSimulator(seed=1, ecg_rate_hz=250.0, heart_rate_bpm=75.0)
    detector = RPeakDetector(250.0)
    t0 = 1_700_000_000 * NS
    _feed_simulated(detector, sim, 10.0, t0_ns=t0)
    before = detector.heart_rate_bpm()
    detector.feed(sim.ecg_chunk(5.0, 10), t0 + 5 * NS)  # a duplicate of held data
    assert detector.heart_rate_bpm() == before
    detector.feed(sim.ecg_chunk(0.0, 10), t0 - 60 * NS)  # clock stepped back
    assert detector.heart_rate_bpm() == (None, 0)


def test_sample_rate_change_resets() -> None:
    sim = PatientSimulator(seed=1, ecg_rate_hz=250.0, heart_rate_bpm=75.0)
    detector = RPeakDetector(250.0)
    _feed_simulated(detector, sim, 10.0)
    detector.feed(np.zeros(20), 1_700_000_010 * NS, sample_rate_hz=500.0)
    assert detector.sample_rate_hz == 500.0
    assert detector.heart_rate_bpm() == (None, 0)


def test_non_finite_samples_reset_instead_of_poisoning_the_filter() -> None:
    sim = PatientSimulator(seed=1, ecg_rate_hz=250.0, heart_rate_bpm=75.0)
    detector = RPeakDetector(250.0)
    t0 = 1_700_000_000 * NS
    detector.feed([float("nan")] * 10, t0)
    _feed_simulated(detector, sim, 10.0, t0_ns=t0)
    rate, _ = detector.heart_rate_bpm()
    assert rate == pytest.approx(_true_rate(sim, 10.0), abs=2.0)


def test_invalid_sample_rate_is_rejected() -> None:
    with pytest.raises(ValueError, match="sample_rate_hz"):
        RPeakDetector(0.0)


def test_timestamp_jitter_and_clock_drift_do_not_reset() -> None:
    sim = PatientSimulator(seed=1, ecg_rate_hz=250.0, heart_rate_bpm=90.0)
    detector = RPeakDetector(250.0)
    rng = np.random.default_rng(3)
    t0 = 1_700_000_000 * NS
    for i in range(500):  # 20 s
        # Stamps from a wall clock 500 ppm off the sample clock, with +-3 ms jitter.
        stamp = t0 + round(i * 0.04 * NS * 1.0005) + int(rng.integers(-3_000_000, 3_000_000))
        detector.feed(sim.ecg_chunk(i * 0.04, 10), stamp)
    rate, peaks = detector.heart_rate_bpm()
    assert rate == pytest.approx(_true_rate(sim, 20.0), abs=2.0)
    assert peaks >= 10


def test_checked_float64_chunks_give_the_same_rate_as_raw_ones() -> None:
    """The edge hands its validated float64 arrays over with finite=True (no second
    conversion or scan): same result as raw float32 chunks."""
    sim = PatientSimulator(seed=5, ecg_rate_hz=250.0, heart_rate_bpm=88.0)
    raw, checked = RPeakDetector(250.0), RPeakDetector(250.0)
    n = round(CHUNK_S * 250.0)
    for i in range(round(12.0 / CHUNK_S)):
        chunk = sim.ecg_chunk(i * n / 250.0, n).astype(np.float32)
        t = 1_700_000_000 * NS + round(i * n * NS / 250.0)
        raw.feed(chunk, t)
        checked.feed(chunk.astype(np.float64), t, finite=True)
    assert raw.heart_rate_bpm() == checked.heart_rate_bpm()
    assert raw.heart_rate_bpm()[0] is not None
