"""The device agent's video with mTLS on: it dials the edge with the agent's own certificate and
checks the edge's against the name the assignment gives for it (an edge dialled by IP whose
certificate does not carry that IP, as with Kubernetes pod IPs)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from clients.device import DeviceAgent, DeviceConfig
from clients.video import VIEWER, MediaCall, run_with_video
from core_services.server import CoreServer
from edge_nodes.server import EdgeServer
from telehealth.rpc import bearer, secure_channel
from telehealth.security.tls import TlsFiles
from telehealth.v1 import sessions_pb2, sessions_pb2_grpc
from tests.conftest import EDGE_TLS_NAME, eventually


@pytest.fixture
def tls_edge_settings() -> dict[str, Any]:
    """This module's own UDP port range, apart from the other media tests'."""
    return {"media_udp_port_min": 41900, "media_udp_port_max": 41931}


async def test_device_video_negotiates_over_mtls_with_the_edges_tls_name(
    tls_mesh: tuple[CoreServer, EdgeServer], named_edge_pki: dict[str, TlsFiles]
) -> None:
    core, edge = tls_mesh
    pki = named_edge_pki
    await core.security.users.add_user("dr-tls", "clinician", "correct horse battery staple")
    await core.security.users.assign("dr-tls", "p-tls")
    agent = DeviceAgent(DeviceConfig(core.address, "p-tls", "zone-a", tls=pki["device"]))
    stop = asyncio.Event()
    task = asyncio.create_task(run_with_video([agent], "synthetic:80", stop, 0.0))
    try:
        await eventually(lambda: agent.session_id, 15, "session opened over mTLS")
        assert agent.assignment is not None
        assert agent.assignment.edge_tls_server_name == EDGE_TLS_NAME
        await eventually(
            lambda: (c := edge.media.calls.calls.get(agent.session_id)) and c.patient_video,
            20,
            "the device's video at the edge, negotiated over mTLS",
        )
        # A clinician's program too: its own certificate, the edge's name from its assignment.
        token, _ = core.issuer.issue_user(user_id="dr-tls", role="clinician", ttl_s=600)
        async with secure_channel(core.address, pki["clinician"]) as ch:
            viewer = await sessions_pb2_grpc.SessionsServiceStub(ch).Attach(
                sessions_pb2.AttachSessionRequest(
                    session_id=agent.session_id, role=sessions_pb2.ROLE_VIEWER
                ),
                metadata=bearer(token),
            )
        a = viewer.assignment
        clinician = MediaCall(
            a.edge_address,
            agent.session_id,
            a.token,
            VIEWER,
            tls=pki["clinician"],
            server_name=a.edge_tls_server_name,
        )
        await clinician.start()
        await eventually(lambda: clinician.received.frames > 10, 20, "clinician sees the device")
        await clinician.hangup()
        # Without the name the edge's certificate does not match the IP dialled: refused.
        plain = MediaCall(a.edge_address, agent.session_id, a.token, VIEWER, tls=pki["clinician"])
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await plain.start(timeout=5)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        await plain.close()
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
    await eventually(lambda: edge.media.calls.peer_count == 0, 15, "device hung up")
