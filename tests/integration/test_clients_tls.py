"""The device agent and the clinician's SessionViewer with mTLS on: each dials the edge with its
own certificate and checks the edge's against the name the assignment gives for it (an edge
dialled by IP whose certificate names it by DNS only, as with Kubernetes pod IPs)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.device import DeviceAgent, DeviceConfig
from clients.dial import edge_channel
from clients.viewer import SessionViewer, VitalsEvent
from core_services.server import CoreServer
from edge_nodes.server import EdgeServer
from telehealth.rpc import bearer, secure_channel
from telehealth.security.tls import TlsFiles
from telehealth.v1 import sessions_pb2
from tests.conftest import EDGE_TLS_NAME, eventually


async def test_device_and_viewer_reach_the_edge_by_its_tls_name(
    tls_mesh: tuple[CoreServer, EdgeServer], named_edge_pki: dict[str, TlsFiles]
) -> None:
    core, _ = tls_mesh
    pki = named_edge_pki
    await core.security.users.add_user("dr-tls", "clinician", "correct horse battery staple")
    await core.security.users.assign("dr-tls", "p-tls")
    agent = DeviceAgent(DeviceConfig(core.address, "p-tls", "zone-a", tls=pki["device"]))
    stop = asyncio.Event()
    run = asyncio.create_task(agent.run(stop))
    await eventually(lambda: agent.received_seq >= 10, 15, "device acked over mTLS")
    assert agent.assignment is not None
    assert agent.assignment.edge_tls_server_name == EDGE_TLS_NAME
    token, _ = core.issuer.issue_user(user_id="dr-tls", role="clinician", ttl_s=600)
    seqs: list[int] = []
    async with secure_channel(core.address, pki["clinician"]) as ch:
        viewer = SessionViewer(ch, agent.session_id, tls=pki["clinician"], metadata=bearer(token))

        async def watch() -> None:
            async for ev in viewer:
                if (
                    isinstance(ev, VitalsEvent)
                    and ev.event.HasField("batch")
                    and ev.event.batch.seq
                ):
                    seqs.append(ev.event.batch.seq)

        task = asyncio.create_task(watch())
        await eventually(lambda: len(seqs) >= 10, 15, "viewer live over mTLS")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    stop.set()
    stats = await asyncio.wait_for(run, 20)
    assert stats.reconnects == 0 and agent.pending == 0
    # The name is what makes it work: the edge's certificate does not carry the IP dialled.
    nameless = sessions_pb2.Assignment()
    nameless.CopyFrom(agent.assignment)
    nameless.edge_tls_server_name = ""
    async with edge_channel(nameless, pki["device"]) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
