"""Certificate roles: with mTLS the core accepts edge RPCs only from a certificate whose role URI
names that edge (or its zone), sessions are opened only by devices or operators, and an edge
archives rows only under its own name and the session's patient. Every refusal stores nothing."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from core_services.server import CoreServer
from edge_nodes.server import EdgeServer
from telehealth.config import EdgeSettings
from telehealth.rpc import secure_channel
from telehealth.security.identity import certificate_identity
from telehealth.security.pki import init_pki
from telehealth.security.tls import TlsFiles
from telehealth.v1 import (
    archive_pb2,
    archive_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    edges_pb2,
    edges_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
)
from tests.conftest import core_settings, eventually, tls_kw
from tests.integration.test_vitals_path import make_batch


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, TlsFiles]:
    return init_pki(tmp_path / "pki", services=["core", "edge-a"], zones=["zone-b"])


@pytest.fixture
async def tls_core(tmp_path: Path, pki: dict[str, TlsFiles]) -> AsyncIterator[CoreServer]:
    server = CoreServer(core_settings(tmp_path, **tls_kw(pki["core"])))
    await server.start()
    yield server
    await server.stop(grace=0)


@pytest.fixture
async def edge_a(
    tls_core: CoreServer, pki: dict[str, TlsFiles], tmp_path: Path
) -> AsyncIterator[EdgeServer]:
    edge = EdgeServer(
        EdgeSettings.model_validate(
            {
                "edge_id": "edge-a",
                "grpc_listen": "127.0.0.1:0",
                "http_listen": "127.0.0.1:0",
                "core_address": tls_core.address,
                "heartbeat_interval_s": 0.1,
                "data_dir": tmp_path / "edge-a",
                "log_format": "text",
                **tls_kw(pki["edge-a"]),
            }
        )
    )
    await edge.start()
    yield edge
    await edge.stop(grace=0)


async def open_as(
    core: CoreServer, tls: TlsFiles, patient: str
) -> sessions_pb2.OpenSessionResponse:
    async with secure_channel(core.address, tls) as ch:
        return await sessions_pb2_grpc.SessionsServiceStub(ch).Open(
            sessions_pb2.OpenSessionRequest(patient_id=patient, zone="zone-a"), timeout=10
        )


async def heartbeat_code(core: CoreServer, tls: TlsFiles, edge_id: str, zone: str) -> str:
    """Open a heartbeat stream as `edge_id`; 'OK' when the core answered with keys."""

    async def beats() -> AsyncIterator[edges_pb2.HeartbeatRequest]:
        yield edges_pb2.HeartbeatRequest(edge_id=edge_id, zone=zone, address="10.9.9.9:1")

    async with secure_channel(core.address, tls) as ch:
        call = edges_pb2_grpc.EdgesServiceStub(ch).Heartbeat(beats(), timeout=10)
        try:
            first = await call.read()
        except grpc.aio.AioRpcError as e:
            return e.code().name
        call.cancel()
        return "OK" if first.HasField("token_keys") else "no keys"


async def archive_code(
    core: CoreServer, tls: TlsFiles, req: archive_pb2.AppendBatchesRequest
) -> str:
    async def one() -> AsyncIterator[archive_pb2.AppendBatchesRequest]:
        yield req

    async with secure_channel(core.address, tls) as ch:
        try:
            async for _ in archive_pb2_grpc.ArchiveServiceStub(ch).Append(one(), timeout=10):
                pass
        except grpc.aio.AioRpcError as e:
            return e.code().name
    return "OK"


def archived(
    sid: str, patient: str, seq: int, edge_id: str = "edge-a"
) -> archive_pb2.ArchivedBatch:
    return archive_pb2.ArchivedBatch(
        session_id=sid, patient_id=patient, edge_id=edge_id, batch=make_batch(sid, seq)
    )


def test_every_pki_certificate_carries_its_role_uri(pki: dict[str, TlsFiles]) -> None:
    want = {
        "core": "spiffe://telehealth/core",
        "edge-a": "spiffe://telehealth/edge/edge-a",
        "edges-zone-b": "spiffe://telehealth/zone/zone-b",
        "device": "spiffe://telehealth/device",
        "clinician": "spiffe://telehealth/clinician",
        "operator": "spiffe://telehealth/operator",
    }
    got = {
        name: certificate_identity(x509.load_pem_x509_certificate(f.cert.read_bytes())).uri
        for name, f in pki.items()
    }
    assert got == want


async def test_device_certificate_cannot_heartbeat_as_an_edge(
    tls_core: CoreServer, edge_a: EdgeServer, pki: dict[str, TlsFiles]
) -> None:
    before = dict(tls_core.edges.edges)
    for edge_id in ("device", "edge-a", "edge-rogue"):
        assert await heartbeat_code(tls_core, pki["device"], edge_id, "zone-a") == (
            "PERMISSION_DENIED"
        )
    # An edge certificate names one edge: edge-a cannot stand in for another.
    assert await heartbeat_code(tls_core, pki["edge-a"], "edge-b", "zone-a") == "PERMISSION_DENIED"
    assert set(tls_core.edges.edges) == set(before) == {"edge-a"}
    assert tls_core.edges.edges["edge-a"].address == edge_a.address


async def test_zone_certificate_serves_any_edge_id_of_its_zone_only(
    tls_core: CoreServer, pki: dict[str, TlsFiles]
) -> None:
    zone_b = pki["edges-zone-b"]
    assert await heartbeat_code(tls_core, zone_b, "edge-b-7f9c", "zone-b") == "OK"
    await eventually(lambda: "edge-b-7f9c" in tls_core.edges.edges, what="pod registered")
    assert await heartbeat_code(tls_core, zone_b, "edge-a-1234", "zone-a") == "PERMISSION_DENIED"
    assert "edge-a-1234" not in tls_core.edges.edges


async def test_device_certificate_cannot_append_audit_records(
    tls_core: CoreServer, edge_a: EdgeServer, pki: dict[str, TlsFiles]
) -> None:
    forged = audit_pb2.AppendAuditRequest(
        edge_id="edge-a",
        edge_boot_id="forged",
        records=[
            audit_pb2.AuditRecord(
                at_unix_ns=1, subject="dr-innocent", role="viewer", action="vitals.subscribe",
                session_id="ses_x", peer="ipv4:10.0.0.1:1", outcome="allowed", edge_seq=1,
            )
        ],
    )  # fmt: skip
    async with secure_channel(tls_core.address, pki["device"]) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await audit_pb2_grpc.AuditServiceStub(ch).Append(forged, timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "spiffe://telehealth/device" in (err.value.details() or "")
    entries = [e async for e in tls_core.security.audit.entries()]
    assert all(e.event.subject != "dr-innocent" for e in entries)


async def test_device_certificate_cannot_append_archive_rows(
    tls_core: CoreServer, edge_a: EdgeServer, pki: dict[str, TlsFiles]
) -> None:
    victim = await open_as(tls_core, pki["device"], "p-victim")
    sid = victim.session.session_id
    req = archive_pb2.AppendBatchesRequest(
        edge_id="edge-a", journal_position=1, batches=[archived(sid, "p-victim", 1)]
    )
    assert await archive_code(tls_core, pki["device"], req) == "PERMISSION_DENIED"
    assert await tls_core.archive.store.count(sid) == 0
    assert await tls_core.archive.archived_seq(sid) == 0


async def test_edge_archives_only_its_own_rows_for_the_sessions_patient(
    tls_core: CoreServer, edge_a: EdgeServer, pki: dict[str, TlsFiles]
) -> None:
    other = await open_as(tls_core, pki["device"], "p-other")
    mine = await open_as(tls_core, pki["device"], "p-mine")
    sid = mine.session.session_id
    # Another patient's id on this session's rows; another edge's name on the rows; a good
    # row followed by a mislabelled one in the same request (nothing of it may be stored).
    for req in (
        archive_pb2.AppendBatchesRequest(edge_id="edge-a", batches=[archived(sid, "p-other", 7)]),
        archive_pb2.AppendBatchesRequest(
            edge_id="edge-a", batches=[archived(sid, "p-mine", 7, edge_id="edge-b")]
        ),
        archive_pb2.AppendBatchesRequest(
            edge_id="edge-a",
            batches=[archived(sid, "p-mine", 7), archived(other.session.session_id, "p-mine", 1)],
        ),
    ):
        assert await archive_code(tls_core, pki["edge-a"], req) == "PERMISSION_DENIED"
    assert await tls_core.archive.store.count(sid) == 0
    assert await tls_core.archive.store.count(other.session.session_id) == 0
    # The same edge with correct rows is accepted.
    good = archive_pb2.AppendBatchesRequest(edge_id="edge-a", batches=[archived(sid, "p-mine", 7)])
    assert await archive_code(tls_core, pki["edge-a"], good) == "OK"
    rows = await tls_core.archive.store.query(patient_id="p-mine", session_id=sid, limit=10)
    assert [(r.seq, r.patient_id, r.edge_id) for r in rows] == [(7, "p-mine", "edge-a")]


async def test_sessions_are_opened_only_by_devices_and_operators(
    tls_core: CoreServer, edge_a: EdgeServer, pki: dict[str, TlsFiles]
) -> None:
    for who in ("clinician", "edge-a", "core"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await open_as(tls_core, pki[who], f"p-{who}")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, who
    assert {s.patient_id for s in tls_core.directory.sessions.values()} == set()
    for who in ("device", "operator"):
        assert (await open_as(tls_core, pki[who], f"p-{who}")).session.session_id


async def test_plaintext_core_says_identities_are_not_checked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    core = CoreServer(core_settings(tmp_path))
    await core.start()
    await core.stop(grace=0)
    assert any("identities are NOT checked" in r.getMessage() for r in caplog.records)
