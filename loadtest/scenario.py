"""Load scenarios as YAML files: what a run offers, validated strictly so a typo is an error."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

SCENARIO_DIR = Path(__file__).parent / "scenarios"
PATHS = ("edge", "echo", "mqtt-qos0", "mqtt-qos1")


class ScenarioError(ValueError):
    """A scenario file that cannot be run; the message names the file and the key."""


@dataclass(frozen=True)
class Scenario:
    """One load shape. Rates are per patient; every path in `paths` gets the same load."""

    name: str
    description: str = ""
    patients: int = 10
    batch_rate_hz: float = 25.0
    # ECG lead II samples per second inside the batches; 0 sends vitals-only batches.
    ecg_hz: float = 250.0
    vitals_rate_hz: float = 1.0
    subscribers_per_patient: int = 1
    # How many of the patients have subscribers (a ward clinician watches only some); 0 = all.
    watched_patients: int = 0
    duration_s: float = 20.0
    # Patients join evenly over this many seconds, so the offered rate ramps up linearly.
    ramp_s: float = 0.0
    # Step ramp: run these patient counts one after another, `duration_s` each (0 = no steps).
    steps: tuple[int, ...] = ()
    # A step passes when its p99 is under this and nothing is lost; used to find saturation.
    p99_limit_ms: float = 50.0
    # Two-way video calls (640x480@30, patient <-> clinician through the edge, aiortc peers)
    # held for every step alongside the vitals load; their figures go with the edge's rows.
    video_calls: int = 0
    paths: tuple[str, ...] = PATHS
    # Run the paths at the same time instead of one after another (light loads only).
    parallel_paths: bool = False
    # Client connections the swarm shares (gRPC channels; MQTT clients per direction).
    connections: int = 8
    # Seconds to wait after the last send for late deliveries before counting loss.
    drain_s: float = 3.0
    # A placement run after the load (0 edges = none): Opens timed against a core holding
    # this many registered edges and live sessions (the bench's is 1,000 and 100,000).
    placement_edges: int = 0
    placement_sessions: int = 0
    placement_opens: int = 100
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_period_ns(self) -> int:
        return round(1e9 / self.batch_rate_hz)

    @property
    def watched(self) -> int:
        n = self.patients if not self.steps else max(self.steps)
        return n if self.watched_patients == 0 else min(self.watched_patients, n)

    @property
    def max_patients(self) -> int:
        return max(self.steps) if self.steps else self.patients

    @property
    def load_seconds(self) -> float:
        """Seconds of load the scenario plans (steps x duration, per path unless in parallel),
        ramps included; retries and bisection steps of a saturation search come on top."""
        per_path = (
            self.duration_s * len(self.steps) if self.steps else self.duration_s + self.ramp_s
        )
        return per_path * (1 if self.parallel_paths else len(self.paths))

    @property
    def offered_batches_per_s(self) -> float:
        return self.patients * self.batch_rate_hz

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["steps"] = list(self.steps)
        d["paths"] = list(self.paths)
        d.pop("extra")
        return d


_KEYS = {f.name for f in fields(Scenario)} - {"extra"}


def _number(where: str, key: str, value: Any, *, lo: float, hi: float, integer: bool) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ScenarioError(f"{where}: {key} must be a number, got {value!r}")
    if integer and not float(value).is_integer():
        raise ScenarioError(f"{where}: {key} must be a whole number, got {value!r}")
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ScenarioError(f"{where}: {key} must be between {lo:g} and {hi:g}, got {value!r}")
    return int(value) if integer else float(value)


_LIMITS: dict[str, tuple[float, float, bool]] = {
    "patients": (1, 20_000, True),
    "batch_rate_hz": (0.01, 1000, False),
    "ecg_hz": (0, 2000, False),
    "vitals_rate_hz": (0, 100, False),
    "subscribers_per_patient": (0, 64, True),
    "watched_patients": (0, 20_000, True),
    "duration_s": (1, 86_400, False),
    "ramp_s": (0, 86_400, False),
    "p99_limit_ms": (0.1, 60_000, False),
    "video_calls": (0, 64, True),
    "connections": (1, 1024, True),
    "drain_s": (0, 600, False),
    "placement_edges": (0, 10_000, True),
    "placement_sessions": (0, 1_000_000, True),
    "placement_opens": (1, 100_000, True),
}


def parse_scenario(data: Any, where: str, default_name: str = "") -> Scenario:
    """Build a Scenario from parsed YAML; unknown keys and bad values raise ScenarioError."""
    if not isinstance(data, dict):
        raise ScenarioError(f"{where}: a scenario is a mapping of keys to values")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise ScenarioError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_KEYS))}"
        )
    values: dict[str, Any] = {"name": str(data.get("name") or default_name)}
    if not values["name"]:
        raise ScenarioError(f"{where}: name must be set")
    if "description" in data:
        values["description"] = str(data["description"])
    for key, (lo, hi, integer) in _LIMITS.items():
        if key in data:
            values[key] = _number(where, key, data[key], lo=lo, hi=hi, integer=integer)
    if "steps" in data:
        steps = data["steps"]
        if not isinstance(steps, list) or not steps:
            raise ScenarioError(f"{where}: steps must be a non-empty list of patient counts")
        values["steps"] = tuple(
            _number(where, "steps[]", s, lo=1, hi=20_000, integer=True) for s in steps
        )
    if "paths" in data:
        paths = data["paths"]
        if not isinstance(paths, list) or not paths:
            raise ScenarioError(f"{where}: paths must be a non-empty list of {', '.join(PATHS)}")
        for p in paths:
            if p not in PATHS:
                raise ScenarioError(f"{where}: unknown path {p!r}; allowed: {', '.join(PATHS)}")
        values["paths"] = tuple(paths)
    if "parallel_paths" in data:
        if not isinstance(data["parallel_paths"], bool):
            raise ScenarioError(f"{where}: parallel_paths must be true or false")
        values["parallel_paths"] = data["parallel_paths"]
    sc = Scenario(**values)
    if sc.video_calls and "edge" not in sc.paths:
        raise ScenarioError(f"{where}: video_calls need the edge path (calls go through an edge)")
    if sc.video_calls > sc.max_patients:
        raise ScenarioError(f"{where}: video_calls cannot exceed the number of patients")
    if sc.placement_sessions and not sc.placement_edges:
        raise ScenarioError(f"{where}: placement_sessions needs placement_edges")
    if sc.vitals_rate_hz > sc.batch_rate_hz:
        raise ScenarioError(f"{where}: vitals_rate_hz cannot exceed batch_rate_hz (one per batch)")
    if sc.ecg_hz == 0 and sc.vitals_rate_hz == 0:
        raise ScenarioError(f"{where}: batches would be empty; set ecg_hz or vitals_rate_hz")
    if sc.ecg_hz and sc.ecg_hz / sc.batch_rate_hz < 1:
        raise ScenarioError(f"{where}: ecg_hz must give at least one sample per batch")
    if any(p.startswith("mqtt") for p in sc.paths) and sc.subscribers_per_patient > sc.connections:
        raise ScenarioError(
            f"{where}: MQTT viewers of one patient need distinct clients: "
            f"connections ({sc.connections}) must be >= subscribers_per_patient"
        )
    return sc


def load_scenario(name_or_path: str) -> Scenario:
    """A built-in scenario by name (see `available()`) or a YAML file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SCENARIO_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ScenarioError(
            f"no scenario {name_or_path!r}: not a file, and the built-in ones are "
            f"{', '.join(available())}"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ScenarioError(f"{path}: not valid YAML: {e}") from None
    return parse_scenario(data, str(path), path.stem)


def available() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))
