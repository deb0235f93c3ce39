"""Device to edge to subscriber over real gRPC on loopback."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import grpc

from core_services.server import CoreServer
from telehealth.rpc import bearer
from telehealth.v1 import sessions_pb2, sessions_pb2_grpc, vitals_pb2, vitals_pb2_grpc
from tests.conftest import EdgeFactory, eventually, staff


def make_batch(session_id: str, seq: int, hr: float = 72.0) -> vitals_pb2.VitalsBatch:
    now = time.time_ns()
    b = vitals_pb2.VitalsBatch(session_id=session_id, seq=seq, device_time_unix_ns=now)
    b.vitals.add(
        device_time_unix_ns=now,
        heart_rate_bpm=hr,
        spo2_percent=97,
        respiration_rate_bpm=16,
        systolic_mmhg=120,
        diastolic_mmhg=80,
        temperature_c=36.8,
        consciousness=vitals_pb2.CONSCIOUSNESS_ALERT,
        oxygen_support=vitals_pb2.OXYGEN_SUPPORT_AIR,
    )
    b.waveforms.add(
        kind=vitals_pb2.WAVEFORM_KIND_ECG_LEAD_II,
        start_time_unix_ns=now,
        sample_rate_hz=250,
        samples=[0.0] * 10,
    )
    return b


async def requests(
    batches: list[vitals_pb2.VitalsBatch],
) -> AsyncIterator[vitals_pb2.PublishVitalsRequest]:
    for b in batches:
        yield vitals_pb2.PublishVitalsRequest(batch=b)


async def open_session(
    core: CoreServer,
    channel_to: Callable[[str], grpc.aio.Channel],
    zone: str = "zone-a",
    patient: str = "p-1",
) -> sessions_pb2.OpenSessionResponse:
    stub = sessions_pb2_grpc.SessionsServiceStub(channel_to(core.address))
    return await stub.Open(sessions_pb2.OpenSessionRequest(patient_id=patient, zone=zone))


async def test_batches_reach_subscriber_in_order_without_loss(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: Callable[[str], grpc.aio.Channel]
) -> None:
    edge = await edge_factory()
    opened = await open_session(core, channel_to)
    assert opened.assignment.edge_id == "edge-a"
    sid = opened.session.session_id
    sessions = sessions_pb2_grpc.SessionsServiceStub(channel_to(core.address))
    viewer = await sessions.Attach(
        sessions_pb2.AttachSessionRequest(session_id=sid, role=sessions_pb2.ROLE_VIEWER),
        metadata=await staff(core, "clinician", ("p-1",)),
    )
    vitals = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    sub = vitals.Subscribe(
        vitals_pb2.SubscribeVitalsRequest(session_id=sid), metadata=bearer(viewer.assignment.token)
    )
    await eventually(lambda: edge.sessions.subscribers == 1, what="subscriber joined")
    n = 200
    acks = [
        r.received_seq
        async for r in vitals.Publish(
            requests([make_batch(sid, i) for i in range(1, n + 1)]),
            metadata=bearer(opened.assignment.token),
        )
    ]
    assert acks[-1] == n
    seen: list[int] = []
    news2: list[int] = []
    async for ev in sub:
        if ev.HasField("batch"):
            seen.append(ev.batch.seq)
        elif ev.HasField("news2"):
            news2.append(ev.news2.total)
        if len(seen) == n:
            break
    sub.cancel()
    assert seen == list(range(1, n + 1))
    assert news2 and news2[-1] == 0
