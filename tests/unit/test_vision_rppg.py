"""rPPG by POS on the synthetic face whose skin pulses at a known rate: within 5 bpm."""

from __future__ import annotations

import numpy as np
import pytest

from edge_nodes.vision.analyzer import FrameAnalyzer
from edge_nodes.vision.rppg import (
    MIN_SNR_DB,
    PulseEstimator,
    pos_signal,
    pulse_bpm,
    pulse_spectrum,
    resample_uniform,
)
from edge_nodes.vision.synthetic import SyntheticFace


@pytest.mark.parametrize("true_bpm", [58.0, 75.0, 110.0])
def test_rppg_on_synthetic_pulsing_face_within_5_bpm(true_bpm: float) -> None:
    clip = SyntheticFace(pulse_bpm=true_bpm, seed=int(true_bpm))
    analyzer = FrameAnalyzer(sample_hz=15.0)
    result = None
    # 12 s of a 30 fps clip sampled at 15 fps, as the edge samples a live call.
    for i in range(0, 12 * 30, 2):
        result = analyzer.analyse(clip.frame(i), i / 30.0)
    assert result is not None and result.face_in_view
    assert result.pulse_bpm is not None
    assert abs(result.pulse_bpm - true_bpm) <= 5.0, (result.pulse_bpm, true_bpm)


def analyse_clip(clip: SyntheticFace, seconds: float = 12.0) -> FrameAnalyzer:
    analyzer = FrameAnalyzer(sample_hz=15.0)
    for i in range(0, int(seconds * 30), 2):
        analyzer.analyse(clip.frame(i), i / 30.0)
    return analyzer


def test_a_face_without_a_pulse_gives_no_pulse() -> None:
    # Before the quality gate this clip "had" a pulse of 127.7 bpm: the biggest bin of noise.
    analyzer = analyse_clip(SyntheticFace(pulse_bpm=75.0, seed=1, pulse_gain=0.0))
    result = analyzer.analyse(SyntheticFace(seed=1, pulse_gain=0.0).frame(360), 12.0)
    assert result.face_in_view
    assert result.pulse_bpm is None
    spectrum = analyzer._pulse.spectrum()
    assert spectrum is not None and not spectrum.credible and spectrum.snr_db < MIN_SNR_DB


def test_a_faint_but_real_pulse_passes_the_gate() -> None:
    # A twentieth of the default amplitude (0.05 % of the green level) is still a pulse.
    analyzer = analyse_clip(SyntheticFace(pulse_bpm=66.0, seed=3, pulse_gain=0.05))
    spectrum = analyzer._pulse.spectrum()
    assert spectrum is not None and spectrum.credible, spectrum
    assert abs(spectrum.bpm - 66.0) <= 5.0


def test_colour_noise_alone_is_not_a_pulse() -> None:
    rng = np.random.default_rng(7)
    skin = np.array([200.0, 150.0, 120.0])
    for _ in range(20):
        rgb = skin * (1 + rng.normal(0.0, 0.002, (15 * 10, 3)))
        assert pulse_bpm(rgb, 15.0) is None
        s = pulse_spectrum(pos_signal(rgb, 15.0), 15.0)
        assert s is not None and not s.credible


def test_pos_ignores_a_common_brightness_flicker() -> None:
    # Lighting flicker scales R, G and B together; POS projects it out, the pulse remains.
    fs, n, true_bpm = 15.0, 15 * 12, 80.0
    t = np.arange(n) / fs
    skin = np.array([200.0, 150.0, 120.0])
    pulse = np.outer(np.sin(2 * np.pi * true_bpm / 60 * t), [0.003, 0.01, 0.004])
    flicker = 1 + 0.05 * np.sin(2 * np.pi * 1.9 * t)[:, None]
    rgb = skin * (1 + pulse) * flicker
    bpm = pulse_bpm(rgb, fs)
    assert bpm is not None and abs(bpm - true_bpm) <= 3.0


def test_estimator_waits_for_enough_seconds() -> None:
    est = PulseEstimator(fs=15.0, min_s=6.0)
    for i in range(30):
        est.add(i / 15.0, np.array([200.0, 150.0, 120.0]))
    assert est.bpm() is None


def test_resample_uniform_interpolates_jittered_samples() -> None:
    times = np.array([0.0, 0.09, 0.21, 0.3])
    values = np.stack([times * 10, times * 20, times * 30], axis=1)
    out = resample_uniform(times, values, 10.0)
    assert out.shape == (3, 3)
    np.testing.assert_allclose(out[:, 0], [0.0, 1.0, 2.0], atol=1e-9)
