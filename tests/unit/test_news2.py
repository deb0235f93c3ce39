"""NEWS2 against the RCP 2017 chart: every boundary, both SpO2 scales, rounding, bands."""

from __future__ import annotations

import struct
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import pytest

from edge_nodes.scoring.news2 import (
    Consciousness,
    LatestVitals,
    News2Score,
    Observation,
    OxygenSupport,
    RiskBand,
    SpO2Scale,
    _decimal,
    _round_half_up,
    compute_news2,
    risk_band,
    score_air_or_oxygen,
    score_consciousness,
    score_pulse,
    score_respiration_rate,
    score_spo2,
    score_systolic_bp,
    score_temperature,
)

# (scorer, value, expected): each chart boundary from both sides.
BOUNDARIES: list[tuple[Callable[[float], int], float, int]] = [
    (score_respiration_rate, 0, 3),
    (score_respiration_rate, 8, 3),
    (score_respiration_rate, 9, 1),
    (score_respiration_rate, 11, 1),
    (score_respiration_rate, 12, 0),
    (score_respiration_rate, 20, 0),
    (score_respiration_rate, 21, 2),
    (score_respiration_rate, 24, 2),
    (score_respiration_rate, 25, 3),
    (score_respiration_rate, 60, 3),
    (score_systolic_bp, 50, 3),
    (score_systolic_bp, 90, 3),
    (score_systolic_bp, 91, 2),
    (score_systolic_bp, 100, 2),
    (score_systolic_bp, 101, 1),
    (score_systolic_bp, 110, 1),
    (score_systolic_bp, 111, 0),
    (score_systolic_bp, 219, 0),
    (score_systolic_bp, 220, 3),
    (score_pulse, 30, 3),
    (score_pulse, 40, 3),
    (score_pulse, 41, 1),
    (score_pulse, 50, 1),
    (score_pulse, 51, 0),
    (score_pulse, 90, 0),
    (score_pulse, 91, 1),
    (score_pulse, 110, 1),
    (score_pulse, 111, 2),
    (score_pulse, 130, 2),
    (score_pulse, 131, 3),
    (score_temperature, 34.0, 3),
    (score_temperature, 35.0, 3),
    (score_temperature, 35.1, 1),
    (score_temperature, 36.0, 1),
    (score_temperature, 36.1, 0),
    (score_temperature, 38.0, 0),
    (score_temperature, 38.1, 1),
    (score_temperature, 39.0, 1),
    (score_temperature, 39.1, 2),
    (score_temperature, 41.0, 2),
]


@pytest.mark.parametrize(
    ("scorer", "value", "expected"),
    BOUNDARIES,
    ids=[f"{f.__name__}-{v}" for f, v, _ in BOUNDARIES],
)
def test_chart_boundaries_score_as_charted(
    scorer: Callable[[float], int], value: float, expected: int
) -> None:
    assert scorer(value) == expected


SCALE_1 = [(80, 3), (91, 3), (92, 2), (93, 2), (94, 1), (95, 1), (96, 0), (100, 0)]


@pytest.mark.parametrize(("spo2", "expected"), SCALE_1)
@pytest.mark.parametrize("oxygen", [OxygenSupport.AIR, OxygenSupport.SUPPLEMENTAL])
def test_spo2_scale_1_ignores_oxygen(spo2: float, expected: int, oxygen: OxygenSupport) -> None:
    assert score_spo2(spo2, SpO2Scale.SCALE_1, oxygen) == expected


def test_spo2_unspecified_scale_means_scale_1() -> None:
    for spo2, expected in SCALE_1:
        assert score_spo2(spo2, SpO2Scale.UNSPECIFIED, OxygenSupport.AIR) == expected


SCALE_2_LOW = [(70, 3), (83, 3), (84, 2), (85, 2), (86, 1), (87, 1), (88, 0), (92, 0)]


@pytest.mark.parametrize(("spo2", "expected"), SCALE_2_LOW)
@pytest.mark.parametrize("oxygen", [OxygenSupport.AIR, OxygenSupport.SUPPLEMENTAL])
def test_spo2_scale_2_below_93_ignores_oxygen(
    spo2: float, expected: int, oxygen: OxygenSupport
) -> None:
    assert score_spo2(spo2, SpO2Scale.SCALE_2, oxygen) == expected


