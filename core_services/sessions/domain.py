"""Sessions and placement as plain data and pure functions: no gRPC, no SQL."""

from __future__ import annotations

import bisect
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


class PlacementIndex:
    """Placeable edges per zone, least loaded first, kept current as edges change, so a
    choice costs a look at the head of a few zones instead of a scan over every edge.

    Chooses exactly what choose_edge() would over the same edges (the table tests check both):
    the nearest latency group of zones first; in it the least loaded edge, ties by zone then
    id. The per-zone order is a plain sorted list (bisect): zones hold tens to hundreds of
    edges, where an insert's memmove costs less than a balanced tree's bookkeeping.
    """

    def __init__(self) -> None:
        self._views: dict[str, EdgeView] = {}
        # zone -> sorted [(load, edge_id)] of its placeable edges.
        self._by_zone: dict[str, list[tuple[float, str]]] = {}
        # edge_id -> its (zone, load) entry in _by_zone, while placeable.
        self._entry: dict[str, tuple[str, float]] = {}
        # (device zone) -> zones grouped by latency, nearest group first; cleared on a new zone.
        self._order: dict[str, list[list[str]]] = {}
        self._order_latency: ZoneLatency | None = None

    def __len__(self) -> int:
        return len(self._views)

    def get(self, edge_id: str) -> EdgeView | None:
        return self._views.get(edge_id)

    def update(self, view: EdgeView) -> None:
        """Add or replace an edge as it is now (state, load, capacity, zone)."""
        self._unindex(view.edge_id)
        self._views[view.edge_id] = view
        zone = self._by_zone.get(view.zone)
        if zone is None:
            zone = self._by_zone[view.zone] = []
            self._order.clear()
        if view.placeable:
            bisect.insort(zone, (view.load, view.edge_id))
            self._entry[view.edge_id] = (view.zone, view.load)

    def remove(self, edge_id: str) -> None:
        self._unindex(edge_id)
        self._views.pop(edge_id, None)

    def _unindex(self, edge_id: str) -> None:
        entry = self._entry.pop(edge_id, None)
        if entry is None:
            return
        zone = self._by_zone[entry[0]]
        i = bisect.bisect_left(zone, (entry[1], edge_id))
        del zone[i]

    def _zone_order(self, zone: str, latency: ZoneLatency) -> list[list[str]]:
        if latency is not self._order_latency:
            self._order.clear()
            self._order_latency = latency
        order = self._order.get(zone)
        if order is None:
            by_ms: dict[float, list[str]] = {}
            for z in self._by_zone:
                by_ms.setdefault(latency.ms(zone, z), []).append(z)
            order = [sorted(by_ms[ms]) for ms in sorted(by_ms)]
            self._order[zone] = order
        return order

    def choose(
        self, zone: str, latency: ZoneLatency, exclude: frozenset[str] = frozenset()
    ) -> Placement:
        for group in self._zone_order(zone, latency):
            best: tuple[float, str, str] | None = None
            for z in group:
                for load, edge_id in self._by_zone[z]:
                    if edge_id in exclude:
                        continue
                    if best is None or (load, z, edge_id) < best:
                        best = (load, z, edge_id)
                    break  # the zone's least loaded eligible edge
            if best is not None:
                return Placement(edge=self._views[best[2]], fallback=best[1] != zone)
        # Failing is rare and worth a full account: what was seen, and why nothing fits.
        return choose_edge(list(self._views.values()), zone, latency, exclude)
