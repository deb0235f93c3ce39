"""A patient's archived vitals as a FHIR R4 Bundle of vital-signs Observations.

Validated with the fhir.resources R4B models: R4B (4.3) is the technical correction of
R4 (4.0.1) and leaves Observation and Bundle as R4 has them, so what validates here is
valid R4; the package no longer ships a separate R4 tree.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import Iterable
from typing import Any

from fhir.resources.R4B.bundle import Bundle

from core_services.archive.store import StoredBatch
from telehealth.v1 import vitals_pb2

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
PROFILE = "http://hl7.org/fhir/StructureDefinition/"
CATEGORY = {
    "coding": [
        {
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": "vital-signs",
            "display": "Vital Signs",
        }
    ],
    "text": "Vital Signs",
}
# (field, profile, LOINC codings, unit display, UCUM code)
SIMPLE = [
    ("heart_rate_bpm", "heartrate", [("8867-4", "Heart rate")], "beats/minute", "/min"),
    (
        "spo2_percent",
        "oxygensat",
        [
            ("2708-6", "Oxygen saturation in Arterial blood"),
            ("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry"),
        ],
        "%",
        "%",
    ),
    (
        "respiration_rate_bpm",
        "resprate",
        [("9279-1", "Respiratory rate")],
        "breaths/minute",
        "/min",
    ),
    ("temperature_c", "bodytemp", [("8310-5", "Body temperature")], "C", "Cel"),
]


def _when(unix_ns: int) -> str:
    return dt.datetime.fromtimestamp(unix_ns / 1e9, tz=dt.UTC).isoformat(timespec="milliseconds")


def _quantity(value: float, unit: str, code: str) -> dict[str, Any]:
    return {"value": round(float(value), 2), "unit": unit, "system": UCUM, "code": code}


def _observation(
    patient_id: str, when: str, profile: str, codings: list[tuple[str, str]], text: str
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": str(uuid.uuid4()),
        "meta": {"profile": [PROFILE + profile]},
        "status": "final",
        "category": [CATEGORY],
        "code": {
            "coding": [{"system": LOINC, "code": c, "display": d} for c, d in codings],
            "text": text,
        },
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": when,
    }


def observations(patient_id: str, v: vitals_pb2.VitalSigns) -> list[dict[str, Any]]:
    when = _when(v.device_time_unix_ns)
    out = []
    for field, profile, codings, unit, ucum in SIMPLE:
        if v.HasField(field):  # type: ignore[arg-type]
            o = _observation(patient_id, when, profile, codings, codings[0][1])
            o["valueQuantity"] = _quantity(getattr(v, field), unit, ucum)
            out.append(o)
    if v.HasField("systolic_mmhg") or v.HasField("diastolic_mmhg"):
        o = _observation(
            patient_id, when, "bp", [("85354-9", "Blood pressure panel with all children optional")],
            "Blood pressure",
        )  # fmt: skip
        components = []
        for field, code, display in (
            ("systolic_mmhg", "8480-6", "Systolic blood pressure"),
            ("diastolic_mmhg", "8462-4", "Diastolic blood pressure"),
        ):
            comp: dict[str, Any] = {
                "code": {"coding": [{"system": LOINC, "code": code, "display": display}]}
            }
            if v.HasField(field):  # type: ignore[arg-type]
                comp["valueQuantity"] = _quantity(getattr(v, field), "mmHg", "mm[Hg]")
            else:
                comp["dataAbsentReason"] = {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                            "code": "not-performed",
                        }
                    ]
                }
            components.append(comp)
        o["component"] = components
        out.append(o)
    return out


def entries(patient_id: str, batches: Iterable[StoredBatch]) -> list[dict[str, Any]]:
    """Bundle entries (one per Observation) for the readings in these batches."""
    out = []
    for stored in batches:
        b = vitals_pb2.VitalsBatch.FromString(stored.batch)
        for v in b.vitals:
            for o in observations(patient_id, v):
                out.append({"fullUrl": f"urn:uuid:{o['id']}", "resource": o})
    return out


def bundle_doc(entry: list[dict[str, Any]]) -> dict[str, Any]:
    """A collection Bundle of these entries, validated against the R4 models."""
    doc: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "collection",
        "timestamp": _when(time.time_ns()),
        "entry": entry,
    }
    # Raises pydantic's ValidationError on anything the R4 models refuse.
    Bundle.model_validate(doc)
    return doc


def dumps(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"))


def bundle(patient_id: str, batches: Iterable[StoredBatch]) -> tuple[str, int]:
    """Return the Bundle as JSON (validated) and the number of Observations in it."""
    entry = entries(patient_id, batches)
    return dumps(bundle_doc(entry)), len(entry)
