"""Sessions at the core: open, attach, list, watch, close, and re-placement when an edge dies."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from core_services.server import CoreServer
from telehealth.v1 import (
    edges_pb2,
    edges_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
)
from tests.conftest import EdgeFactory, eventually, staff
from tests.integration.test_vitals_path import open_session

ChannelTo = Callable[[str], grpc.aio.Channel]


async def test_lifecycle_list_and_watch(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    await edge_factory("edge-a", "zone-a")
    await edge_factory("edge-b", "zone-b")
    stub = sessions_pb2_grpc.SessionsServiceStub(channel_to(core.address))
    op = await staff(core, "operator")
    watch = stub.Watch(sessions_pb2.WatchSessionsRequest(), metadata=op)
    first = await open_session(core, channel_to, "zone-b")
    assert first.session.edge_id == "edge-b"
    assert first.assignment.edge_address.startswith("127.0.0.1:")
    ev = await anext(aiter(watch))
    assert ev.kind == sessions_pb2.SESSION_EVENT_KIND_OPENED
    assert ev.session.session_id == first.session.session_id
    listed = await stub.List(sessions_pb2.ListSessionsRequest(), metadata=op)
    assert [s.session_id for s in listed.sessions] == [first.session.session_id]
    assert (
        await stub.List(sessions_pb2.ListSessionsRequest(zone="zone-a"), metadata=op)
    ).sessions == []
    await stub.Close(
        sessions_pb2.CloseSessionRequest(session_id=first.session.session_id), metadata=op
    )
    ev = await anext(aiter(watch))
    while ev.kind == sessions_pb2.SESSION_EVENT_KIND_UPDATED:  # the edge's first live report
        ev = await anext(aiter(watch))
    assert ev.kind == sessions_pb2.SESSION_EVENT_KIND_CLOSED
    assert (await stub.List(sessions_pb2.ListSessionsRequest(), metadata=op)).sessions == []
    everything = await stub.List(sessions_pb2.ListSessionsRequest(include_closed=True), metadata=op)
    assert everything.sessions[0].state == sessions_pb2.SESSION_STATE_CLOSED
    watch.cancel()


async def test_fallback_zone_then_dead_edge_replaced(
    tmp_path: object, edge_factory: EdgeFactory, core: CoreServer, channel_to: ChannelTo
) -> None:
    edge_a = await edge_factory("edge-a", "zone-a")
    await edge_factory("edge-b", "zone-b")
    stub = sessions_pb2_grpc.SessionsServiceStub(channel_to(core.address))
    edges = edges_pb2_grpc.EdgesServiceStub(channel_to(core.address))
    op = await staff(core, "operator")
    # Draining zone-a's only edge sends new zone-a sessions to the nearest zone.
    await edges.Drain(edges_pb2.DrainEdgeRequest(edge_id="edge-a", draining=True), metadata=op)
    fallback = await open_session(core, channel_to, "zone-a")
    assert fallback.session.edge_id == "edge-b"
    await edges.Drain(edges_pb2.DrainEdgeRequest(edge_id="edge-a", draining=False), metadata=op)
    on_a = await open_session(core, channel_to, "zone-a")
    assert on_a.session.edge_id == "edge-a"
    watch = stub.Watch(
        sessions_pb2.WatchSessionsRequest(session_id=on_a.session.session_id), metadata=op
    )
    snap = await anext(aiter(watch))
    assert snap.kind == sessions_pb2.SESSION_EVENT_KIND_SNAPSHOT
    # The edge stops heartbeating: after the timeout the core re-places and tells watchers.
    core.edges.heartbeat_timeout_s = 0.5
    await edge_a.stop(grace=0)
    ev = await asyncio.wait_for(anext(aiter(watch)), 10)
    while ev.kind == sessions_pb2.SESSION_EVENT_KIND_UPDATED:
        # The edge's live report (NEWS2 of the new session) may come first; not what's tested.
        ev = await asyncio.wait_for(anext(aiter(watch)), 10)
    assert ev.kind == sessions_pb2.SESSION_EVENT_KIND_MOVED
    assert ev.session.edge_id == "edge-b"
    assert ev.session.placements == 2
    listed = await edges.ListEdges(edges_pb2.ListEdgesRequest(), metadata=op)
    states = {e.edge_id: e.state for e in listed.edges}
    assert states == {"edge-a": edges_pb2.EDGE_STATE_DEAD, "edge-b": edges_pb2.EDGE_STATE_HEALTHY}
    with_unknown = await edges.Drain(
        edges_pb2.DrainEdgeRequest(edge_id="edge-b", draining=False), metadata=op
    )
    assert with_unknown.edge.placed_sessions == 2
    watch.cancel()


async def test_health_reflection_and_metrics(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    edge = await edge_factory()
    for address in (core.address, edge.address):
        health = health_pb2_grpc.HealthStub(channel_to(address))
        r = await health.Check(health_pb2.HealthCheckRequest())
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel_to(edge.address))

    async def ask() -> object:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for resp in refl.ServerReflectionInfo(ask()):
        names = {s.name for s in resp.list_services_response.service}
        assert "telehealth.v1.VitalsService" in names
        break
    await open_session(core, channel_to)
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(core.http.url + "/metrics") as r:
            text = await r.text()
        assert 'telehealth_core_placements_total{outcome="same_zone"} 1.0' in text
        assert "telehealth_rpc_duration_seconds_bucket" in text
        async with http.get(edge.http.url + "/metrics") as r:
            assert "telehealth_edge_active_sessions" in await r.text()
    await eventually(
        lambda: core.edges.edges["edge-a"].reported_sessions == 1, what="load reported"
    )


async def test_kubernetes_removing_an_endpoint_replaces_at_once(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    from core_services.edges.discovery import DiscoveredEdge

    await edge_factory("edge-a", "zone-a")
    await edge_factory("edge-b", "zone-b")
    opened = await open_session(core, channel_to, "zone-a")
    assert opened.session.edge_id == "edge-a"
    both = [
        DiscoveredEdge("edge-a", "zone-a", "10.0.0.1:50061", True),
        DiscoveredEdge("edge-b", "zone-b", "10.0.0.2:50061", True),
    ]
    assert await core.edges.apply_discovery(both) == []
    # The heartbeat timeout is long; the endpoint going away is enough.
    assert await core.edges.apply_discovery(both[1:]) == ["edge-a"]
    assert core.directory.sessions[opened.session.session_id].edge_id == "edge-b"


async def test_edge_declared_dead_registers_again_and_lets_go_of_moved_sessions(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    """The split brain: the core gives up on a live edge (its link stalled past the timeout)
    and re-places its sessions. The edge's stream is ended, it registers again, and every
    session it still holds is released there naming the new edge."""
    from core_services.sessions.domain import EdgeState

    edge_a = await edge_factory("edge-a", "zone-a")
    await edge_factory("edge-b", "zone-b")
    opened = await open_session(core, channel_to, "zone-a")
    sid = opened.session.session_id
    await eventually(lambda: sid in edge_a.sessions.assignments, what="assigned on edge-a")
    first_token = core.edges.edges["edge-a"].stream_token
    assert await core.edges.mark_dead(["edge-a"], "test: link stalled") == ["edge-a"]
    assert core.directory.sessions[sid].edge_id == "edge-b"
    await eventually(
        lambda: (
            core.edges.edges["edge-a"].state is EdgeState.HEALTHY
            and core.edges.edges["edge-a"].stream_token is not first_token
        ),
        what="edge-a registered again",
    )
    a = await eventually(
        lambda: (x := edge_a.sessions.assignments.get(sid)) and x.released and x,
        what="edge-a released the moved session",
    )
    assert (a.released, a.new_edge_id) == ("moved", "edge-b")
    assert core.metrics.reconciled_releases._value.get() >= 1
    # Nothing else is released: a session placed on edge-a now stays there.
    on_a = await open_session(core, channel_to, "zone-a", patient="p-2")
    assert on_a.session.edge_id == "edge-a"
    await eventually(
        lambda: on_a.session.session_id in edge_a.sessions.assignments, what="assigned again"
    )
    await eventually(
        lambda: core.directory.live.get(on_a.session.session_id), what="reported by edge-a"
    )
    assert edge_a.sessions.assignments[on_a.session.session_id].released is None


async def test_kubernetes_not_ready_then_ready_brings_the_edge_back(
    core: CoreServer, edge_factory: EdgeFactory
) -> None:
    from core_services.edges.discovery import DiscoveredEdge
    from core_services.sessions.domain import EdgeState

    await edge_factory("edge-a", "zone-a")
    entry = core.edges.edges["edge-a"]
    not_ready = [DiscoveredEdge("edge-a", "zone-a", "10.0.0.1:50061", False)]
    assert await core.edges.apply_discovery(not_ready) == ["edge-a"]
    # It registers again at once, but stays out of placement while not ready.
    first_token = entry.stream_token
    await eventually(
        lambda: entry.outbox is not None and entry.stream_token is not first_token,
        what="edge-a registered again",
    )
    assert entry.state is EdgeState.DEAD
    ready = [DiscoveredEdge("edge-a", "zone-a", "10.0.0.1:50061", True)]
    assert await core.edges.apply_discovery(ready) == []
    assert entry.state is EdgeState.HEALTHY


async def test_restarted_core_gives_edges_the_timeout_plus_their_backoff(tmp_path: Path) -> None:
    """Liveness clocks start when the core serves, not when it loads the store: an edge known
    from before the restart has the heartbeat timeout plus its longest reconnect wait."""
    from prometheus_client import CollectorRegistry

    from core_services.edges.registry import EdgeRegistry
    from core_services.store import SqlStore
    from telehealth.rpc import EDGE_RECONNECT_MAX_S
    from telehealth.telemetry.metrics import CoreMetrics

    store = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'core.db'}")
    await store.start()
    now = [1000.0]
    try:
        before = EdgeRegistry(store, CoreMetrics(CollectorRegistry()), 3.0, clock=lambda: now[0])
        await before.connect("edge-a", "zone-a", "127.0.0.1:1", 10)
        restarted = EdgeRegistry(store, CoreMetrics(CollectorRegistry()), 3.0, clock=lambda: now[0])
        await restarted.load()
        now[0] += 60.0  # a slow start-up (migrations, a big store) judges nobody
        assert await restarted.check_liveness() == []
        restarted.start_liveness(EDGE_RECONNECT_MAX_S)
        now[0] += 3.0 + EDGE_RECONNECT_MAX_S - 0.01
        assert await restarted.check_liveness() == []
        now[0] += 0.02
        assert await restarted.check_liveness() == ["edge-a"]
    finally:
        await store.close()
    # The edge side of the bargain: its waits between attempts stay well inside the timeout.
    assert EDGE_RECONNECT_MAX_S <= 3.0 / 2