@pytest.mark.parametrize("spo2", [93, 94, 95, 96, 97, 100])
def test_spo2_scale_2_at_93_or_more_on_air_scores_zero(spo2: float) -> None:
    assert score_spo2(spo2, SpO2Scale.SCALE_2, OxygenSupport.AIR) == 0


@pytest.mark.parametrize(
    ("spo2", "expected"), [(92, 0), (93, 1), (94, 1), (95, 2), (96, 2), (97, 3), (100, 3)]
)
def test_spo2_scale_2_at_93_or_more_on_oxygen_scores_rising(spo2: float, expected: int) -> None:
    assert score_spo2(spo2, SpO2Scale.SCALE_2, OxygenSupport.SUPPLEMENTAL) == expected


def test_air_scores_zero_and_oxygen_two() -> None:
    assert score_air_or_oxygen(OxygenSupport.AIR) == 0
    assert score_air_or_oxygen(OxygenSupport.SUPPLEMENTAL) == 2
    with pytest.raises(ValueError, match="oxygen support"):
        score_air_or_oxygen(OxygenSupport.UNSPECIFIED)


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        (Consciousness.ALERT, 0),
        (Consciousness.NEW_CONFUSION, 3),
        (Consciousness.VOICE, 3),
        (Consciousness.PAIN, 3),
        (Consciousness.UNRESPONSIVE, 3),
    ],
)
def test_consciousness_alert_zero_else_three(level: Consciousness, expected: int) -> None:
    assert score_consciousness(level) == expected


def test_consciousness_unspecified_is_rejected() -> None:
    with pytest.raises(ValueError, match="ACVPU"):
        score_consciousness(Consciousness.UNSPECIFIED)


def _float32(v: float) -> float:
    result: float = struct.unpack("f", struct.pack("f", v))[0]
    return result


@pytest.mark.parametrize(
    ("scorer", "value", "expected"),
    [
        (score_respiration_rate, 20.49, 0),
        (score_respiration_rate, 20.5, 2),
        (score_respiration_rate, 8.5, 1),
        (score_respiration_rate, 8.4999, 3),
        (score_pulse, 90.5, 1),
        (score_pulse, 90.4, 0),
        (score_pulse, _float32(130.5), 3),
        (score_systolic_bp, 110.5, 0),
        (score_systolic_bp, 90.49, 3),
        (score_temperature, 38.05, 1),
        (score_temperature, _float32(38.05), 1),
        (score_temperature, 38.0499, 0),
        (score_temperature, 35.04999, 3),
        (score_temperature, _float32(35.04999), 3),
        (score_temperature, 35.05, 1),
        (score_temperature, 39.05, 2),
    ],
)
def test_device_floats_round_half_up_before_charting(
    scorer: Callable[[float], int], value: float, expected: int
) -> None:
    assert scorer(value) == expected


@pytest.mark.parametrize(
    ("spo2", "scale", "expected"),
    [(95.5, SpO2Scale.SCALE_1, 0), (95.49, SpO2Scale.SCALE_1, 1), (87.5, SpO2Scale.SCALE_2, 0)],
)
def test_spo2_rounds_half_up(spo2: float, scale: SpO2Scale, expected: int) -> None:
    assert score_spo2(spo2, scale, OxygenSupport.AIR) == expected


def test_non_finite_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        score_pulse(float("nan"))


@pytest.mark.parametrize(
    ("total", "max_single", "band"),
    [
        (0, 0, RiskBand.LOW),
        (4, 2, RiskBand.LOW),
        (3, 3, RiskBand.LOW_MEDIUM),
        (4, 3, RiskBand.LOW_MEDIUM),
        (5, 1, RiskBand.MEDIUM),
        (6, 3, RiskBand.MEDIUM),
        (7, 1, RiskBand.HIGH),
        (20, 3, RiskBand.HIGH),
    ],
)
def test_risk_band_rules(total: int, max_single: int, band: RiskBand) -> None:
    assert risk_band(total, max_single) == band


