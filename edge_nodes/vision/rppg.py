"""Pulse from video by remote photoplethysmography, POS method (Wang et al., IEEE TBME 2017)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.signal import butter, filtfilt, find_peaks

# Plausible human pulse, 42-240 bpm: the band-pass and the spectral peak search both use it.
MIN_BPM = 42.0
MAX_BPM = 240.0
# POS projection axes: orthogonal to the skin-tone direction, so specular and intensity changes
# cancel and the blood-volume pulse remains (paper, eq. 6).
POS_PROJECTION = np.array([[0.0, 1.0, -1.0], [-2.0, 1.0, 1.0]])


def pos_signal(rgb: NDArray[np.float64], fs: float, window_s: float = 1.6) -> NDArray[np.float64]:
    """The POS pulse signal from uniformly sampled mean skin colours, shape (N, 3) as R, G, B."""
    n = rgb.shape[0]
    win = max(2, round(window_s * fs))
    h = np.zeros(n)
    if n < win:
        return h
    for start in range(0, n - win + 1):
        c = rgb[start : start + win].T  # 3 x win
        mean = c.mean(axis=1, keepdims=True)
        if np.any(mean <= 0):
            continue
        cn = c / mean  # temporal normalisation removes the skin tone itself
        s = POS_PROJECTION @ cn
        std1 = s[1].std()
        alpha = s[0].std() / std1 if std1 > 0 else 0.0
        p = s[0] + alpha * s[1]
        h[start : start + win] += p - p.mean()  # overlap-add
    return h


@dataclass(frozen=True)
class PulseSpectrum:
    """The strongest periodicity in the pulse band and how clearly it stands out."""

    bpm: float
    # de Haan & Jeanne (IEEE TBME 2013): power within +-SNR_HALF_WIDTH_BPM of the peak and of
    # its first harmonic against all other power in the band, in dB.
    snr_db: float
    # Power of the peak over the strongest other peak (not the peak's harmonic or half).
    prominence: float

    @property
    def credible(self) -> bool:
        """A real periodic signal, not a pick of the biggest noise bin (see MIN_SNR_DB)."""
        return self.snr_db >= MIN_SNR_DB and self.prominence >= MIN_PROMINENCE


# Quality gate. Measured on 12 s windows at 15 fps (tests/unit/test_vision_rppg.py): the
# synthetic face pulsing at 1 % gives ~10 dB and a prominence in the hundreds, at 0.05 %
# (a twentieth of that) still 6 dB / 26; the same face with no pulse at all -0.7 dB / 3.8 (its
# biggest "peak" is the synthetic noise bank repeating, an artefact at 128 bpm); white noise on
# the colour means -4 to -8 dB / 1-3. POS on real webcam faces reports a few dB and up.
MIN_SNR_DB = 3.0
MIN_PROMINENCE = 4.0
SNR_HALF_WIDTH_BPM = 6.0


def pulse_spectrum(signal: NDArray[np.float64], fs: float) -> PulseSpectrum | None:
    """The pulse-band spectrum's peak with its quality, or None if the signal is too short."""
    n = signal.shape[0]
    if n < int(fs * 4):
        return None
    nyq = fs / 2
    lo, hi = MIN_BPM / 60 / nyq, min(MAX_BPM / 60 / nyq, 0.99)
    b, a = butter(3, [lo, hi], btype="band")
    filtered = filtfilt(b, a, signal - signal.mean())
    # Zero-pad so the peak is read to a fraction of a bpm, not to 60/window_s bpm bins.
    nfft = max(4096, 1 << int(np.ceil(np.log2(n * 8))))
    power = np.abs(np.fft.rfft(filtered * np.hanning(n), nfft)) ** 2
    bpms = np.fft.rfftfreq(nfft, 1.0 / fs) * 60.0
    band = (bpms >= MIN_BPM) & (bpms <= MAX_BPM)
    if not np.any(band) or power[band].max() <= 0:
        return None
    p, f = power[band], bpms[band]
    top = int(np.argmax(p))
    peak = float(f[top])
    related = (np.abs(f - peak) <= SNR_HALF_WIDTH_BPM) | (
        np.abs(f - 2 * peak) <= SNR_HALF_WIDTH_BPM
    )
    rest = float(p[~related].sum())
    snr_db = 10 * np.log10(float(p[related].sum()) / rest) if rest > 0 else np.inf
    peaks, _ = find_peaks(p)
    others = [
        float(p[i])
        for i in peaks
        if all(abs(f[i] - k * peak) > SNR_HALF_WIDTH_BPM for k in (0.5, 1.0, 2.0))
    ]
    prominence = float(p[top]) / max(others) if others and max(others) > 0 else np.inf
    return PulseSpectrum(peak, float(snr_db), prominence)


def dominant_bpm(signal: NDArray[np.float64], fs: float) -> float | None:
    """Frequency of the strongest spectral peak inside the pulse band, in bpm, when that peak is
    a credible pulse (PulseSpectrum.credible); None otherwise."""
    spectrum = pulse_spectrum(signal, fs)
    return spectrum.bpm if spectrum is not None and spectrum.credible else None


def resample_uniform(
    times_s: NDArray[np.float64], values: NDArray[np.float64], fs: float
) -> NDArray[np.float64]:
    """Linear interpolation onto a uniform grid: sampled frames arrive with jitter."""
    grid = np.arange(times_s[0], times_s[-1], 1.0 / fs)
    return np.stack(
        [np.interp(grid, times_s, values[:, k]) for k in range(values.shape[1])], axis=1
    )


def pulse_bpm(rgb: NDArray[np.float64], fs: float) -> float | None:
    """Pulse rate in bpm from uniformly sampled mean skin RGB (N x 3), or None if too short."""
    return dominant_bpm(pos_signal(rgb, fs), fs)


class PulseEstimator:
    """Keeps the last window_s of (time, mean skin RGB) and estimates the pulse from them."""

    def __init__(self, window_s: float = 10.0, fs: float = 15.0, min_s: float = 6.0) -> None:
        self.window_s = window_s
        self.fs = fs
        self.min_s = min_s
        self._samples: deque[tuple[float, NDArray[np.float64]]] = deque()

    def add(self, t_s: float, rgb: NDArray[np.float64]) -> None:
        if self._samples and t_s <= self._samples[-1][0]:
            return
        self._samples.append((t_s, rgb))
        while self._samples and t_s - self._samples[0][0] > self.window_s:
            self._samples.popleft()

    def reset(self) -> None:
        # A lost face means the region moved: old colours no longer describe the same skin.
        self._samples.clear()

    @property
    def span_s(self) -> float:
        return self._samples[-1][0] - self._samples[0][0] if len(self._samples) > 1 else 0.0

    def spectrum(self) -> PulseSpectrum | None:
        """The window's pulse spectrum (credible or not), None until min_s of samples."""
        if self.span_s < self.min_s:
            return None
        times = np.array([t for t, _ in self._samples])
        values = np.stack([v for _, v in self._samples])
        rgb = resample_uniform(times, values, self.fs)
        return pulse_spectrum(pos_signal(rgb, self.fs), self.fs)

    def bpm(self) -> float | None:
        """The pulse, or None: too few seconds yet, or no credible periodic signal in them."""
        s = self.spectrum()
        return s.bpm if s is not None and s.credible else None
