"""A simulated patient: deterministic vital signs and a synthetic ECG lead II for a scenario."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

_SCENARIOS = ("stable", "deteriorating")

# ECGSYN (McSharry et al. 2003) waves P, Q, R, S, T: angle in the cycle (rad) and
# Gaussian width (rad), turned into seconds at 60 bpm by dividing by 2*pi. Amplitudes
# are in mV for a direct sum of Gaussians (no ODE), picked so R peaks at ~1.0-1.5 mV.
_WAVE_ANGLE = np.array([-math.pi / 3, -math.pi / 12, 0.0, math.pi / 12, math.pi / 2])
_WAVE_WIDTH = np.array([0.25, 0.1, 0.1, 0.1, 0.4])
_WAVE_AMP_MV = np.array([0.15, -0.12, 1.0, -0.25, 0.3])
# ECGSYN stretches P and T less than Q and S with heart rate (exponent on sqrt(hr/60)).
_ANGLE_EXP = np.array([0.5, 1.0, 0.0, 1.0, 0.5])

# Each sample sums the beats at these offsets from the next beat at or after it, in a
# fixed order, so a sample's value never depends on how the signal was chunked.
_BEAT_OFFSETS = np.array([-2, -1, 0, 1])
_NOISE_TABLE_LEN = 65521  # prime, so the repeating noise never lines up with the beat
_BEAT_MARGIN_S = 10.0  # the two beats before any sample lie within this (rate >= 16/min)
_MAX_HELD_BEATS = 4096
_FIRST_BEAT_S = -8.0  # beats before t=0 so the first samples already show a steady rhythm


def _smoothstep(x: float) -> float:
    x = min(max(x, 0.0), 1.0)
    return x * x * (3.0 - 2.0 * x)


class PatientSimulator:
    """A patient whose vitals follow a scenario and whose ECG follows those vitals."""

    def __init__(
        self,
        scenario: str = "stable",
        seed: int = 0,
        ecg_rate_hz: float = 250.0,
        deterioration_s: float = 180.0,
        spo2_scale: int = 1,
        *,
        heart_rate_bpm: float | None = None,
    ) -> None:
        """`heart_rate_bpm` pins the baseline pulse (detector tests, brady/tachy demos)."""
        if scenario not in _SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r}; allowed: {', '.join(_SCENARIOS)}")
        if not (math.isfinite(ecg_rate_hz) and ecg_rate_hz > 0):
            raise ValueError(f"ecg_rate_hz={ecg_rate_hz} must be a positive number")
        if not (math.isfinite(deterioration_s) and deterioration_s > 0):
            raise ValueError(f"deterioration_s={deterioration_s} must be a positive number")
        if spo2_scale not in (1, 2):
            raise ValueError(f"spo2_scale={spo2_scale} must be 1 or 2")
        if heart_rate_bpm is not None and not 20.0 <= heart_rate_bpm <= 250.0:
            raise ValueError(f"heart_rate_bpm={heart_rate_bpm} must be within 20-250")
        self.scenario = scenario
        self.seed = seed
        self.ecg_rate_hz = float(ecg_rate_hz)
        self.deterioration_s = float(deterioration_s)
        self.spo2_scale = spo2_scale
        self._base_hr = 70.0 if heart_rate_bpm is None else float(heart_rate_bpm)

        rng = np.random.default_rng(seed)
        # Slow drifts (periods of minutes) give physiological variation that is smooth
        # and a pure function of time, so vitals_at is deterministic and order-free.
        self._drift_period_s = rng.uniform(90.0, 300.0, size=(8, 2))
        self._drift_phase = rng.uniform(0.0, 2 * math.pi, size=(8, 2))
        self._resp_hz = 15.0 / 60.0
        self._r_amp_mv = float(rng.uniform(1.05, 1.35))
        self._wander_phase = rng.uniform(0.0, 2 * math.pi, size=2)
        self._noise = rng.standard_normal(_NOISE_TABLE_LEN) * 0.012
        self._restart_beats()

    @staticmethod
    def scenarios() -> tuple[str, ...]:
        """The scenario names the constructor accepts."""
        return _SCENARIOS

    # ---- vital signs -------------------------------------------------------------

    def _drift(self, row: int, t_s: float) -> float:
        """A smooth value in [-1, 1] for parameter `row`."""
        p, ph = self._drift_period_s[row], self._drift_phase[row]
        return 0.6 * math.sin(2 * math.pi * t_s / p[0] + ph[0]) + 0.4 * math.sin(
            2 * math.pi * t_s / p[1] + ph[1]
        )

    def _progress(self, t_s: float) -> float:
        if self.scenario != "deteriorating":
            return 0.0
        return _smoothstep(t_s / self.deterioration_s)

    def _heart_rate(self, t_s: float, p: float) -> float:
        return self._base_hr + p * (130.0 - self._base_hr) + (4.0 - p) * self._drift(0, t_s)

    def vitals_at(self, t_s: float) -> dict[str, float | int]:
        """The spot reading at `t_s` seconds from the start, rounded as devices report."""
        p = self._progress(t_s)
        d = self._drift
        hr = self._heart_rate(t_s, p)
        rr = 15.0 + p * 11.0 + 0.9 * d(1, t_s)
        if self.spo2_scale == 2:
            # A hypercapnic patient kept at 88-92 %, falling to ~85 before oxygen.
            base_spo2, low_spo2, on_o2_spo2 = 90.0, 85.0, 87.0
        else:
            base_spo2, low_spo2, on_o2_spo2 = 97.5, 90.0, 92.0
        # Oxygen is started once saturation has fallen, and lifts it only partly.
        on_oxygen = p >= 0.75
        if on_oxygen:
            spo2 = low_spo2 + (on_o2_spo2 - low_spo2) * (p - 0.75) / 0.25
        else:
            spo2 = base_spo2 + (low_spo2 - base_spo2) * min(p / 0.7, 1.0)
        spo2 += (1.2 - p) * d(2, t_s)
        sbp = 120.0 - p * 32.0 + (5.0 - 3.0 * p) * d(3, t_s)
        dbp = 76.0 - p * 26.0 + 3.0 * d(4, t_s)
        temp = 36.8 + p * 2.5 + 0.18 * d(5, t_s)
        confused = p >= 0.9
        return {
            "heart_rate_bpm": round(hr, 1),
            "spo2_percent": float(min(100, round(spo2))),
            "respiration_rate_bpm": float(round(rr)),
            "systolic_mmhg": float(round(sbp)),
            "diastolic_mmhg": float(round(dbp)),
            "temperature_c": round(temp, 1),
            "consciousness": 2 if confused else 1,
            "oxygen_support": 2 if on_oxygen else 1,
        }

    # ---- ECG ---------------------------------------------------------------------

    def _restart_beats(self) -> None:
        # The beat sequence has its own random stream, consumed one draw per beat in
        # order, so the same seed always gives the same beats however they are asked for.
        self._beat_rng = np.random.default_rng([self.seed, 1])
        self._beat_t: list[float] = [_FIRST_BEAT_S]
        self._beat_rr: list[float] = [60.0 / self._base_hr]
        self._beat_arrays: tuple[npt.NDArray[np.float64], ...] | None = None

    def _prepare_beats(self, t_start_s: float, t_end_s: float) -> None:
        """Hold the beats around [t_start_s, t_end_s]; memory stays bounded over hours."""
        if self._beat_t[0] > t_start_s - _BEAT_MARGIN_S and self._beat_t[0] != _FIRST_BEAT_S:
            self._restart_beats()  # asked for a time already forgotten: replay from the seed
        if self._beat_t[-1] <= t_end_s + 3.0:
            # Generate well ahead so the table below is rebuilt rarely.
            self._extend_beats(t_end_s + 30.0)
        if len(self._beat_t) > _MAX_HELD_BEATS:
            keep = np.searchsorted(self._beat_t, t_start_s - 60.0)
            if keep > 0:
                del self._beat_t[:keep]
                del self._beat_rr[:keep]
                self._beat_arrays = None

    def _extend_beats(self, until_s: float) -> None:
        beat_t, beat_rr = self._beat_t, self._beat_rr
        while beat_t[-1] <= until_s:
            t = beat_t[-1]
            hr = self._heart_rate(max(t, 0.0), self._progress(max(t, 0.0)))
            # Respiratory sinus arrhythmia plus a little jitter; both shrink as the
            # rate rises, as real heart-rate variability does.
            hrv = (60.0 / hr) * (
                0.02 * math.sin(2 * math.pi * self._resp_hz * t)
                + 0.006 * float(self._beat_rng.standard_normal())
            )
            rr = 60.0 / hr * (1.0 + hrv)
            beat_t.append(t + rr)
            beat_rr.append(rr)
        self._beat_arrays = None

    def _beat_table(self) -> tuple[npt.NDArray[np.float64], ...]:
        """R times of held beats, and per beat and wave: centre, -1/(2 sigma^2), amplitude."""
        if self._beat_arrays is None:
            times = np.asarray(self._beat_t, dtype=np.float64)
            # Wave timing follows the preceding R-R interval, as the QT interval does.
            rr = np.asarray(self._beat_rr, dtype=np.float64)
            hr_factor = np.sqrt(1.0 / rr)  # ECGSYN's sqrt(hr/60), hr = 60/rr
            cycle = rr[:, None]
            angles = _WAVE_ANGLE[None, :] * hr_factor[:, None] ** _ANGLE_EXP[None, :]
            centres = times[:, None] + angles * cycle / (2 * np.pi)
            widths = _WAVE_WIDTH[None, :] * hr_factor[:, None] * cycle / (2 * np.pi)
            # R amplitude breathes with the chest (electrical axis moves).
            breathe = 1.0 + 0.05 * np.sin(2 * np.pi * self._resp_hz * times)
            amps = _WAVE_AMP_MV[None, :] * np.ones_like(times)[:, None]
            amps[:, 2] *= self._r_amp_mv * breathe
            # Stacked so one fancy index per chunk fetches all three.
            self._beat_arrays = (times, np.stack((centres, -0.5 / widths**2, amps)))
        return self._beat_arrays

    def ecg_chunk(self, t_start_s: float, n_samples: int) -> npt.NDArray[np.float32]:
        """`n_samples` of lead II in mV from `t_start_s` (snapped to the sample grid).

        Consecutive calls with t_start_s equal to the previous end give one seamless
        signal identical to a single long call. Each sample sums its four nearest beats'
        Gaussians in one vectorised pass: ~30 us for a 40 ms chunk at 500 Hz.
        """
        if t_start_s < 0 or n_samples < 0:
            raise ValueError("t_start_s and n_samples must not be negative")
        fs = self.ecg_rate_hz
        first = round(t_start_s * fs)
        index = np.arange(first, first + n_samples, dtype=np.int64)
        t = index / fs
        t_end = (first + n_samples) / fs
        self._prepare_beats(t_start_s, t_end)
        times, waves_table = self._beat_table()
        nxt = np.searchsorted(times, t, side="left")
        beat = nxt[:, None] + _BEAT_OFFSETS[None, :]  # (n, 4)
        centres, neg_inv_2var, amps = waves_table[:, beat]  # each (n, 4, 5)
        dt = t[:, None, None] - centres
        waves = amps * np.exp(dt * dt * neg_inv_2var)
        ecg = waves.sum(axis=2).sum(axis=1)
        wander = 0.06 * np.sin(2 * np.pi * self._resp_hz * t + self._wander_phase[0])
        wander += 0.04 * np.sin(2 * np.pi * 0.07 * t + self._wander_phase[1])
        noise = self._noise.take(index, mode="wrap")
        out: npt.NDArray[np.float32] = (ecg + wander + noise).astype(np.float32)
        return out
