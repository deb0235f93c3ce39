"""The browser's vitals WebSocket and clinicians' video are audited reads with a viewer cap,
like gRPC Subscribe: a record is durable before data flows, refusals are recorded as denied,
the WebSocket takes one of the session's viewer places, resumes after a seq without loss and
ends when its token expires. Rows are counted in the core's audit chain."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import grpc
import pytest

from core_services.server import CoreServer
from edge_nodes.server import EdgeServer
from telehealth.rpc import bearer
from telehealth.v1 import media_pb2, media_pb2_grpc, vitals_pb2, vitals_pb2_grpc
from tests.conftest import EdgeFactory, eventually
from tests.integration.test_media_call import (
    clinician_call,
    live_peer_connections,
    open_session,
    patient_call,
)
from tests.integration.test_vitals_path import make_batch, requests

ChannelTo = Callable[[str], grpc.aio.Channel]
Row = tuple[str, str, str, str]


# What the edge records (the core adds its own, e.g. session.attach_viewer for the token).
EDGE_ACTIONS = ("vitals.subscribe", "media.view", "media.watch")


async def rows(core: CoreServer, session_id: str) -> list[Row]:
    """(subject, action, outcome, role) of the session's edge audit entries in the core's
    chain."""
    return [
        (e.event.subject, e.event.action, e.event.outcome, e.event.role)
        async for e in core.security.audit.entries()
        if e.event.session_id == session_id and e.event.action in EDGE_ACTIONS
    ]


def recorded(edge: EdgeServer) -> int:
    """Records written at the edge so far (durable in its outbox, shipped or not)."""
    return edge.audit.pending + edge.audit.shipped


@asynccontextmanager
async def ws_view(
    edge: EdgeServer, sid: str, token: str, resume_after_seq: int | None = None
) -> AsyncIterator[tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]]:
    hello: dict[str, Any] = {"session_id": sid, "token": token}
    if resume_after_seq is not None:
        hello["resume_after_seq"] = resume_after_seq
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(edge.media.http_url + "/media/ws") as ws,
    ):
        await ws.send_json(hello)
        first = await ws.receive_json(timeout=10)
        yield ws, first


async def batch_seqs(ws: aiohttp.ClientWebSocketResponse, until: int) -> list[int]:
    seqs: list[int] = []
    while not seqs or seqs[-1] < until:
        msg = await ws.receive_json(timeout=10)
        if msg["type"] == "batch" and int(msg["batch"].get("seq", 0)):
            seqs.append(int(msg["batch"]["seq"]))
    return seqs


async def publish(
    edge: EdgeServer,
    channel_to: ChannelTo,
    sid: str,
    token: str,
    seqs: range | Callable[[str, int], vitals_pb2.VitalsBatch] = range(1, 2),
) -> None:
    """Publish batches seqs of sid (or one batch, seq 1, made by a function of (sid, seq))."""
    make = make_batch if isinstance(seqs, range) else seqs
    numbers = seqs if isinstance(seqs, range) else range(1, 2)
    vitals = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    acks = [
        r.received_seq
        async for r in vitals.Publish(
            requests([make(sid, i) for i in numbers]), metadata=bearer(token)
        )
    ]
    assert acks[-1] == numbers[-1]


@pytest.fixture
async def edge(edge_factory: EdgeFactory) -> EdgeServer:
    return await edge_factory(
        media_udp_port_min=41700, media_udp_port_max=41731, max_subscribers_per_session=2
    )


async def test_websocket_view_is_audited_before_data_and_refusals_are_denied_rows(
    core: CoreServer, edge: EdgeServer, channel_to: ChannelTo
) -> None:
    s = await open_session(core, channel_to, "p-ws")
    other = await open_session(core, channel_to, "p-other")
    before = recorded(edge)
    async with ws_view(edge, s.session_id, s.viewer_token) as (_, welcome):
        assert welcome["type"] == "welcome" and welcome["role"] == "viewer"
        # On disk at the edge before the welcome (the first data) was sent.
        assert recorded(edge) == before + 1
    # Another session's token, and no token at all: refused, and recorded as refused.
    async with ws_view(edge, s.session_id, other.viewer_token) as (_, refused):
        assert refused["type"] == "error" and refused["error"] == "permission_denied"
    async with ws_view(edge, s.session_id, "not-a-token") as (_, refused):
        assert refused["error"] == "unauthenticated"

    def summary(rs: list[Row]) -> list[tuple[str, str]]:
        return sorted((action, outcome) for _, action, outcome, _ in rs)

    await eventually(
        lambda: _count(core, s.session_id, 3), 15, "three WebSocket rows reach the core"
    )
    got = await rows(core, s.session_id)
    assert summary(got) == [
        ("vitals.subscribe", "allowed"),
        ("vitals.subscribe", "denied"),
        ("vitals.subscribe", "denied"),
    ]
    allowed = next(r for r in got if r[2] == "allowed")
    assert allowed[0].startswith("clinician-") and allowed[3] == "viewer"
    assert any(r[0] == "unauthenticated" for r in got)


async def _count(core: CoreServer, sid: str, n: int) -> bool:
    return len(await rows(core, sid)) >= n


async def test_websocket_and_grpc_views_share_the_viewer_cap(
    core: CoreServer, edge: EdgeServer, channel_to: ChannelTo
) -> None:
    s = await open_session(core, channel_to, "p-cap")
    vitals = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    grpc_view = vitals.Subscribe(
        vitals_pb2.SubscribeVitalsRequest(session_id=s.session_id, include_latest=True),
        metadata=bearer(s.viewer_token),
    )
    await publish(edge, channel_to, s.session_id, s.publisher_token, range(1, 2))
    first = await grpc_view.read()
    assert first is not grpc.aio.EOF
    async with ws_view(edge, s.session_id, s.viewer_token) as (_, welcome):
        assert welcome["type"] == "welcome"
        # Two places taken (one gRPC, one WebSocket): a third view of either kind is refused.
        async with ws_view(edge, s.session_id, s.viewer_token) as (ws3, full):
            assert full["type"] == "error" and full["error"] == "resource_exhausted"
            assert "at most 2" in full["message"]
            await ws3.receive(timeout=5)
            assert ws3.close_code == 4429
    grpc_view.cancel()
    # The places come back when views close.
    await eventually(lambda: edge.guard.subscribers.get(s.session_id, 0) == 0, 10, "freed")
    async with ws_view(edge, s.session_id, s.viewer_token) as (_, again):
        assert again["type"] == "welcome"
    await eventually(
        lambda: _count(core, s.session_id, 4), 15, "allowed and denied rows at the core"
    )
    outcomes = sorted(o for _, a, o, _ in await rows(core, s.session_id) if a == "vitals.subscribe")
    assert outcomes == ["allowed", "allowed", "allowed", "denied"]


async def test_websocket_resumes_after_a_seq_without_loss_or_duplicates(
    core: CoreServer, edge: EdgeServer, channel_to: ChannelTo
) -> None:
    s = await open_session(core, channel_to, "p-resume")
    await publish(edge, channel_to, s.session_id, s.publisher_token, range(1, 11))
    async with ws_view(edge, s.session_id, s.viewer_token, resume_after_seq=5) as (ws, welcome):
        assert welcome["type"] == "welcome"
        assert await batch_seqs(ws, 10) == [6, 7, 8, 9, 10]
        await publish(edge, channel_to, s.session_id, s.publisher_token, range(11, 13))
        assert await batch_seqs(ws, 12) == [11, 12]
    async with ws_view(edge, s.session_id, s.viewer_token, resume_after_seq=-1) as (_, bad):
        assert bad["error"] == "invalid_argument" and "resume_after_seq" in bad["message"]


async def test_websocket_ends_when_its_token_expires(
    core: CoreServer, edge: EdgeServer, channel_to: ChannelTo, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core.issuer, "ttl_s", 3)
    s = await open_session(core, channel_to, "p-expiry")
    monkeypatch.setattr(core.issuer, "ttl_s", 900)
    async with ws_view(edge, s.session_id, s.viewer_token) as (ws, welcome):
        assert welcome["type"] == "welcome" and welcome["token_expires_unix_ms"] > 0
        while True:
            msg = await ws.receive_json(timeout=15)
            if msg["type"] == "error":
                break
        assert msg["error"] == "unauthenticated" and "token expired" in msg["message"]
        await ws.receive(timeout=5)
        assert ws.close_code == 4401


async def test_clinician_video_and_watching_the_call_are_audited(
    core: CoreServer, edge: EdgeServer, channel_to: ChannelTo
) -> None:
    s = await open_session(core, channel_to, "p-video-audit")
    other = await open_session(core, channel_to, "p-someone-else")
    patient, clinician = patient_call(edge, s), clinician_call(edge, s)
    stub = media_pb2_grpc.MediaServiceStub(channel_to(edge.address))
    try:
        await patient.start()
        # The patient's device follows its call's state (what to send): a watch of its own.
        await eventually(lambda: patient.state is not None, 10, "patient watching")
        before = recorded(edge)
        await clinician.start()
        assert recorded(edge) == before + 1  # media.view, before the answer went back
        watch = stub.WatchCall(
            media_pb2.WatchCallRequest(session_id=s.session_id), metadata=bearer(s.viewer_token)
        )
        first = await watch.read()
        assert isinstance(first, media_pb2.WatchCallResponse) and first.HasField("state")
        watch.cancel()
        refused = stub.WatchCall(
            media_pb2.WatchCallRequest(session_id=s.session_id), metadata=bearer(other.viewer_token)
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await refused.read()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        await eventually(lambda: _count(core, s.session_id, 4), 15, "video rows at the core")
        got = sorted((a, o, role) for _, a, o, role in await rows(core, s.session_id))
        # The patient publishing its own video is not a read; the clinician's view is.
        assert got == [
            ("media.view", "allowed", "viewer"),
            ("media.watch", "allowed", "publisher"),
            ("media.watch", "allowed", "viewer"),
            ("media.watch", "denied", "viewer"),
        ]
    finally:
        await patient.hangup()
        await clinician.hangup()
    await eventually(lambda: edge.media.calls.peer_count == 0, 10, "peers closed")
    assert live_peer_connections() == 0
