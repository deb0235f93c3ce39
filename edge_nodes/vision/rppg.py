"""Pulse from video by remote photoplethysmography, POS method (Wang et al., IEEE TBME 2017)."""

from __future__ import annotations

from collections import deque

import numpy as np
from numpy.typing import NDArray
from scipy.signal import butter, filtfilt

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


def dominant_bpm(signal: NDArray[np.float64], fs: float) -> float | None:
    """Frequency of the strongest spectral peak inside the pulse band, in bpm."""
    n = signal.shape[0]
    if n < int(fs * 4):
        return None
    nyq = fs / 2
    lo, hi = MIN_BPM / 60 / nyq, min(MAX_BPM / 60 / nyq, 0.99)
    b, a = butter(3, [lo, hi], btype="band")
    filtered = filtfilt(b, a, signal - signal.mean())
    # Zero-pad so the peak is read to a fraction of a bpm, not to 60/window_s bpm bins.
    nfft = max(4096, 1 << int(np.ceil(np.log2(n * 8))))
    spectrum = np.abs(np.fft.rfft(filtered * np.hanning(n), nfft))
    freqs = np.fft.rfftfreq(nfft, 1.0 / fs)
    band = (freqs >= MIN_BPM / 60) & (freqs <= MAX_BPM / 60)
    if not np.any(band) or spectrum[band].max() <= 0:
        return None
    return float(freqs[band][np.argmax(spectrum[band])] * 60.0)


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

    def bpm(self) -> float | None:
        if self.span_s < self.min_s:
            return None
        times = np.array([t for t, _ in self._samples])
        values = np.stack([v for _, v in self._samples])
        return pulse_bpm(resample_uniform(times, values, self.fs), self.fs)
