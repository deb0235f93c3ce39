"""Rejection of physiologically impossible or malformed vital signs before they are scored."""

from __future__ import annotations

import math
from typing import TypedDict, Unpack

from edge_nodes.scoring.news2 import Consciousness, OxygenSupport

# Inclusive bounds of what a living (or just-arrested) patient's sensor can report.
# Wide on purpose: they catch malformed data and unit mix-ups (°F, kPa), not illness.
_RANGES: tuple[tuple[str, float, float, str], ...] = (
    # 0 bpm is asystole, which must reach the clinician rather than be dropped.
    ("heart_rate_bpm", 0.0, 350.0, "bpm"),
    ("spo2_percent", 0.0, 100.0, "%"),
    ("respiration_rate_bpm", 0.0, 100.0, "/min"),
    ("systolic_mmhg", 0.0, 350.0, "mmHg"),
    ("diastolic_mmhg", 0.0, 300.0, "mmHg"),
    ("temperature_c", 20.0, 45.0, "°C"),
)


_CONSCIOUSNESS = frozenset(int(c) for c in Consciousness)
_OXYGEN = frozenset(int(o) for o in OxygenSupport)


class Reading(TypedDict, total=False):
    """The keyword arguments of impossible(): one reading, each value optional."""

    heart_rate_bpm: float | None
    spo2_percent: float | None
    respiration_rate_bpm: float | None
    systolic_mmhg: float | None
    diastolic_mmhg: float | None
    temperature_c: float | None
    consciousness: int
    oxygen_support: int


class ImpossibleVitalsError(ValueError):
    """A reading no patient can have; `code` is stable for mapping to a gRPC status."""

    code = "IMPOSSIBLE_VITALS"


def impossible_reason(**reading: Unpack[Reading]) -> str | None:
    """Why this reading is impossible or malformed, naming field, value and range; else None.

    A None value means the sensor did not report it and is skipped; enum value 0
    means not reported.
    """
    found = impossible(**reading)
    return None if found is None else found[1]


def impossible(
    *,
    heart_rate_bpm: float | None = None,
    spo2_percent: float | None = None,
    respiration_rate_bpm: float | None = None,
    systolic_mmhg: float | None = None,
    diastolic_mmhg: float | None = None,
    temperature_c: float | None = None,
    consciousness: int = 0,
    oxygen_support: int = 0,
) -> tuple[tuple[str, ...], str] | None:
    """As impossible_reason, with the names of the fields at fault apart from the message
    (logs may name fields, never a patient's values)."""
    values = {
        "heart_rate_bpm": heart_rate_bpm,
        "spo2_percent": spo2_percent,
        "respiration_rate_bpm": respiration_rate_bpm,
        "systolic_mmhg": systolic_mmhg,
        "diastolic_mmhg": diastolic_mmhg,
        "temperature_c": temperature_c,
    }
    for name, low, high, unit in _RANGES:
        value = values[name]
        if value is None:
            continue
        if not math.isfinite(value):
            return (name,), (
                f"{name} is {value!r}; a finite number in {low:g}-{high:g} {unit} is required"
            )
        if not low <= value <= high:
            return (name,), (
                f"{name}={value:g} {unit} is outside the allowed range {low:g}-{high:g} {unit}"
            )
    if systolic_mmhg is not None and diastolic_mmhg is not None and diastolic_mmhg >= systolic_mmhg:
        # Equal pressures are rejected too: a zero pulse pressure is a failed measurement.
        return ("diastolic_mmhg", "systolic_mmhg"), (
            f"diastolic_mmhg={diastolic_mmhg:g} mmHg is not below systolic_mmhg="
            f"{systolic_mmhg:g} mmHg; diastolic must be lower than systolic"
        )
    if consciousness not in _CONSCIOUSNESS:
        return ("consciousness",), (
            f"consciousness={consciousness} is not a known value; allowed 0 (not reported), "
            "1 alert, 2 new confusion, 3 voice, 4 pain, 5 unresponsive"
        )
    if oxygen_support not in _OXYGEN:
        return ("oxygen_support",), (
            f"oxygen_support={oxygen_support} is not a known value; allowed 0 (not reported), "
            "1 air, 2 supplemental"
        )
    return None


def validate_vitals(**reading: Unpack[Reading]) -> None:
    """Raise ImpossibleVitalsError with impossible_reason's message if there is one."""
    reason = impossible_reason(**reading)
    if reason is not None:
        raise ImpossibleVitalsError(reason)
