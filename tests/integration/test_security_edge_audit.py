"""Edge audit: a read is on disk before data leaves the edge, survives a restart with the core
away, every pending record ships (not only the first batch), and refused reads are recorded
as denied. The viewer cap is one slot counter for every kind of viewer. Ward listings name
the patients they showed."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from core_services.server import CoreServer
from edge_nodes.guard import AUDIT_BATCH, AuditTrail, EdgeGuard
from edge_nodes.server import EdgeServer
from telehealth.config import EdgeSettings
from telehealth.errors import ResourceExhausted
from telehealth.rpc import bearer
from telehealth.security.tokens import TokenVerifier
from telehealth.v1 import sessions_pb2, sessions_pb2_grpc, vitals_pb2, vitals_pb2_grpc
from tests.conftest import EdgeFactory, core_settings, eventually, staff
from tests.integration.test_vitals_path import make_batch, open_session, requests

ChannelTo = Callable[[str], grpc.aio.Channel]


async def chain_rows(core: CoreServer) -> list[tuple[str, str, str, str, str]]:
    return [
        (e.event.subject, e.event.action, e.event.session_id, e.event.outcome, e.event.source)
        async for e in core.security.audit.entries()
    ]


def outbox(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("SELECT COUNT(*) FROM audit_outbox").fetchone()[0])
    finally:
        db.close()


def edge_settings(core_address: str, data_dir: Path) -> EdgeSettings:
    return EdgeSettings.model_validate(
        {
            "edge_id": "edge-a",
            "grpc_listen": "127.0.0.1:0",
            "http_listen": "127.0.0.1:0",
            "core_address": core_address,
            "heartbeat_interval_s": 0.1,
            "data_dir": data_dir,
            "log_format": "text",
        }
    )


async def test_a_read_is_on_disk_before_data_flows_and_survives_a_restart(
    tmp_path: Path, channel_to: ChannelTo
) -> None:
    settings = core_settings(tmp_path)
    core = CoreServer(settings)
    await core.start()
    edge = EdgeServer(edge_settings(core.address, tmp_path / "edge-a"))
    await edge.start()
    opened = await open_session(core, channel_to)
    sid = opened.session.session_id
    dr = await staff(core, "clinician", ("p-1",))
    viewer = await sessions_pb2_grpc.SessionsServiceStub(channel_to(core.address)).Attach(
        sessions_pb2.AttachSessionRequest(session_id=sid, role=sessions_pb2.ROLE_VIEWER),
        metadata=dr,
    )
    vitals = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    acks = vitals.Publish(requests([make_batch(sid, 1)]), metadata=bearer(opened.assignment.token))
    assert [r.received_seq async for r in acks][-1] == 1
    # The core goes away: the edge goes on serving (tokens are checked offline), and must
    # keep what it audits until the core is back, across its own restart.
    await core.stop(grace=0)
    sub = vitals.Subscribe(
        vitals_pb2.SubscribeVitalsRequest(session_id=sid, include_latest=True),
        metadata=bearer(viewer.assignment.token),
    )
    await sub.read()  # the first event: its audit record is already committed
    assert outbox(tmp_path / "edge-a" / "edge-audit.db") == 1
    sub.cancel()
    await edge.stop(grace=0)
    assert outbox(tmp_path / "edge-a" / "edge-audit.db") == 1
    core = CoreServer(settings)
    await core.start()
    edge = EdgeServer(edge_settings(core.address, tmp_path / "edge-a"))
    await edge.start()
    try:
        await eventually(lambda: edge.audit.pending == 0, what="audit shipped after restart")
        claims = edge.verifier.identify(viewer.assignment.token)
        assert claims is not None
        rows = await chain_rows(core)
        assert [r for r in rows if r[1] == "vitals.subscribe"] == [
            (claims.subject_id, "vitals.subscribe", sid, "allowed", "edge-a")
        ]
    finally:
        await edge.stop(grace=0)
        await core.stop(grace=0)


async def test_every_pending_record_ships_at_stop(core: CoreServer, tmp_path: Path) -> None:
    trail = AuditTrail("edge-a", tmp_path / "edge-audit.db")
    # The core knows edge-a only once it heartbeats; register it the way an edge does.
    await core.edges.connect("edge-a", "zone-a", "127.0.0.1:1", 10)
    n = 3 * AUDIT_BATCH + 7
    for i in range(n):
        trail.record(
            subject=f"dr-{i}", role="viewer", action="vitals.subscribe",
            session_id=f"ses_{i}", peer="ipv4:127.0.0.1:1",
        )  # fmt: skip
    stop = asyncio.Event()
    stop.set()  # a graceful stop with everything still pending
    settings = EdgeSettings.model_validate({"edge_id": "edge-a", "core_address": core.address})
    await trail.ship(settings, stop)
    assert trail.pending == 0 and trail.shipped == n
    rows = await chain_rows(core)
    assert sorted(s for s, *_ in rows) == sorted(f"dr-{i}" for i in range(n))
    trail.close()


async def test_refused_reads_are_recorded_as_denied(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    edge = await edge_factory(max_subscribers_per_session=1)
    mine = await open_session(core, channel_to, patient="p-1")
    theirs = await open_session(core, channel_to, patient="p-2")
    dr = await staff(core, "clinician", ("p-1",))
    sessions = sessions_pb2_grpc.SessionsServiceStub(channel_to(core.address))
    viewer = await sessions.Attach(
        sessions_pb2.AttachSessionRequest(
            session_id=mine.session.session_id, role=sessions_pb2.ROLE_VIEWER
        ),
        metadata=dr,
    )
    vitals = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))

    async def code_of(sid: str, token: str) -> grpc.StatusCode:
        call = vitals.Subscribe(
            vitals_pb2.SubscribeVitalsRequest(session_id=sid, include_latest=True),
            metadata=bearer(token),
        )
        try:
            await call.read()
        except grpc.aio.AioRpcError as e:
            return e.code()
        return grpc.StatusCode.OK

    token = viewer.assignment.token
    # A genuine viewer token used for another patient's session: refused, recorded under
    # the clinician it names.
    assert await code_of(theirs.session.session_id, token) == grpc.StatusCode.PERMISSION_DENIED
    # Junk tokens, many times: one denied record per window, as unauthenticated.
    for i in range(5):
        assert await code_of(theirs.session.session_id, f"junk{i}") == (
            grpc.StatusCode.UNAUTHENTICATED
        )
    # Over the cap: the first view holds the only slot.
    first = vitals.Subscribe(
        vitals_pb2.SubscribeVitalsRequest(session_id=mine.session.session_id),
        metadata=bearer(token),
    )
    await eventually(lambda: edge.guard.subscribers.get(mine.session.session_id) == 1)
    assert await code_of(mine.session.session_id, token) == grpc.StatusCode.RESOURCE_EXHAUSTED
    first.cancel()
    await eventually(lambda: edge.audit.pending == 0, what="shipped")
    claims = edge.verifier.identify(token)
    assert claims is not None
    denied = [r for r in await chain_rows(core) if r[3] == "denied"]
    assert sorted(denied) == sorted(
        [
            (claims.subject_id, "vitals.subscribe", theirs.session.session_id, "denied", "edge-a"),
            ("unauthenticated", "vitals.subscribe", theirs.session.session_id, "denied", "edge-a"),
            (claims.subject_id, "vitals.subscribe", mine.session.session_id, "denied", "edge-a"),
        ]
    )


def test_viewer_slots_are_one_cap_for_every_kind_of_viewer(tmp_path: Path) -> None:
    settings = EdgeSettings.model_validate({"max_subscribers_per_session": 2})
    guard = EdgeGuard(settings, TokenVerifier(), AuditTrail("edge-a"))
    with guard.viewer_slot("ses_1"), guard.viewer_slot("ses_1"):
        assert guard.subscribers == {"ses_1": 2}
        with pytest.raises(ResourceExhausted, match="at most 2"), guard.viewer_slot("ses_1"):
            pass
        with guard.viewer_slot("ses_2"):
            assert guard.subscribers == {"ses_1": 2, "ses_2": 1}
    assert guard.subscribers == {}


async def test_a_listing_names_every_patient_it_shows(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    await edge_factory()
    a = await open_session(core, channel_to, patient="p-1")
    b = await open_session(core, channel_to, patient="p-2")
    await open_session(core, channel_to, patient="p-3")  # not this clinician's
    dr = await staff(core, "clinician", ("p-1", "p-2"))
    sessions = sessions_pb2_grpc.SessionsServiceStub(channel_to(core.address))
    listed = await sessions.List(sessions_pb2.ListSessionsRequest(), metadata=dr)
    assert {s.patient_id for s in listed.sessions} == {"p-1", "p-2"}
    got = {
        (e.event.action, e.event.patient_id, e.event.session_id)
        async for e in core.security.audit.entries()
        if e.event.action == "sessions.list"
    }
    assert got == {
        ("sessions.list", "p-1", a.session.session_id),
        ("sessions.list", "p-2", b.session.session_id),
    }
