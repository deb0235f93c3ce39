"""Impossible and malformed vital signs are named with their value and allowed range; a
stream's token refresh is checked."""

from __future__ import annotations

import math

import pytest

from edge_nodes.scoring.validation import (
    ImpossibleVitalsError,
    impossible_reason,
    validate_vitals,
)
from edge_nodes.vitals.domain import check_refresh
from telehealth.errors import InvalidArgument, PermissionDenied
from telehealth.security.tokens import SessionClaims


def test_plausible_reading_passes() -> None:
    assert (
        impossible_reason(
            heart_rate_bpm=72,
            spo2_percent=97,
            respiration_rate_bpm=16,
            systolic_mmhg=120,
            diastolic_mmhg=80,
            temperature_c=36.8,
            consciousness=1,
            oxygen_support=1,
        )
        is None
    )


def test_nothing_reported_passes() -> None:
    assert impossible_reason() is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("heart_rate_bpm", 0.0),
        ("heart_rate_bpm", 350.0),
        ("spo2_percent", 0.0),
        ("spo2_percent", 100.0),
        ("respiration_rate_bpm", 0.0),
        ("respiration_rate_bpm", 100.0),
        ("systolic_mmhg", 350.0),
        ("diastolic_mmhg", 0.0),
        ("temperature_c", 20.0),
        ("temperature_c", 45.0),
    ],
)
def test_range_edges_are_allowed(field: str, value: float) -> None:
    assert impossible_reason(**{field: value}) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value", "range_text"),
    [
        ("heart_rate_bpm", -1.0, "0-350 bpm"),
        ("heart_rate_bpm", 351.0, "0-350 bpm"),
        ("spo2_percent", -0.5, "0-100 %"),
        ("spo2_percent", 100.5, "0-100 %"),
        ("respiration_rate_bpm", -1.0, "0-100 /min"),
        ("respiration_rate_bpm", 101.0, "0-100 /min"),
        ("systolic_mmhg", -1.0, "0-350 mmHg"),
        ("systolic_mmhg", 351.0, "0-350 mmHg"),
        ("diastolic_mmhg", -1.0, "0-300 mmHg"),
        ("diastolic_mmhg", 301.0, "0-300 mmHg"),
        ("temperature_c", 19.9, "20-45 °C"),
        ("temperature_c", 98.6, "20-45 °C"),
    ],
)
def test_out_of_range_names_field_value_and_range(
    field: str, value: float, range_text: str
) -> None:
    reason = impossible_reason(**{field: value})  # type: ignore[arg-type]
    assert reason is not None
    assert field in reason
    assert f"{value:g}" in reason
    assert range_text in reason


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", ["heart_rate_bpm", "spo2_percent", "temperature_c"])
def test_non_finite_is_rejected(field: str, value: float) -> None:
    reason = impossible_reason(**{field: value})  # type: ignore[arg-type]
    assert reason is not None
    assert field in reason
    assert "finite" in reason


def test_diastolic_above_systolic_is_rejected() -> None:
    reason = impossible_reason(systolic_mmhg=80, diastolic_mmhg=120)
    assert reason is not None
    assert "diastolic_mmhg=120" in reason
    assert "systolic_mmhg=80" in reason


def test_diastolic_equal_to_systolic_is_rejected() -> None:
    assert impossible_reason(systolic_mmhg=90, diastolic_mmhg=90) is not None


def test_diastolic_alone_is_checked_only_against_its_range() -> None:
    assert impossible_reason(diastolic_mmhg=200) is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"consciousness": 6}, "consciousness"),
        ({"consciousness": -1}, "consciousness"),
        ({"oxygen_support": 3}, "oxygen_support"),
    ],
)
def test_unknown_enum_values_are_rejected(kwargs: dict[str, int], field: str) -> None:
    reason = impossible_reason(**kwargs)
    assert reason is not None
    assert reason.startswith(f"{field}=")
    assert "allowed" in reason


def test_validate_vitals_raises_with_stable_code() -> None:
    with pytest.raises(ImpossibleVitalsError, match="heart_rate_bpm=400") as caught:
        validate_vitals(heart_rate_bpm=400)
    assert caught.value.code == "IMPOSSIBLE_VITALS"
    validate_vitals(heart_rate_bpm=60)


def claims(**kw: object) -> SessionClaims:
    values: dict[str, object] = {
        "session_id": "ses_1",
        "role": "publisher",
        "edge_id": "edge-a",
        "zone": "zone-a",
        "spo2_scale": 1,
        "expires_unix": 1_000,
        "subject_id": "",
    }
    values.update(kw)
    return SessionClaims(**values)  # type: ignore[arg-type]


def test_refresh_only_extends_the_same_stream() -> None:
    check_refresh(claims(), claims(expires_unix=1_900))
    for fresh, named in [
        (claims(session_id="ses_2", expires_unix=2_000), "session"),
        (claims(role="viewer", expires_unix=2_000), "role"),
        (claims(edge_id="edge-b", expires_unix=2_000), "edge"),
        (claims(edge_id="", expires_unix=2_000), "(none)"),
    ]:
        with pytest.raises(PermissionDenied, match=named):
            check_refresh(claims(), fresh)
    for same_or_earlier in (1_000, 999):
        with pytest.raises(InvalidArgument, match="not after"):
            check_refresh(claims(), claims(expires_unix=same_or_earlier))
