"""A stuck subscriber never slows the publisher or the other subscribers; it learns of its gap."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc

from core_services.server import CoreServer
from telehealth.rpc import bearer
from telehealth.v1 import sessions_pb2, sessions_pb2_grpc, vitals_pb2, vitals_pb2_grpc
from tests.conftest import EdgeFactory, eventually, staff
from tests.integration.test_vitals_path import make_batch, open_session


async def test_stuck_subscriber_is_isolated(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: Callable[[str], grpc.aio.Channel]
) -> None:
    # A flood on purpose: lift the per-device rate limit, which is not what is tested here.
    edge = await edge_factory(subscriber_queue=16, publish_rate_batches_per_s=1e6)
    opened = await open_session(core, channel_to)
    sid = opened.session.session_id
    sessions = sessions_pb2_grpc.SessionsServiceStub(channel_to(core.address))
    viewer = await sessions.Attach(
        sessions_pb2.AttachSessionRequest(session_id=sid, role=sessions_pb2.ROLE_VIEWER),
        metadata=await staff(core, "clinician", ("p-1",)),
    )
    token = viewer.assignment.token
    # Separate connections, so the stuck one's HTTP/2 flow control cannot touch the others.
    fast = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address)).Subscribe(
        vitals_pb2.SubscribeVitalsRequest(session_id=sid), metadata=bearer(token)
    )
    stuck = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address)).Subscribe(
        vitals_pb2.SubscribeVitalsRequest(session_id=sid), metadata=bearer(token)
    )
    await eventually(lambda: edge.sessions.subscribers == 2, what="two subscribers")
    n = 3000
    batches = []
    for i in range(1, n + 1):
        b = make_batch(sid, i)
        b.waveforms[0].samples.extend([0.5] * 240)  # ~1 KB each: beyond any flow-control window
        batches.append(b)
    seen: list[int] = []
    progress = asyncio.Condition()

    async def read_fast() -> None:
        async for ev in fast:
            if ev.HasField("batch"):
                seen.append(ev.batch.seq)
                async with progress:
                    progress.notify_all()
                if ev.batch.seq == n:
                    return

    reader = asyncio.create_task(read_fast())

    async def paced() -> AsyncIterator[vitals_pb2.PublishVitalsRequest]:
        # Publish in small windows, each only after the reading subscriber has it all: the
        # stuck subscriber's queue overflows many times over while nothing waits on it.
        for start in range(0, n, 4):
            for b in batches[start : start + 4]:
                yield vitals_pb2.PublishVitalsRequest(batch=b)
            last = batches[min(start + 4, n) - 1].seq
            async with progress:
                await asyncio.wait_for(
                    progress.wait_for(lambda last=last: bool(seen) and seen[-1] >= last), 10
                )

    publisher = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    acks = [
        r.received_seq
        async for r in publisher.Publish(paced(), metadata=bearer(opened.assignment.token))
    ]
    assert acks[-1] == n  # the publisher finished while one subscriber read nothing
    await asyncio.wait_for(reader, 10)
    assert seen == list(range(1, n + 1))
    gaps = 0
    last = 0
    async for ev in stuck:
        if ev.HasField("gap"):
            gaps += ev.gap.dropped_events
        elif ev.HasField("batch"):
            assert ev.batch.seq > last  # still in order, just with a hole
            last = ev.batch.seq
            if last == n:
                break
    assert gaps > 0
    assert edge.metrics.fanout_dropped._value.get() == gaps
    fast.cancel()
    stuck.cancel()
