"""The device agent's video with mTLS on: it dials the edge with the agent's own certificate and
checks the edge's against the name the assignment gives for it (an edge dialled by IP whose
certificate does not carry that IP, as with Kubernetes pod IPs)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from clients.device import DeviceAgent, DeviceConfig
from clients.video import VIEWER, MediaCall, run_with_video
from core_services.server import CoreServer
from edge_nodes.server import EdgeServer
from telehealth.config import EdgeSettings
from telehealth.rpc import bearer, secure_channel
from telehealth.security.pki import init_pki, load_authority, write_certificate
from telehealth.security.tls import TlsFiles
from telehealth.v1 import sessions_pb2, sessions_pb2_grpc
from tests.conftest import core_settings, eventually

EDGE_NAME = "edge-a.zone-a.telehealth.test"


def tls_kw(f: TlsFiles) -> dict[str, str]:
    return {"tls_cert_file": str(f.cert), "tls_key_file": str(f.key), "tls_ca_file": str(f.ca)}


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, TlsFiles]:
    out = init_pki(tmp_path / "pki", services=["core"], clients=["device", "clinician"])
    ca = load_authority(tmp_path / "pki")
    assert ca is not None
    # The edge's certificate names it by DNS only: dialling its IP works only with the name.
    out["edge-a"] = write_certificate(tmp_path / "pki", ca, "edge-a", [EDGE_NAME])
    return out


@pytest.fixture
async def mesh(
    tmp_path: Path, pki: dict[str, TlsFiles]
) -> AsyncIterator[tuple[CoreServer, EdgeServer]]:
    core = CoreServer(core_settings(tmp_path, **tls_kw(pki["core"])))
    await core.start()
    edge = EdgeServer(
        EdgeSettings.model_validate(
            {
                "edge_id": "edge-a",
                "grpc_listen": "127.0.0.1:0",
                "http_listen": "127.0.0.1:0",
                "core_address": core.address,
                "heartbeat_interval_s": 0.1,
                "data_dir": tmp_path / "edge-a",
                "log_format": "text",
                "media_udp_port_min": 41900,
                "media_udp_port_max": 41931,
                "tls_server_name": EDGE_NAME,
                **tls_kw(pki["edge-a"]),
            }
        )
    )
    await edge.start()
    await eventually(lambda: "edge-a" in core.edges.edges, 10, "edge registered")
    yield core, edge
    await edge.stop(grace=0)
    await core.stop(grace=0)


async def test_device_video_negotiates_over_mtls_with_the_edges_tls_name(
    mesh: tuple[CoreServer, EdgeServer], pki: dict[str, TlsFiles]
) -> None:
    core, edge = mesh
    await core.security.users.add_user("dr-tls", "clinician", "correct horse battery staple")
    await core.security.users.assign("dr-tls", "p-tls")
    agent = DeviceAgent(DeviceConfig(core.address, "p-tls", "zone-a", tls=pki["device"]))
    stop = asyncio.Event()
    task = asyncio.create_task(run_with_video([agent], "synthetic:80", stop, 0.0))
    try:
        await eventually(lambda: agent.session_id, 15, "session opened over mTLS")
        assert agent.assignment is not None
        assert agent.assignment.edge_tls_server_name == EDGE_NAME
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
