"""Hostile input against a live core and edge: random and mutated messages to every RPC, random
HTTP requests, oversize payloads, replays and floods, while an honest device publishes alongside.
Afterwards both servers answer health checks, memory stayed bounded, and what the honest device
sent is exactly what is stored and fanned out."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core_services.server import CoreServer
from edge_nodes.server import EdgeServer
from telehealth.config import EdgeSettings
from telehealth.rpc import bearer
from telehealth.v1 import (
    archive_pb2,
    audit_pb2,
    auth_pb2,
    edges_pb2,
    sessions_pb2,
    sessions_pb2_grpc,
    vitals_pb2,
    vitals_pb2_grpc,
)
from tests.conftest import core_settings
from tests.integration.test_vitals_path import make_batch

# (method, request message class, streaming kind, where)
METHODS: list[tuple[str, Any, str, str]] = [
    ("/telehealth.v1.SessionsService/Open", sessions_pb2.OpenSessionRequest, "uu", "core"),
    ("/telehealth.v1.SessionsService/Attach", sessions_pb2.AttachSessionRequest, "uu", "core"),
    ("/telehealth.v1.SessionsService/Close", sessions_pb2.CloseSessionRequest, "uu", "core"),
    ("/telehealth.v1.SessionsService/List", sessions_pb2.ListSessionsRequest, "uu", "core"),
    ("/telehealth.v1.SessionsService/Watch", sessions_pb2.WatchSessionsRequest, "us", "core"),
    ("/telehealth.v1.EdgesService/Heartbeat", edges_pb2.HeartbeatRequest, "ss", "core"),
    ("/telehealth.v1.EdgesService/ListEdges", edges_pb2.ListEdgesRequest, "uu", "core"),
    ("/telehealth.v1.EdgesService/Drain", edges_pb2.DrainEdgeRequest, "uu", "core"),
    ("/telehealth.v1.AuthService/Login", auth_pb2.LoginRequest, "uu", "core"),
    ("/telehealth.v1.AuthService/WhoAmI", auth_pb2.WhoAmIRequest, "uu", "core"),
    ("/telehealth.v1.AuditService/Append", audit_pb2.AppendAuditRequest, "uu", "core"),
    ("/telehealth.v1.ArchiveService/QueryVitals", archive_pb2.QueryVitalsRequest, "uu", "core"),
    ("/telehealth.v1.ArchiveService/ExportFhir", archive_pb2.ExportFhirRequest, "uu", "core"),
    ("/telehealth.v1.ArchiveService/GetWatermark", archive_pb2.GetWatermarkRequest, "uu", "core"),
    ("/telehealth.v1.ArchiveService/Append", archive_pb2.AppendBatchesRequest, "ss", "core"),
    ("/telehealth.v1.VitalsService/Publish", vitals_pb2.PublishVitalsRequest, "ss", "edge"),
    ("/telehealth.v1.VitalsService/Subscribe", vitals_pb2.SubscribeVitalsRequest, "us", "edge"),
]
# A status that means a handler blew up rather than refusing cleanly.
CRASH_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
HONEST_BATCHES = 40


@dataclass
class Tally:
    cases: int = 0
    crashes: list[str] = field(default_factory=list)
    corruptions: list[str] = field(default_factory=list)


@dataclass
class Mesh:
    loop: asyncio.AbstractEventLoop
    core: CoreServer
    edge: EdgeServer
    session_id: str
    publisher_token: str
    viewer_token: str
    honest: list[vitals_pb2.VitalsBatch]
    received: list[vitals_pb2.VitalsBatch]
    tally: Tally

    def run(self, coro: Any, timeout: float = 30) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)


async def _start(tmp: Path) -> tuple[CoreServer, EdgeServer]:
    # A loaded CI box must not see the edge as dead mid-suite (that is failover, tested elsewhere).
    core = CoreServer(core_settings(tmp, heartbeat_timeout_s=60.0))
    await core.start()
    edge = EdgeServer(
        EdgeSettings.model_validate(
            {
                "edge_id": "edge-a",
                "grpc_listen": "127.0.0.1:0",
                "http_listen": "127.0.0.1:0",
                "core_address": core.address,
                "heartbeat_interval_s": 0.1,
                "data_dir": tmp / "edge-a",
                "log_format": "text",
            }
        )
    )
    await edge.start()
    return core, edge


async def _honest(core: CoreServer, edge: EdgeServer) -> tuple[str, str, str]:
    await core.security.users.add_user("dr-honest", "clinician", "correct horse battery staple")
    await core.security.users.assign("dr-honest", "p-honest")
    dr = bearer(core.issuer.issue_user(user_id="dr-honest", role="clinician", ttl_s=600)[0])
    async with grpc.aio.insecure_channel(core.address) as ch:
        s = sessions_pb2_grpc.SessionsServiceStub(ch)
        opened = await s.Open(sessions_pb2.OpenSessionRequest(patient_id="p-honest", zone="zone-a"))
        viewer = await s.Attach(
            sessions_pb2.AttachSessionRequest(
                session_id=opened.session.session_id, role=sessions_pb2.ROLE_VIEWER
            ),
            metadata=dr,
        )
    return opened.session.session_id, opened.assignment.token, viewer.assignment.token


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(60)

    core, edge = run(_start(tmp_path_factory.mktemp("hostile")))
    sid, pub, view = run(_honest(core, edge))
    m = Mesh(loop, core, edge, sid, pub, view, [], [], Tally())
    yield m
    run(edge.stop(grace=0))
    run(core.stop(grace=0))
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def _call(address: str, method: str, kind: str, payloads: list[bytes], md: Any) -> None:
    with grpc.insecure_channel(address) as channel:
        ch: Any = channel  # raw bytes in and out: no message types
        try:
            if kind == "uu":
                ch.unary_unary(method)(payloads[0], timeout=3, metadata=md)
            elif kind == "us":
                for _ in ch.unary_stream(method)(payloads[0], timeout=0.5, metadata=md):
                    pass
            else:
                for _ in ch.stream_stream(method)(iter(payloads), timeout=0.5, metadata=md):
                    pass
        except grpc.RpcError as err:
            e: Any = err
            if e.code() in CRASH_CODES:
                raise AssertionError(f"{method}: {e.code().name}: {e.details()}") from None


def _mutate(msg: bytes, flips: list[int]) -> bytes:
    b = bytearray(msg)
    for f in flips:
        if b:
            b[f % len(b)] ^= 1 << (f % 8)
    return bytes(b)


def _valid(cls: Any, mesh: Mesh) -> bytes:
    """A plausible message of each kind, to mutate: real ids make mutations reach deep code."""
    sid = mesh.session_id
    samples: dict[Any, Any] = {
        sessions_pb2.OpenSessionRequest: lambda: cls(patient_id="p-x", zone="zone-a"),
        sessions_pb2.AttachSessionRequest: lambda: cls(
            session_id=sid, role=sessions_pb2.ROLE_VIEWER
        ),
        vitals_pb2.PublishVitalsRequest: lambda: cls(batch=make_batch(sid, 1)),
        vitals_pb2.SubscribeVitalsRequest: lambda: cls(session_id=sid, include_latest=True),
        # Not edge-a's id: in plaintext mode nothing proves an edge's identity, so a stream
        # naming edge-a would take its place (with mTLS the certificate must name the edge).
        edges_pb2.HeartbeatRequest: lambda: cls(
            edge_id="edge-fuzz", zone="zone-a", address="127.0.0.1:1"
        ),
        audit_pb2.AppendAuditRequest: lambda: cls(edge_id="edge-a", edge_boot_id="b"),
        auth_pb2.LoginRequest: lambda: cls(user_id="dr-honest", password="x" * 20),
    }
    return bytes(samples.get(cls, cls)().SerializeToString())


def test_oversize_replay_flood_http_then_health_memory_and_data(mesh: Mesh) -> None:
    proc = psutil.Process()
    rss_before = proc.memory_info().rss
    sid = mesh.session_id
    honest = [make_batch(sid, i) for i in range(1, HONEST_BATCHES + 1)]

    async def honest_device() -> list[vitals_pb2.VitalsBatch]:
        got: list[vitals_pb2.VitalsBatch] = []
        async with grpc.aio.insecure_channel(mesh.edge.address) as ch:
            stub = vitals_pb2_grpc.VitalsServiceStub(ch)
            known = mesh.edge.sessions.channels.get(sid)
            viewers_before = known.subscribers if known is not None else 0
            sub = stub.Subscribe(
                vitals_pb2.SubscribeVitalsRequest(session_id=sid),
                metadata=bearer(mesh.viewer_token),
            )

            async def gen() -> Any:
                # Only once the edge has the honest viewer: a batch published before the
                # subscription lands is (rightly) not delivered to it, and the count below
                # would wait for it forever on a loaded machine.
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    session = mesh.edge.sessions.channels.get(sid)
                    if session is not None and session.subscribers > viewers_before:
                        break
                    await asyncio.sleep(0.01)
                for b in honest:
                    yield vitals_pb2.PublishVitalsRequest(batch=b)
                    await asyncio.sleep(0.01)
                # Replays: the whole stream again, then a duplicate burst; all dropped.
                for b in honest:
                    yield vitals_pb2.PublishVitalsRequest(batch=b)

            acks = [r async for r in stub.Publish(gen(), metadata=bearer(mesh.publisher_token))]
            assert acks[-1].received_seq == HONEST_BATCHES
            async for ev in sub:
                if ev.HasField("batch"):
                    got.append(ev.batch)
                    if len(got) == HONEST_BATCHES:
                        break
            sub.cancel()
        return got

    async def attacker() -> int:
        n = 0
        async with grpc.aio.insecure_channel(mesh.edge.address) as ch:
            stub = vitals_pb2_grpc.VitalsServiceStub(ch)
            # Flood: many subscriptions with junk tokens and publishes into the honest session.
            calls = [
                stub.Subscribe(
                    vitals_pb2.SubscribeVitalsRequest(session_id=sid), metadata=bearer(f"junk{i}")
                )
                for i in range(100)
            ]
            for c in calls:
                try:
                    await c.read()
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
                n += 1
            forged = make_batch(sid, 3, hr=40.0)

            async def one() -> Any:
                yield vitals_pb2.PublishVitalsRequest(batch=forged)

            for _ in range(50):
                try:
                    async for _ in stub.Publish(one(), metadata=bearer(mesh.viewer_token)):
                        pass
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.PERMISSION_DENIED
                n += 1
            # Oversize: past grpc_max_message_bytes.
            big = vitals_pb2.PublishVitalsRequest(batch=make_batch(sid, 999))
            big.batch.waveforms[0].samples.extend([0.0] * 1_200_000)

            async def huge() -> Any:
                yield big

            try:
                async for _ in stub.Publish(huge(), metadata=bearer(mesh.publisher_token)):
                    pass
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            n += 1
        return n

    async def both() -> tuple[list[vitals_pb2.VitalsBatch], int]:
        got, n = await asyncio.gather(honest_device(), attacker())
        return got, n

    got, n = mesh.run(both(), timeout=60)
    mesh.tally.cases += n
    # HTTP: every endpoint of both processes, plus junk paths.
    for base in (mesh.core.http.url, mesh.edge.http.url):
        for path in ("/metrics", "/healthz", "/%00", "/console/api/ward?x=" + "A" * 5000,
                     "/media/ws", "/api/v1/patients/../../etc/passwd/fhir", "/" + "z" * 9000):  # fmt: skip
            mesh.tally.cases += 1
            try:
                with urllib.request.urlopen(base + path, timeout=5) as r:
                    assert r.status < 500
            except urllib.error.HTTPError as e:
                if e.code >= 500:
                    mesh.tally.crashes.append(f"{base}{path[:40]}: HTTP {e.code}")
    # The core's sign-in: junk bodies and forged cookies get 4xx, never a crash.
    for body, cookie in ((b"{", ""), (b"\xff" * 5000, ""), (b'{"user": [], "password": {}}', ""),
                         (b'{"user": "u", "password": "' + b"p" * 3000 + b'"}', ""),
                         (None, "telehealth_session=" + "A" * 3000), (None, "x=\x01")):  # fmt: skip
        for path in ("/api/v1/login", "/api/v1/logout", "/console", "/api/v1/whoami"):
            mesh.tally.cases += 1
            req = urllib.request.Request(
                mesh.core.http.url + path, data=body, headers={"Cookie": cookie} if cookie else {}
            )
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    assert r.status < 500
            except urllib.error.HTTPError as e:
                if e.code >= 500:
                    mesh.tally.crashes.append(f"core{path}: HTTP {e.code}")
    # Health: both still serving.
    for address in (mesh.core.address, mesh.edge.address):
        with grpc.insecure_channel(address) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
    # Data: exactly what the honest device sent, in order; the forged seq 3 never got in.
    if [b.SerializeToString() for b in got] != [b.SerializeToString() for b in honest]:
        mesh.tally.corruptions.append("fanned-out batches differ from what the device sent")
    channel = mesh.edge.sessions.channels[sid]
    if channel.watermark.value != HONEST_BATCHES:
        mesh.tally.corruptions.append(f"watermark {channel.watermark.value} != {HONEST_BATCHES}")
    latest = channel.latest.heart_rate_bpm
    if latest is None or latest.value != 72.0:
        mesh.tally.corruptions.append("latest heart rate is not the honest device's")
    # Memory: the test process hosts both servers; growth stays bounded.
    growth_mb = (proc.memory_info().rss - rss_before) / 2**20
    print(
        f"\nhostile suite: {mesh.tally.cases} cases, {len(mesh.tally.crashes)} crashes, "
        f"{len(mesh.tally.corruptions)} corruptions, RSS growth {growth_mb:.0f} MiB"
    )
    assert growth_mb < 300
    assert mesh.tally.crashes == []
    assert mesh.tally.corruptions == []
    time.sleep(0)


# Header-legal text only: other bytes are refused by the client library before they leave.
tokens = st.sampled_from(["", "x.y.z", "Bearer", "publisher", "viewer"]) | st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=40
)


@settings(
    max_examples=int(os.environ.get("HOSTILE_EXAMPLES", "1000")),
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    which=st.integers(0, len(METHODS) - 1),
    mode=st.sampled_from(["random", "mutated", "oversize-ish"]),
    raw=st.binary(max_size=512),
    flips=st.lists(st.integers(0, 10_000), max_size=8),
    token=tokens,
    count=st.integers(1, 3),
)
def test_every_rpc_survives_hostile_messages(
    mesh: Mesh, which: int, mode: str, raw: bytes, flips: list[int], token: str, count: int
) -> None:
    method, cls, kind, where = METHODS[which]
    address = mesh.core.address if where == "core" else mesh.edge.address
    real = {"publisher": mesh.publisher_token, "viewer": mesh.viewer_token}.get(token, token)
    md = (("authorization", f"Bearer {real}"),) if real else None
    if mode == "random":
        payloads = [raw] * count
    elif mode == "mutated":
        payloads = [_mutate(_valid(cls, mesh), flips) for _ in range(count)]
    else:
        payloads = [_valid(cls, mesh) + raw * 64] * count
    mesh.tally.cases += 1
    try:
        _call(address, method, kind, payloads, md)
    except AssertionError as e:
        mesh.tally.crashes.append(str(e))
        raise


def test_servers_still_healthy_after_the_fuzzing(mesh: Mesh) -> None:
    for address in (mesh.core.address, mesh.edge.address):
        with grpc.insecure_channel(address) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
    print(
        f"\nhostile suite total: {mesh.tally.cases} cases, {len(mesh.tally.crashes)} crashes, "
        f"{len(mesh.tally.corruptions)} corruptions"
    )
    assert mesh.tally.crashes == []