def _vitals(
    *,
    rr: float = 16,
    spo2: float = 97,
    oxygen: OxygenSupport = OxygenSupport.AIR,
    sbp: float = 120,
    hr: float = 70,
    acvpu: Consciousness = Consciousness.ALERT,
    temp: float = 36.8,
) -> LatestVitals:
    latest = LatestVitals()
    latest.update(
        device_time_unix_ns=1_000,
        respiration_rate_bpm=rr,
        spo2_percent=spo2,
        oxygen_support=int(oxygen),
        systolic_mmhg=sbp,
        heart_rate_bpm=hr,
        consciousness=int(acvpu),
        temperature_c=temp,
    )
    return latest


def test_healthy_patient_scores_zero_low_and_complete() -> None:
    score = compute_news2(_vitals(), SpO2Scale.SCALE_1)
    assert score == News2Score(
        total=0,
        band=RiskBand.LOW,
        parameters=score.parameters,
        complete=True,
        oldest_input_unix_ns=1_000,
    )
    assert [p.parameter for p in score.parameters] == [
        "respiration_rate",
        "spo2",
        "air_or_oxygen",
        "systolic_bp",
        "pulse",
        "consciousness",
        "temperature",
    ]
    assert all(p.measured_unix_ns == 1_000 for p in score.parameters)


def test_single_three_makes_low_medium() -> None:
    score = compute_news2(_vitals(acvpu=Consciousness.VOICE), SpO2Scale.SCALE_1)
    assert (score.total, score.band) == (3, RiskBand.LOW_MEDIUM)


def test_five_is_medium() -> None:
    # RR 22 (2) + oxygen (2) + pulse 95 (1)
    score = compute_news2(
        _vitals(rr=22, oxygen=OxygenSupport.SUPPLEMENTAL, hr=95), SpO2Scale.SCALE_1
    )
    assert (score.total, score.band) == (5, RiskBand.MEDIUM)


def test_seven_is_high() -> None:
    # RR 25 (3) + SpO2 94 (1) + SBP 105 (1) + temp 39.2 (2)
    score = compute_news2(_vitals(rr=25, spo2=94, sbp=105, temp=39.2), SpO2Scale.SCALE_1)
    assert (score.total, score.band) == (7, RiskBand.HIGH)


def test_scale_2_patient_on_oxygen_scores_high_saturation() -> None:
    latest = _vitals(spo2=97, oxygen=OxygenSupport.SUPPLEMENTAL)
    assert compute_news2(latest, SpO2Scale.SCALE_1).total == 2
    assert compute_news2(latest, SpO2Scale.SCALE_2).total == 5


def test_incomplete_vitals_score_what_is_known() -> None:
    latest = LatestVitals()
    latest.update(device_time_unix_ns=5, heart_rate_bpm=135, respiration_rate_bpm=14)
    score = compute_news2(latest, SpO2Scale.SCALE_1)
    assert not score.complete
    assert score.total == 3
    assert score.band == RiskBand.LOW_MEDIUM
    assert {p.parameter for p in score.parameters} == {"pulse", "respiration_rate"}


def test_no_vitals_is_low_and_incomplete() -> None:
    score = compute_news2(LatestVitals(), SpO2Scale.SCALE_1)
    assert score == News2Score(0, RiskBand.LOW, (), False)


def test_latest_vitals_keeps_newest_by_device_time() -> None:
    latest = LatestVitals()
    latest.update(device_time_unix_ns=200, heart_rate_bpm=80, spo2_percent=95)
    latest.update(device_time_unix_ns=100, heart_rate_bpm=60, temperature_c=37.0)
    assert latest.heart_rate_bpm == Observation(80.0, 200)
    assert latest.spo2_percent == Observation(95.0, 200)
    # An older reading still fills a parameter that had no value.
    assert latest.temperature_c == Observation(37.0, 100)
    latest.update(device_time_unix_ns=300, heart_rate_bpm=90)
    assert latest.heart_rate_bpm == Observation(90.0, 300)
    assert latest.spo2_percent == Observation(95.0, 200)


