"""Placement as a table test: zone, health, drain, capacity, load and the latency fallback."""

from __future__ import annotations

import pytest

from core_services.sessions.domain import (
    EdgeState,
    EdgeView,
    NoEdgeAvailable,
    ZoneLatency,
    choose_edge,
)

LAT = ZoneLatency({"zone-a": {"zone-b": 5, "zone-c": 12}, "zone-b": {"zone-c": 6}})


def edge(
    edge_id: str,
    zone: str,
    active: int = 0,
    cap: int = 10,
    state: EdgeState = EdgeState.HEALTHY,
) -> EdgeView:
    return EdgeView(edge_id, zone, f"{edge_id}:1", state, active, cap)


CASES = [
    ("own zone first", [edge("b1", "zone-b"), edge("a1", "zone-a", 5)], "zone-a", "a1", False),
    (
        "least loaded in zone",
        [edge("a1", "zone-a", 5), edge("a2", "zone-a", 2)],
        "zone-a",
        "a2",
        False,
    ),
    (
        "load is relative to capacity",
        [edge("a1", "zone-a", 5, 100), edge("a2", "zone-a", 2, 4)],
        "zone-a",
        "a1",
        False,
    ),
    ("tie breaks by id", [edge("a2", "zone-a", 1), edge("a1", "zone-a", 1)], "zone-a", "a1", False),
    (
        "dead edge skipped",
        [edge("a1", "zone-a", state=EdgeState.DEAD), edge("b1", "zone-b")],
        "zone-a",
        "b1",
        True,
    ),
    (
        "draining edge skipped",
        [edge("a1", "zone-a", state=EdgeState.DRAINING), edge("c1", "zone-c")],
        "zone-a",
        "c1",
        True,
    ),
    (
        "full edge skipped",
        [edge("a1", "zone-a", 10, 10), edge("b1", "zone-b", 9)],
        "zone-a",
        "b1",
        True,
    ),
    (
        "nearest zone by table",
        [edge("c1", "zone-c"), edge("b1", "zone-b", 9)],
        "zone-a",
        "b1",
        True,
    ),
    ("table is symmetric", [edge("a1", "zone-a"), edge("b1", "zone-b")], "zone-c", "b1", True),
    (
        "unknown zones sort last by name",
        [edge("x1", "zone-x"), edge("d1", "zone-d")],
        "zone-a",
        "d1",
        True,
    ),
    (
        "unknown device zone: least loaded anywhere",
        [edge("a1", "zone-a", 3), edge("b1", "zone-b", 1)],
        "zone-q",
        "b1",
        True,
    ),
]


@pytest.mark.parametrize(
    ("name", "edges", "zone", "expected", "fallback"), CASES, ids=[c[0] for c in CASES]
)
def test_choose_edge(
    name: str, edges: list[EdgeView], zone: str, expected: str, fallback: bool
) -> None:
    p = choose_edge(edges, zone, LAT)
    assert p.edge.edge_id == expected
    assert p.fallback is fallback


def test_choose_edge_is_deterministic_whatever_the_order() -> None:
    edges = [edge(f"e{i}", f"zone-{'abc'[i % 3]}", i % 4) for i in range(12)]
    first = choose_edge(edges, "zone-b", LAT)
    assert all(choose_edge(list(reversed(edges)), "zone-b", LAT) == first for _ in range(3))


def test_exclude_moves_away_from_the_current_edge() -> None:
    edges = [edge("a1", "zone-a"), edge("a2", "zone-a", 5)]
    assert choose_edge(edges, "zone-a", LAT, exclude=frozenset({"a1"})).edge.edge_id == "a2"


def test_no_edge_names_what_it_saw() -> None:
    with pytest.raises(NoEdgeAvailable, match=r"a1\(dead\)"):
        choose_edge([edge("a1", "zone-a", state=EdgeState.DEAD)], "zone-a", LAT)
    with pytest.raises(NoEdgeAvailable, match="edges: none"):
        choose_edge([], "zone-a", LAT)
