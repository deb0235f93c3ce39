"""Sessions at the core: open, attach, list, watch, close, and re-placement when an edge dies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from core_services.server import CoreServer
from telehealth.rpc import bearer
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
    # The call reaches the server when first read: a session opened before that comes in the
    # snapshot, one opened after as OPENED. Either way the watcher learns of it first.
    assert ev.kind in (
        sessions_pb2.SESSION_EVENT_KIND_SNAPSHOT,
        sessions_pb2.SESSION_EVENT_KIND_OPENED,
    )
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


async def test_session_left_on_a_dead_edge_goes_to_the_next_edge_that_comes(
    edge_factory: EdgeFactory, core: CoreServer, channel_to: ChannelTo
) -> None:
    edge_a = await edge_factory("edge-a", "zone-a")
    opened = await open_session(core, channel_to, "zone-a")
    sid = opened.session.session_id
    stub = sessions_pb2_grpc.SessionsServiceStub(channel_to(core.address))
    publisher = sessions_pb2.ROLE_PUBLISHER
    await edge_a.stop(grace=0)
    # Its device reports it: the core finds it dead, but no edge can take the session.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Attach(
            sessions_pb2.AttachSessionRequest(
                session_id=sid, role=publisher, unreachable_edge_id="edge-a"
            ),
            metadata=bearer(opened.assignment.token),
        )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert core.directory.sessions[sid].edge_id == "edge-a"
    # Asking again changes nothing while there is nowhere to go.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Attach(
            sessions_pb2.AttachSessionRequest(session_id=sid, role=publisher),
            metadata=bearer(opened.assignment.token),
        )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # An edge joins: the waiting session is placed there at once, and Attach says so.
    await edge_factory("edge-c", "zone-a")
    await eventually(
        lambda: core.directory.sessions[sid].edge_id == "edge-c", what="session re-placed"
    )
    again = await stub.Attach(
        sessions_pb2.AttachSessionRequest(session_id=sid, role=publisher),
        metadata=bearer(opened.assignment.token),
    )
    assert again.assignment.edge_id == "edge-c"
    assert again.session.placements == 2


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


async def test_drain_is_make_before_break_for_the_device(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    """Drain: the old edge tells the device the session is moving and keeps serving it; the
    device streams to the new edge, and only then is the old edge released. No reconnect."""
    from clients.device import DeviceAgent, DeviceConfig
    from telehealth.v1 import archive_pb2, archive_pb2_grpc

    edge_a = await edge_factory("edge-a", "zone-a")
    await edge_factory("edge-b", "zone-b")
    agent = DeviceAgent(DeviceConfig(core.address, "p-drain", "zone-a"))
    stop = asyncio.Event()
    run = asyncio.create_task(agent.run(stop))
    await eventually(lambda: agent.received_seq >= 10, what="streaming to edge-a")
    sid = agent.session_id
    edges = edges_pb2_grpc.EdgesServiceStub(channel_to(core.address))
    op = await staff(core, "operator")
    drained = await edges.Drain(
        edges_pb2.DrainEdgeRequest(edge_id="edge-a", draining=True), metadata=op
    )
    assert drained.edge.placed_sessions == 0
    assert core.directory.sessions[sid].edge_id == "edge-b"
    await eventually(
        lambda: agent.assignment and agent.assignment.edge_id == "edge-b", what="device moved"
    )
    a = await eventually(
        lambda: (x := edge_a.sessions.assignments.get(sid)) and x.released and x,
        what="edge-a released once the device published on edge-b",
    )
    assert (a.released, a.new_edge_id, a.moving_to) == ("moved", "edge-b", "edge-b")
    mark = agent.received_seq
    await eventually(lambda: agent.received_seq > mark + 10, what="streaming on edge-b")
    assert agent.stats.handovers == 1
    assert agent.stats.reconnects == 0  # make-before-break: the stream was never lost
    stop.set()
    await asyncio.wait_for(run, 30)
    wm = await archive_pb2_grpc.ArchiveServiceStub(channel_to(core.address)).GetWatermark(
        archive_pb2.GetWatermarkRequest(session_id=sid)
    )
    assert wm.watermark.archived_seq == wm.archived_batches == agent.next_seq() - 1


def hung_edge(core: CoreServer, edge_id: str, zone: str) -> Awaitable[object]:
    """An edge whose heartbeat stream is up but which never answers (a hung process): the
    core's own registry entry, its outbox read by nobody."""
    return core.edges.connect(edge_id, zone, "127.0.0.1:9", 100)


