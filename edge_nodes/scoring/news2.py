"""NEWS2 early-warning score exactly as the Royal College of Physicians 2017 chart."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from enum import IntEnum


class Consciousness(IntEnum):
    """ACVPU; values equal telehealth.v1.Consciousness so conversion is int()."""

    UNSPECIFIED = 0
    ALERT = 1
    NEW_CONFUSION = 2
    VOICE = 3
    PAIN = 4
    UNRESPONSIVE = 5


class OxygenSupport(IntEnum):
    """Values equal telehealth.v1.OxygenSupport."""

    UNSPECIFIED = 0
    AIR = 1
    SUPPLEMENTAL = 2


class SpO2Scale(IntEnum):
    """Values equal telehealth.v1.SpO2Scale; scale 2 only where a clinician prescribed it."""

    UNSPECIFIED = 0
    SCALE_1 = 1
    SCALE_2 = 2


class RiskBand(IntEnum):
    """Values equal telehealth.v1.RiskBand."""

    UNSPECIFIED = 0
    LOW = 1
    LOW_MEDIUM = 2
    MEDIUM = 3
    HIGH = 4


@dataclass(frozen=True)
class Observation:
    """One value of one parameter and the device time it was measured."""

    value: float
    measured_unix_ns: int


@dataclass
class LatestVitals:
    """The newest known value of every NEWS2 parameter of one patient."""

    respiration_rate_bpm: Observation | None = None
    spo2_percent: Observation | None = None
    oxygen_support: Observation | None = None
    systolic_mmhg: Observation | None = None
    heart_rate_bpm: Observation | None = None
    consciousness: Observation | None = None
    temperature_c: Observation | None = None
    # Not a NEWS2 parameter, kept so a new view can show the whole latest blood pressure.
    diastolic_mmhg: Observation | None = None

    def update(
        self,
        *,
        device_time_unix_ns: int,
        heart_rate_bpm: float | None = None,
        spo2_percent: float | None = None,
        respiration_rate_bpm: float | None = None,
        systolic_mmhg: float | None = None,
        temperature_c: float | None = None,
        consciousness: int = 0,
        oxygen_support: int = 0,
        diastolic_mmhg: float | None = None,
    ) -> None:
        """Take one reading; per parameter, a reading older than the one held is ignored.

        Readings can arrive out of device-time order (a device resending after a
        reconnect, two sensors batching differently), so arrival order is not trusted.
        Enum value 0 means the device did not report the parameter.
        """
        t = device_time_unix_ns
        self.heart_rate_bpm = _newer(self.heart_rate_bpm, heart_rate_bpm, t)
        self.spo2_percent = _newer(self.spo2_percent, spo2_percent, t)
        self.respiration_rate_bpm = _newer(self.respiration_rate_bpm, respiration_rate_bpm, t)
        self.systolic_mmhg = _newer(self.systolic_mmhg, systolic_mmhg, t)
        self.temperature_c = _newer(self.temperature_c, temperature_c, t)
        self.diastolic_mmhg = _newer(self.diastolic_mmhg, diastolic_mmhg, t)
        if consciousness:
            self.consciousness = _newer(self.consciousness, float(consciousness), t)
        if oxygen_support:
            self.oxygen_support = _newer(self.oxygen_support, float(oxygen_support), t)


def _newer(held: Observation | None, value: float | None, t: int) -> Observation | None:
    # Equal device times: the later arrival wins, as a device's correction of its own reading.
    if value is None or (held is not None and held.measured_unix_ns > t):
        return held
    return Observation(float(value), t)


@dataclass(frozen=True)
class ParameterScore:
    """The points one parameter contributes and the value they were charted from."""

    parameter: str
    score: int
    value: float
    measured_unix_ns: int
    # Measured too long ago to count: shown with its points, left out of the total.
    stale: bool = False


@dataclass(frozen=True)
class News2Score:
    """Aggregate NEWS2 over the known, fresh parameters; complete when all seven are."""

    total: int
    band: RiskBand
    parameters: tuple[ParameterScore, ...]
    complete: bool
    # Device time of the oldest reading in the total (0 when none): the score's true age.
    oldest_input_unix_ns: int = 0


def _decimal(value: float) -> Decimal:
    """The decimal number a device meant by a float.

    Vitals travel as protobuf float32, so 38.05 arrives as 38.0499992370...; taken
    literally it would round down. When the value is exactly a float32 we use the
    shortest decimal that round-trips at float32 precision ("38.05"), otherwise the
    shortest one at float64 precision (repr), so 35.04999 stays 35.04999.
    """
    if not math.isfinite(value):
        raise ValueError(f"cannot chart a non-finite value {value!r}")
    as32 = struct.unpack("f", struct.pack("f", value))[0]
    if as32 == value:
        for digits in range(1, 10):
            text = f"{value:.{digits}g}"
            if struct.unpack("f", struct.pack("f", float(text)))[0] == as32:
                return Decimal(text)
    return Decimal(repr(value))


# A reading this close to a half (in units of the last place charted) is decided on the
# exact decimal the device meant. Readings are float32 of values below 1000 (x10 for
# temperature): the float32 and its intended decimal differ by under 1e-4 there, so
# anything further from a half rounds the same either way.
_NEAR_HALF = 1e-3


def _round_half_up(value: float, places: int) -> int:
    """Round as the chart is read, halves going up; the result in units of 10**-places
    (whole numbers, or tenths of a °C as an integer, so comparisons are exact).

    Most readings are nowhere near a half and take plain float arithmetic; only those
    within _NEAR_HALF of one take the exact decimal path (Decimal costs ~50 us a reading,
    a fair share of the edge's per-batch budget).
    """
    if not math.isfinite(value):
        raise ValueError(f"cannot chart a non-finite value {value!r}")
    scaled = value * float(10**places)
    whole = math.floor(scaled)
    frac = scaled - whole
    if abs(frac - 0.5) > _NEAR_HALF:
        return whole + 1 if frac > 0.5 else whole
    exact = _decimal(value).scaleb(places).quantize(Decimal(1), rounding=ROUND_HALF_UP)
    return int(exact)


def score_respiration_rate(v: float) -> int:
    """Breaths per minute: ≤8:3, 9-11:1, 12-20:0, 21-24:2, ≥25:3."""
    r = _round_half_up(v, 0)
    if r <= 8:
        return 3
    if r <= 11:
        return 1
    if r <= 20:
        return 0
    if r <= 24:
        return 2
    return 3


def score_spo2(v: float, scale: SpO2Scale, oxygen: OxygenSupport) -> int:
    """SpO2 % on scale 1, or scale 2 where ≥93 % scores only on supplemental oxygen.

    UNSPECIFIED scale means scale 1. On scale 2 an unknown oxygen support is charted
    as air (the aggregate then lacks air_or_oxygen and is marked incomplete).
    """
    s = _round_half_up(v, 0)
    if scale == SpO2Scale.SCALE_2:
        if s <= 83:
            return 3
        if s <= 85:
            return 2
        if s <= 87:
            return 1
        if s <= 92 or oxygen != OxygenSupport.SUPPLEMENTAL:
            return 0
        if s <= 94:
            return 1
        if s <= 96:
            return 2
        return 3
    if s <= 91:
        return 3
    if s <= 93:
        return 2
    if s <= 95:
        return 1
    return 0


def score_air_or_oxygen(o: OxygenSupport) -> int:
    """Air 0, supplemental oxygen 2."""
    if o == OxygenSupport.AIR:
        return 0
    if o == OxygenSupport.SUPPLEMENTAL:
        return 2
    raise ValueError(f"oxygen support {int(o)} is not AIR (1) or SUPPLEMENTAL (2)")


def score_systolic_bp(v: float) -> int:
    """Systolic mmHg: ≤90:3, 91-100:2, 101-110:1, 111-219:0, ≥220:3."""
    s = _round_half_up(v, 0)
    if s <= 90:
        return 3
    if s <= 100:
        return 2
    if s <= 110:
        return 1
    if s <= 219:
        return 0
    return 3


def score_pulse(v: float) -> int:
    """Pulse per minute: ≤40:3, 41-50:1, 51-90:0, 91-110:1, 111-130:2, ≥131:3."""
    p = _round_half_up(v, 0)
    if p <= 40:
        return 3
    if p <= 50:
        return 1
    if p <= 90:
        return 0
    if p <= 110:
        return 1
    if p <= 130:
        return 2
    return 3


def score_consciousness(c: Consciousness) -> int:
    """Alert 0; new confusion, voice, pain or unresponsive 3."""
    if c == Consciousness.ALERT:
        return 0
    if c in (
        Consciousness.NEW_CONFUSION,
        Consciousness.VOICE,
        Consciousness.PAIN,
        Consciousness.UNRESPONSIVE,
    ):
        return 3
    raise ValueError(f"consciousness {int(c)} is not one of ACVPU (1-5)")


def score_temperature(v: float) -> int:
    """°C to 0.1: ≤35.0:3, 35.1-36.0:1, 36.1-38.0:0, 38.1-39.0:1, ≥39.1:2."""
    tenths = _round_half_up(v, 1)
    if tenths <= 350:
        return 3
    if tenths <= 360:
        return 1
    if tenths <= 380:
        return 0
    if tenths <= 390:
        return 1
    return 2


def risk_band(total: int, max_single: int) -> RiskBand:
    """High ≥7, medium 5-6, low-medium when 0-4 with any single parameter at 3, else low."""
    if total >= 7:
        return RiskBand.HIGH
    if total >= 5:
        return RiskBand.MEDIUM
    if max_single >= 3:
        return RiskBand.LOW_MEDIUM
    return RiskBand.LOW


def compute_news2(
    latest: LatestVitals, scale: SpO2Scale, now_unix_ns: int = 0, max_age_ns: int = 0
) -> News2Score:
    """Score every known parameter in chart order; the total covers only those known and,
    when max_age_ns > 0, measured within max_age_ns of now_unix_ns. An older one is listed
    as stale (with the points it would score) but left out, and the score is incomplete:
    a quiet sensor's last value must not keep counting as if it were current."""
    cutoff = now_unix_ns - max_age_ns if max_age_ns > 0 else None

    def fresh(obs: Observation | None) -> bool:
        return obs is not None and (cutoff is None or obs.measured_unix_ns >= cutoff)

    oxygen = OxygenSupport.UNSPECIFIED
    if latest.oxygen_support is not None and fresh(latest.oxygen_support):
        oxygen = OxygenSupport(int(latest.oxygen_support.value))
    scored: list[ParameterScore] = []

    def add(name: str, obs: Observation | None, score: int | None) -> None:
        if obs is not None and score is not None:
            scored.append(
                ParameterScore(name, score, obs.value, obs.measured_unix_ns, not fresh(obs))
            )

    rr, spo2, ox = latest.respiration_rate_bpm, latest.spo2_percent, latest.oxygen_support
    sbp, hr, acvpu, temp = (
        latest.systolic_mmhg,
        latest.heart_rate_bpm,
        latest.consciousness,
        latest.temperature_c,
    )
    add("respiration_rate", rr, None if rr is None else score_respiration_rate(rr.value))
    add("spo2", spo2, None if spo2 is None else score_spo2(spo2.value, scale, oxygen))
    add(
        "air_or_oxygen",
        ox,
        None if ox is None else score_air_or_oxygen(OxygenSupport(int(ox.value))),
    )
    add("systolic_bp", sbp, None if sbp is None else score_systolic_bp(sbp.value))
    add("pulse", hr, None if hr is None else score_pulse(hr.value))
    add(
        "consciousness",
        acvpu,
        None if acvpu is None else score_consciousness(Consciousness(int(acvpu.value))),
    )
    add("temperature", temp, None if temp is None else score_temperature(temp.value))

    counted = [p for p in scored if not p.stale]
    total = sum(p.score for p in counted)
    max_single = max((p.score for p in counted), default=0)
    return News2Score(
        total=total,
        band=risk_band(total, max_single),
        parameters=tuple(scored),
        complete=len(counted) == 7,
        oldest_input_unix_ns=min((p.measured_unix_ns for p in counted), default=0),
    )
