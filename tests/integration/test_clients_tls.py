"""The device agent and the clinician's SessionViewer with mTLS on: each dials the edge with its
own certificate and checks the edge's against the name the assignment gives for it (an edge
dialled by IP whose certificate names it by DNS only, as with Kubernetes pod IPs)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.device import DeviceAgent, DeviceConfig
from clients.dial import edge_channel
from clients.viewer import SessionViewer, VitalsEvent
from core_services.server import CoreServer
from edge_nodes.server import EdgeServer
from telehealth.config import EdgeSettings
from telehealth.rpc import bearer, secure_channel
from telehealth.security.pki import init_pki, load_authority, write_certificate
from telehealth.security.tls import TlsFiles
from telehealth.v1 import sessions_pb2
from tests.conftest import core_settings, eventually

EDGE_NAME = "edge-a.zone-a.telehealth.test"


def tls_kw(f: TlsFiles) -> dict[str, str]:
    return {"tls_cert_file": str(f.cert), "tls_key_file": str(f.key), "tls_ca_file": str(f.ca)}


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, TlsFiles]:
    out = init_pki(tmp_path / "pki", services=["core"], clients=["device", "clinician"])
    ca = load_authority(tmp_path / "pki")
    assert ca is not None
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


async def test_device_and_viewer_reach_the_edge_by_its_tls_name(
    mesh: tuple[CoreServer, EdgeServer], pki: dict[str, TlsFiles]
) -> None:
    core, _ = mesh
    await core.security.users.add_user("dr-tls", "clinician", "correct horse battery staple")
    await core.security.users.assign("dr-tls", "p-tls")
    agent = DeviceAgent(DeviceConfig(core.address, "p-tls", "zone-a", tls=pki["device"]))
    stop = asyncio.Event()
    run = asyncio.create_task(agent.run(stop))
    await eventually(lambda: agent.received_seq >= 10, 15, "device acked over mTLS")
    assert agent.assignment is not None
    assert agent.assignment.edge_tls_server_name == EDGE_NAME
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
