"""Sessions and placement as plain data and pure functions: no gRPC, no SQL."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import Enum

from telehealth.errors import Unavailable


class SessionState(Enum):
    OPEN = 1
    CLOSED = 2


class EdgeState(Enum):
    HEALTHY = 1
    DRAINING = 2
    DEAD = 3


@dataclass(frozen=True)
class Session:
    session_id: str
    patient_id: str
    zone: str
    edge_id: str
    spo2_scale: int
    state: SessionState
    opened_unix_ns: int
    closed_unix_ns: int = 0
    placements: int = 1
    device_id: str = ""

    def moved_to(self, edge_id: str) -> Session:
        return replace(self, edge_id=edge_id, placements=self.placements + 1)

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "state": self.state.name}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> Session:
        values = dict(d)
        values["state"] = SessionState[str(values["state"])]
        return cls(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class LiveReport:
    """What the serving edge last said of a session (not persisted: edges re-report)."""

    last_seq: int = 0
    news2_total: int = 0
    news2_band: int = 0
    news2_unix_ns: int = 0
    subscribers: int = 0
    publishers: int = 0
    assigned: bool = False


@dataclass(frozen=True)
class EdgeView:
    """An edge as placement sees it."""

    edge_id: str
    zone: str
    address: str
    state: EdgeState
    active_sessions: int
    capacity_sessions: int

    @property
    def placeable(self) -> bool:
        return self.state is EdgeState.HEALTHY and self.active_sessions < self.capacity_sessions

    @property
    def load(self) -> float:
        return self.active_sessions / max(self.capacity_sessions, 1)


@dataclass(frozen=True)
class Placement:
    edge: EdgeView
    # True when the device's own zone had no placeable edge.
    fallback: bool


@dataclass(frozen=True)
class ZoneLatency:
    """Configured latency between zones; unknown pairs sort after known ones, by name."""

    table: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def ms(self, src: str, dst: str) -> float:
        if src == dst:
            return 0.0
        v = self.table.get(src, {}).get(dst)
        if v is None:
            v = self.table.get(dst, {}).get(src)
        return math.inf if v is None else v


class NoEdgeAvailable(Unavailable):
    pass


def choose_edge(
    edges: Sequence[EdgeView],
    zone: str,
    latency: ZoneLatency,
    exclude: frozenset[str] = frozenset(),
) -> Placement:
    """Healthy, non-draining edge with capacity in the device's zone, least loaded first;
    else the nearest zone by the latency table. Deterministic: ties break by zone then id."""
    best: tuple[float, float, str, str] | None = None
    chosen: EdgeView | None = None
    for e in edges:
        if e.edge_id in exclude or not e.placeable:
            continue
        key = (latency.ms(zone, e.zone), e.load, e.zone, e.edge_id)
        if best is None or key < best:
            best, chosen = key, e
    if chosen is None:
        known = ", ".join(f"{e.edge_id}({e.state.name.lower()})" for e in edges) or "none"
        raise NoEdgeAvailable(
            f"no healthy edge with capacity for zone {zone!r} or any other zone (edges: {known})"
        )
    return Placement(edge=chosen, fallback=chosen.zone != zone)
