"""Device to edge to subscriber over real gRPC on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from core_services.server import CoreServer
from telehealth.rpc import bearer
from telehealth.v1 import sessions_pb2, sessions_pb2_grpc, vitals_pb2, vitals_pb2_grpc
from tests.conftest import EdgeFactory, eventually, staff

ChannelTo = Callable[[str], grpc.aio.Channel]


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


class Feed:
    """A publish request stream the test writes to batch by batch (the stream stays open)."""

    def __init__(self) -> None:
        self._q: asyncio.Queue[vitals_pb2.PublishVitalsRequest | None] = asyncio.Queue()

    def send(self, batch: vitals_pb2.VitalsBatch | None = None, refresh_token: str = "") -> None:
        req = vitals_pb2.PublishVitalsRequest(refresh_token=refresh_token)
        if batch is not None:
            req.batch.CopyFrom(batch)
        self._q.put_nowait(req)

    def close(self) -> None:
        self._q.put_nowait(None)

    async def requests(self) -> AsyncIterator[vitals_pb2.PublishVitalsRequest]:
        while (req := await self._q.get()) is not None:
            yield req


async def read_ack(
    call: grpc.aio.StreamStreamCall[Any, vitals_pb2.PublishVitalsResponse],
) -> vitals_pb2.PublishVitalsResponse:
    resp = await call.read()
    assert isinstance(resp, vitals_pb2.PublishVitalsResponse), "publish stream ended"
    return resp


async def viewer_token(core: CoreServer, channel_to: ChannelTo, sid: str) -> str:
    sessions = sessions_pb2_grpc.SessionsServiceStub(channel_to(core.address))
    viewer = await sessions.Attach(
        sessions_pb2.AttachSessionRequest(session_id=sid, role=sessions_pb2.ROLE_VIEWER),
        metadata=await staff(core, "clinician", ("p-1",)),
    )
    return viewer.assignment.token


async def next_event(
    sub: grpc.aio.UnaryStreamCall[Any, vitals_pb2.SubscribeVitalsResponse], kind: str
) -> vitals_pb2.SubscribeVitalsResponse:
    while True:
        ev = await sub.read()
        assert isinstance(ev, vitals_pb2.SubscribeVitalsResponse), f"ended before a {kind}"
        if ev.WhichOneof("event") == kind:
            return ev


async def test_moving_tells_publisher_and_viewers_and_serves_until_released(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    edge = await edge_factory()
    opened = await open_session(core, channel_to)
    sid = opened.session.session_id
    vitals = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    token = await viewer_token(core, channel_to, sid)
    view = vitals.Subscribe(
        vitals_pb2.SubscribeVitalsRequest(session_id=sid), metadata=bearer(token)
    )
    await eventually(lambda: edge.sessions.subscribers == 1, what="subscriber joined")
    feed = Feed()
    pub = vitals.Publish(feed.requests(), metadata=bearer(opened.assignment.token))
    feed.send(make_batch(sid, 1))
    assert (await read_ack(pub)).received_seq == 1

    await edge.sessions.moving(sid, "edge-b", "drain")
    # The device hears of the move on its ack stream without sending anything...
    told = await read_ack(pub)
    assert told.HasField("moving")
    assert (told.moving.new_edge_id, told.moving.reason) == ("edge-b", "drain")
    # ...the viewer in its event stream, and a view opened now learns at once.
    assert (await next_event(view, "moving")).moving.new_edge_id == "edge-b"
    late = vitals.Subscribe(
        vitals_pb2.SubscribeVitalsRequest(session_id=sid), metadata=bearer(token)
    )
    assert (await next_event(late, "moving")).moving.reason == "drain"

    # Make-before-break: this edge keeps taking batches and serving views meanwhile.
    feed.send(make_batch(sid, 2))
    ack = await read_ack(pub)
    assert ack.received_seq == 2 and not ack.HasField("rejection")
    assert (await next_event(view, "batch")).batch.seq == 2
    assert (await next_event(late, "batch")).batch.seq == 2

    # The release ends every stream at once, saying where the session went.
    await edge.sessions.release(sid, "moved", "edge-b", "127.0.0.1:1")
    for call in (pub, view, late):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while await call.read() is not grpc.aio.EOF:
                pass
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "moved to edge edge-b" in (err.value.details() or "")
    # Moving a session this edge does not serve is a no-op, not an error.
    await edge.sessions.moving("ses_unknown", "edge-b", "drain")