def test_latest_vitals_ignores_unreported_enums() -> None:
    latest = LatestVitals()
    latest.update(
        device_time_unix_ns=100,
        consciousness=int(Consciousness.PAIN),
        oxygen_support=int(OxygenSupport.SUPPLEMENTAL),
    )
    latest.update(device_time_unix_ns=200, heart_rate_bpm=70)
    assert latest.consciousness == Observation(4.0, 100)
    assert latest.oxygen_support == Observation(2.0, 100)
    latest.update(device_time_unix_ns=50, consciousness=int(Consciousness.ALERT))
    assert latest.consciousness == Observation(4.0, 100)


def test_stale_inputs_are_shown_but_left_out_of_the_total() -> None:
    latest = _vitals(hr=135, acvpu=Consciousness.VOICE)  # pulse 3, consciousness 3 at t=1000
    # Later, fresh readings of everything but pulse and consciousness.
    latest.update(
        device_time_unix_ns=9_000,
        respiration_rate_bpm=22,
        spo2_percent=97,
        oxygen_support=int(OxygenSupport.AIR),
        systolic_mmhg=120,
        temperature_c=36.8,
    )
    assert compute_news2(latest, SpO2Scale.SCALE_1).total == 8  # without expiry: all count
    score = compute_news2(latest, SpO2Scale.SCALE_1, now_unix_ns=10_000, max_age_ns=5_000)
    stale = {p.parameter: p.score for p in score.parameters if p.stale}
    assert stale == {"pulse": 3, "consciousness": 3}
    assert (score.total, score.band, score.complete) == (2, RiskBand.LOW, False)
    assert score.oldest_input_unix_ns == 9_000
    # Exactly max_age old still counts; one nanosecond more does not.
    edge = compute_news2(latest, SpO2Scale.SCALE_1, now_unix_ns=6_000, max_age_ns=5_000)
    assert not any(p.stale for p in edge.parameters) and edge.total == 8
    assert edge.oldest_input_unix_ns == 1_000
    assert compute_news2(latest, SpO2Scale.SCALE_1, 6_001, 5_000).total == 2


def test_stale_oxygen_support_is_not_used_for_scale_2() -> None:
    latest = _vitals(spo2=97, oxygen=OxygenSupport.SUPPLEMENTAL)
    latest.update(device_time_unix_ns=9_000, spo2_percent=97)
    fresh = compute_news2(latest, SpO2Scale.SCALE_2, now_unix_ns=9_000, max_age_ns=10_000)
    assert fresh.total == 5  # 97 % on oxygen, scale 2: 3, plus oxygen 2
    aged = compute_news2(latest, SpO2Scale.SCALE_2, now_unix_ns=9_000, max_age_ns=5_000)
    # Oxygen support no longer known: SpO2 97 % is charted as on air (0), oxygen left out.
    assert {p.parameter: p.score for p in aged.parameters}["spo2"] == 0
    assert aged.total == 0 and not aged.complete


def _exact_round_half_up(value: float, places: int) -> int:
    """The chart's reading, done slowly: the decimal the device meant, halves going up."""
    d = _decimal(value).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)
    return int(d.scaleb(places))


def test_fast_rounding_agrees_with_exact_decimal_rounding_near_every_half() -> None:
    # Around every half the chart can meet (0-400 whole, 20.0-46.0 °C in tenths): float32
    # and float64 values at and a few ulps around it, and a little off it either side.
    values: list[tuple[float, int]] = []
    for places, lo, hi in ((0, 0, 400), (1, 200, 460)):
        for k in range(lo, hi):
            for off in (0.0, 1e-5, -1e-5, 1e-3, -1e-3, 2e-3, -2e-3, 0.02, -0.02):
                x = (k + 0.5 + off) / 10**places
                f32 = np.float32(x)
                values += [(x, places), (float(f32), places)]
                values += [
                    (float(np.nextafter(f32, np.float32(d), dtype=np.float32)), places)
                    for d in (1e9, -1e9)
                ]
    for v, places in values:
        assert _round_half_up(v, places) == _exact_round_half_up(v, places), (v, places)