async def test_drain_gives_up_an_edge_that_never_confirms_for_another(
    core: CoreServer,
    edge_factory: EdgeFactory,
    channel_to: ChannelTo,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from core_services.edges.registry import AssignSession, ReleaseSession
    from core_services.sessions import directory as directory_module

    monkeypatch.setattr(directory_module, "READY_TIMEOUT_S", 0.3)
    await edge_factory("edge-a", "zone-a")
    await edge_factory("edge-c", "zone-c")
    await hung_edge(core, "edge-hung", "zone-b")  # nearer to zone-a than zone-c
    s1 = (await open_session(core, channel_to, "zone-a", "p-1")).session.session_id
    s2 = (await open_session(core, channel_to, "zone-a", "p-2")).session.session_id
    await core.edges.set_draining("edge-a", True)
    drain = asyncio.create_task(core.directory.drain("edge-a"))
    # While s1 waits for the hung edge, s2 is closed: drain must carry on past it.
    await eventually(
        lambda: ("edge-hung", s1, "assigned") in core.directory._waiters, what="s1 waiting"
    )
    await core.directory.close(s2)
    assert await drain == 1
    assert core.directory.sessions[s1].edge_id == "edge-c"
    assert core.metrics.move_attempts_unconfirmed.labels("drain")._value.get() == 1
    outbox = core.edges.edges["edge-hung"].outbox
    assert outbox is not None
    sent = [outbox.get_nowait() for _ in range(outbox.qsize())]
    about_s1 = [
        type(c)
        for c in sent
        if (isinstance(c, AssignSession) and c.session.session_id == s1)
        or (isinstance(c, ReleaseSession) and c.session_id == s1)
    ]
    # The hung edge was given the session, then told to let it go again.
    assert about_s1 == [AssignSession, ReleaseSession]


async def test_move_no_edge_confirms_leaves_the_session_where_it_was(
    core: CoreServer,
    edge_factory: EdgeFactory,
    channel_to: ChannelTo,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from core_services.sessions import directory as directory_module

    monkeypatch.setattr(directory_module, "READY_TIMEOUT_S", 0.3)
    edge_a = await edge_factory("edge-a", "zone-a")
    await hung_edge(core, "edge-hung", "zone-b")
    sid = (await open_session(core, channel_to, "zone-a")).session.session_id
    await eventually(lambda: core.directory.live.get(sid), what="reported by edge-a")
    # A zone change: the best edge left is the one it is on, so it stays there.
    s, moved = await core.directory.relocate(sid, "zone_change", "zone-b")
    assert (moved, s.edge_id, s.zone) == (False, "edge-a", "zone-b")
    # A drain has nowhere else to go: the move fails, and the drain survives it.
    with pytest.raises(directory_module.MoveNotConfirmed, match="stays on edge-a"):
        await core.directory.relocate(sid, "drain")
    assert await core.directory.drain("edge-a") == 0
    assert core.directory.sessions[sid].edge_id == "edge-a"
    assert core.metrics.moves_failed.labels("zone_change")._value.get() == 1
    assert core.metrics.moves_failed.labels("drain")._value.get() == 2
    assert edge_a.sessions.assignments[sid].released is None


@pytest.mark.postgres
async def test_two_replicas_confirm_a_session_coming_back_to_its_edge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replica 2 moves a session whose edges hold their streams to replica 1: each new edge's
    confirmation reaches replica 2 - also when the session comes back to an edge that
    confirmed it before (it was once per edge and session, so that move waited in vain)."""
    import uuid

    import asyncpg

    from core_services.sessions import directory as directory_module
    from edge_nodes.server import EdgeServer
    from telehealth.config import EdgeSettings
    from tests.conftest import core_settings

    monkeypatch.setattr(directory_module, "HANDOVER_TIMEOUT_S", 0.5)
    db = "tsess_" + uuid.uuid4().hex[:10]
    admin = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test")
    await admin.execute(f'CREATE DATABASE "{db}"')
    url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{db}"
    cores: list[CoreServer] = []
    edges: list[EdgeServer] = []
    try:
        for i in (1, 2):
            c = CoreServer(
                core_settings(
                    tmp_path / f"core-{i}",
                    cluster=True,
                    database_url=url,
                    keys_dir=tmp_path / "keys",
                )
            )
            await c.start()
            cores.append(c)
        c1, c2 = cores
        for edge_id, zone in (("edge-a", "zone-a"), ("edge-b", "zone-b")):
            e = EdgeServer(
                EdgeSettings.model_validate(
                    {
                        "edge_id": edge_id,
                        "zone": zone,
                        "grpc_listen": "127.0.0.1:0",
                        "http_listen": "127.0.0.1:0",
                        "core_address": c1.address,  # both streams to replica 1
                        "heartbeat_interval_s": 0.1,
                        "log_format": "text",
                        "data_dir": tmp_path / edge_id,
                    }
                )
            )
            await e.start()
            edges.append(e)
        edge_a, edge_b = edges
        await eventually(lambda: {"edge-a", "edge-b"} <= set(c2.edges.edges), what="c2 sees both")
        s, _ = await c2.directory.open(patient_id="p-1", zone="zone-a", spo2_scale=1, device_id="")
        sid = s.session_id
        await eventually(lambda: sid in edge_a.sessions.assignments, what="assigned on edge-a")
        s, moved = await c2.directory.relocate(sid, "zone_change", "zone-b")
        assert (moved, s.edge_id) == (True, "edge-b")
        # Straight back, while edge-a still holds it (no publisher moved yet).
        s, moved = await c2.directory.relocate(sid, "zone_change", "zone-a")
        assert (moved, s.edge_id) == (True, "edge-a")
        assert c2.metrics.move_attempts_unconfirmed.labels("zone_change")._value.get() == 0
        # Both delayed releases have run: edge-b let go, edge-a (its home again) did not.
        await eventually(lambda: not c2.directory._background, what="releases done")
        await eventually(
            lambda: edge_b.sessions.assignments[sid].released == "moved", what="edge-b released"
        )
        assert edge_a.sessions.assignments[sid].released is None
        await eventually(
            lambda: c1.directory.sessions[sid].edge_id == "edge-a", what="replica 1 agrees"
        )
    finally:
        for e in edges:
            await e.stop(grace=0)
        for c in cores:
            await c.stop(grace=0)
        await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        await admin.close()


async def test_edge_dialled_by_ip_is_checked_against_its_tls_server_name(tmp_path: Path) -> None:
    """In a cluster an edge is dialled by pod IP but its certificate names its Service: the
    name travels heartbeat -> registry -> assignment, and the core's own probe uses it."""
    from edge_nodes.server import EdgeServer
    from telehealth.config import EdgeSettings
    from telehealth.rpc import bearer, secure_channel
    from telehealth.security.pki import init_pki, load_authority, write_certificate
    from tests.conftest import core_settings, tls_kw

    pki = init_pki(tmp_path / "pki", services=["core"])
    ca = load_authority(tmp_path / "pki")
    assert ca is not None
    name = "telehealth-edge-zone-a"
    edge_tls = write_certificate(tmp_path / "pki", ca, "edge-a", [name])  # no IP in it

    core = CoreServer(core_settings(tmp_path, **tls_kw(pki["core"])))
    await core.start()
    edge = EdgeServer(
        EdgeSettings.model_validate(
            {
                "edge_id": "edge-a",
                "zone": "zone-a",
                "grpc_listen": "127.0.0.1:0",
                "http_listen": "127.0.0.1:0",
                "core_address": core.address,
                "heartbeat_interval_s": 0.1,
                "log_format": "text",
                "data_dir": tmp_path / "edge-a",
                "tls_server_name": name,
                **tls_kw(edge_tls),
            }
        )
    )
    try:
        await edge.start()
        async with secure_channel(core.address, pki["device"]) as ch:
            sessions = sessions_pb2_grpc.SessionsServiceStub(ch)
            opened = await sessions.Open(
                sessions_pb2.OpenSessionRequest(patient_id="p-1", zone="zone-a"), timeout=5
            )
            a = opened.assignment
            assert (a.edge_address, a.edge_tls_server_name) == (edge.address, name)

            async def health(server_name: str) -> grpc.StatusCode:
                async with secure_channel(
                    a.edge_address, pki["device"], server_name=server_name
                ) as e:
                    try:
                        await health_pb2_grpc.HealthStub(e).Check(
                            health_pb2.HealthCheckRequest(), timeout=3
                        )
                    except grpc.aio.AioRpcError as err:
                        return err.code()
                return grpc.StatusCode.OK

            assert await health(name) == grpc.StatusCode.OK
            assert await health("") == grpc.StatusCode.UNAVAILABLE  # 127.0.0.1 is not in it
            # A device that says the edge is unreachable: the core's probe reaches it by name,
            # so the edge is not declared dead and the session stays.
            attached = await sessions.Attach(
                sessions_pb2.AttachSessionRequest(
                    session_id=opened.session.session_id,
                    role=sessions_pb2.ROLE_PUBLISHER,
                    unreachable_edge_id="edge-a",
                ),
                metadata=bearer(a.token),
                timeout=5,
            )
            assert attached.assignment.edge_id == "edge-a"
            assert attached.assignment.edge_tls_server_name == name
    finally:
        await edge.stop(grace=0)
        await core.stop(grace=0)


async def test_open_sessions_gauge_and_placement_decision_histogram(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    """Kept incrementally (no walk over edges or sessions per Open), and still right."""
    await edge_factory("edge-a", "zone-a")
    await edge_factory("edge-b", "zone-b")
    opened = [
        await open_session(core, channel_to, f"zone-{z}", f"p-{i}") for i, z in enumerate("aab")
    ]
    stub = sessions_pb2_grpc.SessionsServiceStub(channel_to(core.address))
    op = await staff(core, "operator")
    await stub.Close(
        sessions_pb2.CloseSessionRequest(session_id=opened[0].session.session_id), metadata=op
    )

    def sample(name: str, **labels: str) -> float | None:
        return core.registry_metrics.get_sample_value(name, labels)

    assert sample("telehealth_core_open_sessions", zone="zone-a") == 1
    assert sample("telehealth_core_open_sessions", zone="zone-b") == 1
    assert sample("telehealth_core_placement_decision_seconds_count") == 3
    # Until edge-a's next report the closed session may still count (the edge's own view).
    await eventually(
        lambda: sample("telehealth_core_edge_load_ratio", edge="edge-a", zone="zone-a") == 1 / 1000,
        what="edge-a's load after the close",
    )


async def test_undecodable_messages_are_refused_by_name(
    core: CoreServer, channel_to: ChannelTo
) -> None:
    """Bytes that are not the method's protobuf get INVALID_ARGUMENT naming the method, on
    unary calls and on every message of a stream (not UNKNOWN, as if the server had failed)."""
    ch = channel_to(core.address)
    garbage = b"\x0a\xff\xff"  # field 1, a length running past the end
    open_raw = ch.unary_unary("/telehealth.v1.SessionsService/Open")
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await open_raw(garbage, timeout=5)
    assert unary.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request to Open is not a valid protobuf message" in (unary.value.details() or "")
    heartbeat_raw = ch.stream_stream("/telehealth.v1.EdgesService/Heartbeat")

    async def beats() -> AsyncIterator[bytes]:
        first = edges_pb2.HeartbeatRequest(edge_id="edge-x", zone="zone-a", address="127.0.0.1:9")
        yield first.SerializeToString()
        yield garbage

    with pytest.raises(grpc.aio.AioRpcError) as stream:
        async for _ in heartbeat_raw(beats(), timeout=5):
            pass
    assert stream.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request to Heartbeat is not a valid protobuf message" in (stream.value.details() or "")
