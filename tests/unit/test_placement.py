"""Placement as a table test: zone, health, drain, capacity, load and the latency fallback;
the incremental index the core places with must choose exactly what the scan does."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core_services.sessions.domain import (
    EdgeState,
    EdgeView,
    NoEdgeAvailable,
    Placement,
    PlacementIndex,
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


def indexed(
    edges: Sequence[EdgeView],
    zone: str,
    latency: ZoneLatency,
    exclude: frozenset[str] = frozenset(),
) -> Placement:
    index = PlacementIndex()
    for e in edges:
        index.update(e)
    return index.choose(zone, latency, exclude)


CHOOSERS = [pytest.param(choose_edge, id="scan"), pytest.param(indexed, id="index")]


@pytest.mark.parametrize("choose", CHOOSERS)
@pytest.mark.parametrize(
    ("name", "edges", "zone", "expected", "fallback"), CASES, ids=[c[0] for c in CASES]
)
def test_choose_edge(
    choose: object, name: str, edges: list[EdgeView], zone: str, expected: str, fallback: bool
) -> None:
    assert callable(choose)
    p = choose(edges, zone, LAT)
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


def test_index_follows_load_state_and_zone_changes() -> None:
    index = PlacementIndex()
    for e in (edge("a1", "zone-a", 1), edge("a2", "zone-a", 2), edge("b1", "zone-b")):
        index.update(e)
    assert index.choose("zone-a", LAT).edge.edge_id == "a1"
    index.update(edge("a1", "zone-a", 3))  # it got busier
    assert index.choose("zone-a", LAT).edge.edge_id == "a2"
    index.update(edge("a2", "zone-a", 2, state=EdgeState.DRAINING))
    assert index.choose("zone-a", LAT).edge.edge_id == "a1"
    index.update(edge("a1", "zone-a", 10, 10))  # full
    assert index.choose("zone-a", LAT) == Placement(edge("b1", "zone-b"), fallback=True)
    index.update(edge("a2", "zone-a", 0))  # back, idle
    assert index.choose("zone-a", LAT, frozenset({"a2"})).edge.edge_id == "b1"
    assert index.choose("zone-a", LAT).edge.edge_id == "a2"
    index.update(edge("c1", "zone-c"))  # a new zone joins the latency order
    index.remove("b1")
    assert index.choose("zone-b", LAT).edge.edge_id == "a2"  # zone-a is 5 ms, zone-c 6 ms
    index.update(edge("a2", "zone-a", 10, 10))
    assert index.choose("zone-b", LAT).edge.edge_id == "c1"
    assert len(index) == 3


def test_index_failure_names_what_it_saw() -> None:
    index = PlacementIndex()
    index.update(edge("a1", "zone-a", state=EdgeState.DEAD))
    with pytest.raises(NoEdgeAvailable, match=r"a1\(dead\)"):
        index.choose("zone-a", LAT)


edge_views = st.builds(
    edge,
    st.sampled_from([f"e{i}" for i in range(12)]),
    st.sampled_from(["zone-a", "zone-b", "zone-c", "zone-x", "zone-y"]),
    st.integers(0, 6),
    st.integers(1, 6),
    st.sampled_from(list(EdgeState)),
)


@settings(max_examples=300, deadline=None)
@given(
    updates=st.lists(edge_views, max_size=30),
    zone=st.sampled_from(["zone-a", "zone-b", "zone-c", "zone-x", "zone-q"]),
    exclude=st.frozensets(st.sampled_from([f"e{i}" for i in range(12)]), max_size=3),
)
def test_index_chooses_what_the_scan_chooses(
    updates: list[EdgeView], zone: str, exclude: frozenset[str]
) -> None:
    """Whatever order edges come and change in, the index agrees with choose_edge over the
    edges as they are in the end."""
    index = PlacementIndex()
    latest: dict[str, EdgeView] = {}
    for e in updates:
        index.update(e)
        latest[e.edge_id] = e
    try:
        expected: Placement | None = choose_edge(list(latest.values()), zone, LAT, exclude)
    except NoEdgeAvailable:
        expected = None
    if expected is None:
        with pytest.raises(NoEdgeAvailable):
            index.choose(zone, LAT, exclude)
    else:
        assert index.choose(zone, LAT, exclude) == expected
