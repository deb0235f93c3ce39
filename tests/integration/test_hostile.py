"""Hostile input against a live core and edge while honest clients work alongside.

Every RPC of proto/telehealth/v1 (found from the descriptors, so a new one cannot be missed)
gets random bytes, bit-flipped and field-by-field generated messages (hypothesis), with
genuine clinician, operator, publisher and viewer tokens among the credentials so handlers
run past the auth gate; every HTTP route of both processes (listed from their routers) gets
generated requests, signed in and not; the edge's WebSocket gets generated hellos and
messages; then replays, floods and oversize payloads; then a second mesh with mTLS on, where
a device's certificate naming the honest edge, session and patient must be refused.

Afterwards: both meshes answer health checks, the test process (which hosts all servers)
grew by less than MEMORY_BOUND_MIB, and what the honest device sent is exactly what the
viewer saw, the edge journaled and the archive holds (contents, not counts), the honest
session is as it was opened, and the audit chain verifies. Prints cases, crashes (0) and
corruptions (0).

In plaintext (dev) mode nothing proves an edge's identity (the core says so at start), so
there the edge-only RPCs (Heartbeat, ArchiveService.Append, AuditService.Append) and
operator-token calls get ids of the fuzz's own sessions and edges; forged edge traffic naming
the real edge and the honest session is the mTLS part's job.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import psutil
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core_services.server import CoreServer
from edge_nodes.server import EdgeServer
from telehealth.config import EdgeSettings
from telehealth.rpc import bearer, channel_options, secure_channel
from telehealth.security.pki import init_pki
from telehealth.security.tls import TlsFiles
from telehealth.v1 import (
    archive_pb2,
    audit_pb2,
    auth_pb2,
    auth_pb2_grpc,
    edges_pb2,
    media_pb2,
    sessions_pb2,
    sessions_pb2_grpc,
    vitals_pb2,
    vitals_pb2_grpc,
)
from tests.conftest import core_settings, tls_kw
from tests.integration.test_vitals_path import make_batch

EXAMPLES = int(os.environ.get("HOSTILE_EXAMPLES", "1000"))
# A status that means a handler blew up rather than refusing cleanly.
CRASH_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
EDGE_SERVICES = ("telehealth.v1.VitalsService", "telehealth.v1.MediaService")
# RPCs only an edge makes: plaintext mode cannot tell an edge from anyone (see the docstring).
EDGE_ONLY = (
    "/telehealth.v1.EdgesService/Heartbeat",
    "/telehealth.v1.ArchiveService/Append",
    "/telehealth.v1.AuditService/Append",
)
HONEST_INTERVAL_S = 0.1
# Per-session publish rate of the edges here: the honest device sends half of it.
RATE, RATE_BURST = 20.0, 40
# Growth of the process hosting both meshes, the fuzz and hypothesis, over the whole suite.
MEMORY_BOUND_MIB = 200
PASSWORD = "correct horse battery staple"
# Marks what the fuzz wrote, so it can be told apart from what honest clients wrote.
FORGED = "forged-by-fuzz"


# -- what to drive ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rpc:
    path: str
    kind: str  # uu, us, su, ss: unary or stream, request then response
    request: type[Message]
    where: str  # core or edge


def every_rpc() -> list[Rpc]:
    out = []
    for mod in (archive_pb2, audit_pb2, auth_pb2, edges_pb2, media_pb2, sessions_pb2, vitals_pb2):
        for svc in mod.DESCRIPTOR.services_by_name.values():
            for m in svc.methods:
                kind = ("s" if m.client_streaming else "u") + ("s" if m.server_streaming else "u")
                out.append(
                    Rpc(
                        f"/{svc.full_name}/{m.name}",
                        kind,
                        message_factory.GetMessageClass(m.input_type),
                        "edge" if svc.full_name in EDGE_SERVICES else "core",
                    )
                )
    return sorted(out, key=lambda r: r.path)


RPCS = every_rpc()
HEALTH = [
    Rpc("/grpc.health.v1.Health/Check", "uu", health_pb2.HealthCheckRequest, where)
    for where in ("core", "edge")
]


# -- the meshes -------------------------------------------------------------------------------


@dataclass
class Tally:
    cases: int = 0
    by_target: Counter[str] = field(default_factory=Counter)
    # (RPC, status) of every RPC case: shows how far past the auth gate the fuzz got.
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    crashes: list[str] = field(default_factory=list)
    corruptions: list[str] = field(default_factory=list)

    def crash(self, what: str) -> None:
        self.crashes.append(what)


@dataclass
class Honest:
    """The honest device and clinician of one mesh, working through the whole suite."""

    session_id: str
    patient_id: str
    publisher_token: str
    viewer_token: str
    sent: list[vitals_pb2.VitalsBatch] = field(default_factory=list)
    seen: list[vitals_pb2.VitalsBatch] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    acked: int = 0


@dataclass
class Fuzz:
    """The fuzz's own session and people: genuine credentials that reach deep code."""

    session_id: str = ""
    tokens: dict[str, str] = field(default_factory=dict)
    # The next seq plausible messages use, so they are new to the edge and the archive.
    seq: int = 0


@dataclass
class Mesh:
    loop: asyncio.AbstractEventLoop
    core: CoreServer
    edge: EdgeServer
    honest: Honest
    fuzz: Fuzz
    tally: Tally
    pki: dict[str, TlsFiles] | None = None
    sdp_offer: str = ""
    channels: dict[str, grpc.Channel] = field(default_factory=dict)

    def __repr__(self) -> str:  # hypothesis prints it with every failing case
        return f"Mesh({'mTLS' if self.pki else 'plaintext'})"

    def run(self, coro: Any, timeout: float = 60) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def address(self, where: str) -> str:
        return self.core.address if where == "core" else self.edge.address

    def channel(self, where: str, cert: str = "device") -> grpc.Channel:
        """One synchronous channel per target (and certificate), reused by every case."""
        key = f"{where}/{cert}"
        ch = self.channels.get(key)
        if ch is None:
            if self.pki is None:
                ch = grpc.insecure_channel(self.address(where), options=channel_options())
            else:
                f = self.pki[cert]
                creds = grpc.ssl_channel_credentials(
                    f.ca.read_bytes(), f.key.read_bytes(), f.cert.read_bytes()
                )
                ch = grpc.secure_channel(self.address(where), creds, options=channel_options())
            self.channels[key] = ch
        return ch


async def _start(tmp: Path, pki: dict[str, TlsFiles] | None) -> tuple[CoreServer, EdgeServer]:
    tls = tls_kw(pki["core"]) if pki else {}
    # A loaded CI box must not see the edge as dead mid-suite (that is failover, tested elsewhere).
    core = CoreServer(core_settings(tmp, heartbeat_timeout_s=60.0, **tls))
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
                "publish_rate_batches_per_s": RATE,
                "publish_burst_batches": RATE_BURST,
                **(tls_kw(pki["edge-a"]) if pki else {}),
            }
        )
    )
    await edge.start()
    return core, edge


async def _people(core: CoreServer, edge: EdgeServer, tls: TlsFiles | None) -> tuple[Honest, Fuzz]:
    users = core.security.users
    await users.add_user("dr-honest", "clinician", PASSWORD)
    await users.assign("dr-honest", "p-honest")
    await users.add_user("dr-fuzz", "clinician", PASSWORD)
    await users.assign("dr-fuzz", "p-fuzz")
    await users.add_user("ops-fuzz", "operator", PASSWORD)
    dr = bearer(core.issuer.issue_user(user_id="dr-honest", role="clinician", ttl_s=3600)[0])
    async with secure_channel(core.address, tls) as ch:
        s = sessions_pb2_grpc.SessionsServiceStub(ch)
        opened = await s.Open(sessions_pb2.OpenSessionRequest(patient_id="p-honest", zone="zone-a"))
        sid = opened.session.session_id
        viewer = await s.Attach(
            sessions_pb2.AttachSessionRequest(session_id=sid, role=sessions_pb2.ROLE_VIEWER),
            metadata=dr,
        )
    honest = Honest(sid, "p-honest", opened.assignment.token, viewer.assignment.token)
    fuzz = Fuzz()
    fuzz.tokens["clinician"] = core.issuer.issue_user(
        user_id="dr-fuzz", role="clinician", ttl_s=3600
    )[0]
    fuzz.tokens["operator"] = core.issuer.issue_user(
        user_id="ops-fuzz", role="operator", ttl_s=3600
    )[0]
    await _fuzz_session(core, fuzz, tls)
    if tls is None:
        # The fuzz's own edge, known to the core (plaintext mode asks no more of an edge).
        await core.edges.connect("edge-fuzz", "zone-fuzz", "127.0.0.1:1", 10)
    return honest, fuzz


async def _fuzz_session(core: CoreServer, fuzz: Fuzz, tls: TlsFiles | None) -> None:
    """(Re)open the fuzz's own session: fuzzed Close and ChangeZone calls may end it."""
    async with secure_channel(core.address, tls) as ch:
        s = sessions_pb2_grpc.SessionsServiceStub(ch)
        opened = await s.Open(sessions_pb2.OpenSessionRequest(patient_id="p-fuzz", zone="zone-a"))
        sid = opened.session.session_id
        viewer = await s.Attach(
            sessions_pb2.AttachSessionRequest(session_id=sid, role=sessions_pb2.ROLE_VIEWER),
            metadata=bearer(fuzz.tokens["clinician"]),
        )
    fuzz.session_id = sid
    fuzz.seq = 0
    fuzz.tokens["publisher"] = opened.assignment.token
    fuzz.tokens["viewer"] = viewer.assignment.token


async def _honest_device(edge: EdgeServer, h: Honest, tls: TlsFiles | None) -> None:
    """Publishes a batch every HONEST_INTERVAL_S until told to stop, beside a viewer that
    collects everything; both through the whole suite."""
    ch = secure_channel(edge.address, tls)
    stub = vitals_pb2_grpc.VitalsServiceStub(ch)
    sub = stub.Subscribe(
        vitals_pb2.SubscribeVitalsRequest(session_id=h.session_id),
        metadata=bearer(h.viewer_token),
    )

    async def view() -> None:
        try:
            async for ev in sub:
                if ev.HasField("batch"):
                    h.seen.append(ev.batch)
        except grpc.aio.AioRpcError:
            pass  # the suite is over (or the edge stopped): what it saw is checked

    viewer = asyncio.create_task(view())
    # Publish only once the viewer is in: a batch before that is (rightly) not delivered to it.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        channel = edge.sessions.channels.get(h.session_id)
        if channel is not None and channel.subscribers:
            break
        await asyncio.sleep(0.01)

    async def batches() -> Any:
        seq = 0
        while not h.stop.is_set():
            seq += 1
            b = make_batch(h.session_id, seq, hr=60.0 + seq % 40)
            h.sent.append(b)
            yield vitals_pb2.PublishVitalsRequest(batch=b)
            try:
                await asyncio.wait_for(h.stop.wait(), HONEST_INTERVAL_S)
            except TimeoutError:
                pass

    async for ack in stub.Publish(batches(), metadata=bearer(h.publisher_token)):
        h.acked = max(h.acked, ack.received_seq)
    deadline = time.monotonic() + 30
    while len(h.seen) < len(h.sent) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    sub.cancel()
    viewer.cancel()
    await asyncio.gather(viewer, return_exceptions=True)
    await ch.close()


async def _an_offer() -> str:
    """A real browser-like SDP offer, so Negotiate reaches the media stack, not just parsing."""
    from aiortc import RTCPeerConnection

    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    # setLocalDescription gathers the ICE candidates: a complete (non-trickle) offer.
    await pc.setLocalDescription(await pc.createOffer())
    sdp = str(pc.localDescription.sdp)
    await pc.close()
    return sdp


def _launch(tmp: Path, loop: asyncio.AbstractEventLoop, tally: Tally, tls: bool) -> Mesh:
    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(120)

    pki = init_pki(tmp / "pki", services=["core", "edge-a"]) if tls else None
    core, edge = run(_start(tmp, pki))
    device = pki["device"] if pki else None
    honest, fuzz = run(_people(core, edge, device))
    mesh = Mesh(loop, core, edge, honest, fuzz, tally, pki)
    mesh.sdp_offer = run(_an_offer())

    async def go() -> None:
        honest.tasks.append(asyncio.create_task(_honest_device(edge, honest, device)))

    run(go())
    return mesh


def _land(mesh: Mesh) -> None:
    for ch in mesh.channels.values():
        ch.close()

    async def honest_done() -> None:
        mesh.honest.stop.set()
        await asyncio.wait_for(asyncio.gather(*mesh.honest.tasks, return_exceptions=True), 30)

    mesh.run(honest_done())
    mesh.run(mesh.edge.stop(grace=0))
    mesh.run(mesh.core.stop(grace=0))


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    thread = threading.Thread(target=lp.run_forever, daemon=True)
    thread.start()
    yield lp
    lp.call_soon_threadsafe(lp.stop)
    thread.join(10)
    lp.close()


@pytest.fixture(scope="module")
def tally() -> Tally:
    return Tally()


@pytest.fixture(scope="module")
def mesh(
    tmp_path_factory: pytest.TempPathFactory, loop: asyncio.AbstractEventLoop, tally: Tally
) -> Iterator[Mesh]:
    m = _launch(tmp_path_factory.mktemp("hostile"), loop, tally, tls=False)
    yield m
    _land(m)


@pytest.fixture(scope="module")
def tls_mesh(
    tmp_path_factory: pytest.TempPathFactory, loop: asyncio.AbstractEventLoop, tally: Tally
) -> Iterator[Mesh]:
    m = _launch(tmp_path_factory.mktemp("hostile-tls"), loop, tally, tls=True)
    yield m
    _land(m)


@pytest.fixture(scope="module")
def rss_before(mesh: Mesh, tls_mesh: Mesh) -> int:
    """The process with both meshes up and warm, before any hostile input."""
    gc.collect()
    return int(psutil.Process().memory_info().rss)


# -- generated messages -----------------------------------------------------------------------


@dataclass(frozen=True)
class Ids:
    """Values string fields are drawn from, by field name: real ids reach deep code."""

    sessions: tuple[str, ...]
    patients: tuple[str, ...]
    edges: tuple[str, ...]
    tokens: tuple[str, ...]
    sdp: str


JUNK_TEXT = st.sampled_from(["", " ", "\x00", "A" * 300, "../../etc/passwd", "ses_", "é" * 40])


def _pool(name: str, ids: Ids) -> st.SearchStrategy[str] | None:
    if name.endswith("session_id"):
        return st.sampled_from(ids.sessions)
    if name == "patient_id" or name == "patient_ids":
        return st.sampled_from(ids.patients)
    if name.endswith("edge_id"):
        return st.sampled_from(ids.edges)
    if name in ("zone", "new_zone"):
        return st.sampled_from(["zone-a", "zone-b", "zone-zz"])
    if name.endswith("token"):
        return st.sampled_from(ids.tokens)
    if name.endswith("sdp"):
        return st.just(ids.sdp)
    if name in ("subject", "user_id"):
        return st.sampled_from([FORGED, "dr-fuzz", "ops-fuzz"])
    if name == "action":
        return st.sampled_from(["vitals.subscribe", "archive.query", "x"])
    return None


_INTS: dict[int, tuple[int, int]] = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _scalar(f: FieldDescriptor, ids: Ids) -> st.SearchStrategy[Any]:
    t = f.type
    if t == FieldDescriptor.TYPE_STRING:
        pool = _pool(f.name, ids)
        text = st.text(max_size=40) | JUNK_TEXT
        return text if pool is None else pool | text
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_ENUM:
        assert f.enum_type is not None
        return st.sampled_from([v.number for v in f.enum_type.values] + [999, -1])
    if t == FieldDescriptor.TYPE_DOUBLE:
        return st.floats() | st.sampled_from([0.0, -1.0, 913.7, 1e308])
    if t == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    lo, hi = _INTS[t]
    small = st.integers(max(lo, -3), min(hi, 50))
    return small | st.integers(lo, hi) | st.just(hi)


def message_of(desc: Descriptor, ids: Ids, depth: int = 0) -> st.SearchStrategy[Message]:
    """Any message of this type, field by field: right types, hostile values."""
    cls = message_factory.GetMessageClass(desc)
    parts: dict[str, st.SearchStrategy[Any]] = {}
    for f in desc.fields:
        if f.message_type is not None:
            if depth >= 2:
                continue
            one: st.SearchStrategy[Any] = st.deferred(
                lambda f=f: message_of(f.message_type, ids, depth + 1)
            )
        else:
            one = _scalar(f, ids)
        repeated = f.is_repeated
        parts[f.name] = (
            st.lists(one, max_size=40 if f.name == "samples" else 3) if repeated else one
        )

    def build(values: dict[str, Any]) -> Message:
        msg = cls()
        for name, v in values.items():
            f = desc.fields_by_name[name]
            if f.is_repeated:
                target = getattr(msg, name)
                for item in v:
                    if f.message_type is not None:
                        target.add().CopyFrom(item)
                    else:
                        target.append(item)
            elif f.message_type is not None:
                getattr(msg, name).CopyFrom(v)
            else:
                setattr(msg, name, v)
        return msg

    return st.fixed_dictionaries({}, optional=parts).map(build)


PLAUSIBLE_TEXT = {
    "patient_id": "p-fuzz",
    "edge_id": "edge-fuzz",
    "zone": "zone-a",
    "address": "127.0.0.1:1",
    "http_address": "http://127.0.0.1:1",
    "tls_server_name": "localhost",
    "user_id": "dr-fuzz",
    "password": PASSWORD,
    "action": "vitals.subscribe",
    "outcome": "allowed",
    "subject": FORGED,
    "role": "viewer",
    "peer": "ipv4:10.0.0.1:1",
    "edge_boot_id": "fuzz-boot",
    "call_id": "call-x",
    "device_id": "dev-fuzz",
}
LEAVE_EMPTY = ("refresh_token", "unreachable_edge_id")


def plausible(desc: Descriptor, mesh: Mesh, depth: int = 0) -> Message:
    """A message of this type as an honest client of the fuzz's own session would send it,
    built from field names and types, so any RPC (a new one too) reaches its handler."""
    fz = mesh.fuzz
    if desc.full_name == "telehealth.v1.VitalsBatch":
        fz.seq += 1
        return make_batch(fz.session_id, fz.seq)
    msg = message_factory.GetMessageClass(desc)()
    for f in desc.fields:
        name = f.name
        if name in LEAVE_EMPTY:
            continue
        if f.message_type is not None:
            if depth >= 2:
                continue
            sub = plausible(f.message_type, mesh, depth + 1)
            if f.is_repeated:
                getattr(msg, name).add().CopyFrom(sub)
            else:
                getattr(msg, name).CopyFrom(sub)
            continue
        value: Any
        t = f.type
        if t == FieldDescriptor.TYPE_STRING:
            if name.endswith("session_id"):
                value = fz.session_id
            elif name == "zone" and desc.full_name == "telehealth.v1.HeartbeatRequest":
                # The fuzz's edge serves a zone of its own: placement never picks it for the
                # sessions of zone-a.
                value = "zone-fuzz"
            elif name.endswith("sdp"):
                value = mesh.sdp_offer
            else:
                value = PLAUSIBLE_TEXT.get(name, "x")
        elif t == FieldDescriptor.TYPE_BOOL:
            value = True
        elif t == FieldDescriptor.TYPE_ENUM:
            assert f.enum_type is not None
            value = next((v.number for v in f.enum_type.values if v.number), 0)
        elif t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            value = 1.0
        elif t == FieldDescriptor.TYPE_BYTES:
            value = b"x"
        elif name.endswith("unix_ns"):
            value = time.time_ns()
        elif name.endswith("seq"):
            fz.seq += 1
            value = fz.seq
        else:
            value = 10
        if f.is_repeated:
            getattr(msg, name).append(value)
        else:
            setattr(msg, name, value)
    return msg


def _mutate(msg: bytes, flips: list[int]) -> bytes:
    b = bytearray(msg)
    for f in flips:
        if b:
            b[f % len(b)] ^= 1 << (f % 8)
    return bytes(b)


TOKEN_NAMES = ("clinician", "operator", "publisher", "viewer")
# Header-legal text only: other bytes are refused by the client library before they leave.
tokens = (
    st.sampled_from(TOKEN_NAMES)
    | st.sampled_from(["", "x.y.z", "Bearer"])
    | st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=40)
)


def ids_for(mesh: Mesh, rpc: Rpc, token: str) -> Ids:
    """Honest ids where no credential in play could act on them; see the module docstring."""
    fuzz_ids = (mesh.fuzz.session_id, "ses_missing", "")
    honest_ok = token != "operator" and (rpc.path not in EDGE_ONLY or mesh.pki is not None)
    sessions = fuzz_ids + ((mesh.honest.session_id,) if honest_ok else ())
    patients = ("p-fuzz", "p-missing") + (("p-honest",) if honest_ok else ())
    edges = ("edge-fuzz", "") + (("edge-a",) if honest_ok else ())
    toks = (*mesh.fuzz.tokens.values(), mesh.honest.viewer_token, "junk")
    return Ids(sessions, patients, edges, toks, mesh.sdp_offer)


# -- one case ---------------------------------------------------------------------------------


def _call(ch: grpc.Channel, rpc: Rpc, payloads: list[bytes], md: Any) -> grpc.StatusCode:
    """Raw bytes in and out (no message types): what any peer on the network can send."""
    anych: Any = ch
    try:
        if rpc.kind == "uu":
            anych.unary_unary(rpc.path)(payloads[0], timeout=5, metadata=md)
        elif rpc.kind == "us":
            for _ in anych.unary_stream(rpc.path)(payloads[0], timeout=0.3, metadata=md):
                pass
        else:
            call = anych.stream_stream(rpc.path)(iter(payloads), timeout=0.3, metadata=md)
            for _ in call:
                pass
    except grpc.RpcError as err:
        e: Any = err
        if e.code() in CRASH_CODES:
            raise AssertionError(f"{rpc.path}: {e.code().name}: {e.details()}") from None
        return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _ensure_fuzz_session(mesh: Mesh) -> None:
    s = mesh.core.directory.sessions.get(mesh.fuzz.session_id)
    if s is None or s.zone != "zone-a" or s.edge_id != "edge-a":
        tls = mesh.pki["device"] if mesh.pki else None
        mesh.run(_fuzz_session(mesh.core, mesh.fuzz, tls))


@st.composite
def hostile_case(draw: st.DrawFn, rpcs: list[Rpc]) -> tuple[Rpc, str, str, Any]:
    rpc = draw(st.sampled_from(rpcs))
    token = draw(tokens)
    mode = draw(
        st.sampled_from(
            ["plausible", "plausible", "tweaked", "tweaked", "generated", "mutated", "random",
             "trailing"]
        )
    )  # fmt: skip
    return rpc, token, mode, draw(st.data())


def _payloads(mesh: Mesh, rpc: Rpc, token: str, mode: str, data: Any) -> list[bytes]:
    ids = ids_for(mesh, rpc, token)
    desc = rpc.request.DESCRIPTOR
    count = data.draw(st.integers(1, 3)) if rpc.kind[0] == "s" else 1
    if mode == "random":
        return [data.draw(st.binary(max_size=512))] * count
    if mode == "generated":
        return [data.draw(message_of(desc, ids)).SerializeToString() for _ in range(count)]
    msgs = [plausible(desc, mesh) for _ in range(count)]
    for f in desc.fields:
        if f.enum_type is not None and not f.is_repeated:
            # Which role (or mode) a plausible request asks for, against the token it carries.
            value = data.draw(st.sampled_from([v.number for v in f.enum_type.values]))
            for m in msgs:
                setattr(m, f.name, value)
    if mode == "tweaked" and desc.fields:
        # One or two fields of a plausible message given hostile values.
        other = data.draw(message_of(desc, ids))
        for f in data.draw(st.lists(st.sampled_from(list(desc.fields)), min_size=1, max_size=2)):
            for m in msgs:
                m.ClearField(f.name)
                if f.is_repeated:
                    getattr(m, f.name).extend(getattr(other, f.name))
                elif f.message_type is None or other.HasField(f.name):
                    if f.message_type is not None:
                        getattr(m, f.name).CopyFrom(getattr(other, f.name))
                    else:
                        setattr(m, f.name, getattr(other, f.name))
    out = [m.SerializeToString() for m in msgs]
    if mode == "mutated":
        flips = data.draw(st.lists(st.integers(0, 10_000), min_size=1, max_size=8))
        return [_mutate(m, flips) for m in out]
    if mode == "trailing":
        return [m + data.draw(st.binary(min_size=1, max_size=64)) * 16 for m in out]
    return out


def _run_case(mesh: Mesh, rpc: Rpc, token: str, payloads: list[bytes], cert: str) -> str:
    real = mesh.fuzz.tokens.get(token, token)
    md = (("authorization", f"Bearer {real}"),) if real else None
    target = ("mTLS " if mesh.pki else "") + rpc.path
    mesh.tally.cases += 1
    mesh.tally.by_target[target] += 1
    try:
        code = _call(mesh.channel(rpc.where, cert), rpc, payloads, md).name
        mesh.tally.outcomes[(target, code)] += 1
        return code
    except AssertionError as e:
        mesh.tally.crash(str(e))
        raise


@pytest.mark.parametrize("rpc", RPCS + HEALTH, ids=lambda r: f"{r.where}{r.path}")
@settings(
    # Per RPC, so every one gets its share whatever hypothesis favours.
    max_examples=max(8, EXAMPLES // len(RPCS)),
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=hostile_case([Rpc("", "uu", health_pb2.HealthCheckRequest, "core")]))
def test_every_rpc_survives_hostile_messages(
    mesh: Mesh, rss_before: int, rpc: Rpc, case: tuple[Rpc, str, str, Any]
) -> None:
    _, token, mode, data = case
    _ensure_fuzz_session(mesh)
    _run_case(mesh, rpc, token, _payloads(mesh, rpc, token, mode, data), "device")


def test_every_rpc_with_each_genuine_credential(mesh: Mesh) -> None:
    """Plausible requests with each genuine credential (and each value of an enum field, such
    as the role asked for): whatever hypothesis favours, every handler that some credential
    opens is reached."""
    for rpc in RPCS + HEALTH:
        desc = rpc.request.DESCRIPTOR
        enums = [f for f in desc.fields if f.enum_type is not None and not f.is_repeated]
        choices = [v.number for v in enums[0].enum_type.values] if enums else [None]
        for token in (*TOKEN_NAMES, ""):
            for choice in choices:
                _ensure_fuzz_session(mesh)
                msg = plausible(desc, mesh)
                if choice is not None:
                    setattr(msg, enums[0].name, choice)
                _run_case(mesh, rpc, token, [msg.SerializeToString()], "device")


def test_every_rpc_was_driven_past_the_auth_gate(mesh: Mesh) -> None:
    missing = [r.path for r in RPCS if mesh.tally.by_target[r.path] < 8]
    assert not missing, f"RPCs the fuzz barely reached: {missing}"
    assert len(RPCS) == 22
    # INVALID_ARGUMENT may come from the decoder before the gate: it does not count.
    gate = {"UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT"}
    for r in RPCS:
        codes = {c: n for (path, c), n in mesh.tally.outcomes.items() if path == r.path}
        print(f"{r.path:<45} {dict(sorted(codes.items()))}")
    # Genuine credentials took every RPC into its handler at least once.
    shut = [
        r.path for r in RPCS if not set(c for (p, c) in mesh.tally.outcomes if p == r.path) - gate
    ]
    assert not shut, f"RPCs the fuzz never got past the auth gate: {shut}"


# -- HTTP and WebSocket -----------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    where: str
    method: str
    path: str  # with {placeholders}


def every_route(mesh: Mesh) -> list[Route]:
    out = set()
    for where, app in (("core", mesh.core.http.app), ("edge", mesh.edge.http.app)):
        for r in app.router.routes():
            if r.resource is not None:
                out.add(Route(where, r.method, r.resource.canonical))
    return sorted(out, key=lambda r: (r.where, r.path, r.method))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def http_case(
    draw: st.DrawFn, route: Route, mesh: Mesh
) -> tuple[Route, str, dict[str, str], bytes | None]:
    path = route.path
    for name in ("session_id", "patient_id", "call_id", "tail", "filename"):
        if "{" + name + "}" in path:
            value = draw(
                st.sampled_from(
                    [mesh.fuzz.session_id, mesh.honest.session_id, "p-fuzz", "p-honest", "x"]
                )
                | st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=30)
            )
            path = path.replace("{" + name + "}", urllib.parse.quote(value, safe=""))
    if "{" in path:
        path = path.split("{", 1)[0] + "x"
    if draw(st.booleans()):
        path += "?" + urllib.parse.quote(draw(st.text(max_size=40)), safe="=&")
    headers: dict[str, str] = {}
    auth = draw(st.sampled_from(["none", "clinician", "operator", "cookie", "junk", "viewer"]))
    base = mesh.core.http.url if route.where == "core" else mesh.edge.http.url
    if auth in ("clinician", "operator", "viewer"):
        headers["Authorization"] = "Bearer " + mesh.fuzz.tokens[auth]
    elif auth == "cookie":
        headers["Cookie"] = "telehealth_session=" + mesh.fuzz.tokens["clinician"]
        if draw(st.booleans()):
            headers["Origin"] = base
    elif auth == "junk":
        headers["Authorization"] = "Bearer " + draw(st.text(alphabet="abcXYZ.-_", max_size=40))
    body: bytes | None = None
    if route.method in ("POST", "PUT", "PATCH"):
        shape = draw(st.sampled_from(["json", "fields", "raw", "empty"]))
        if shape == "json":
            body = json.dumps(draw(json_values)).encode()
        elif shape == "fields":
            fields_ = {
                "user": st.sampled_from(["dr-fuzz", "ops-fuzz", ""]) | st.text(max_size=10),
                "password": st.sampled_from([PASSWORD, "x"]) | st.text(max_size=10),
                "sdp": st.sampled_from([mesh.sdp_offer, "v=0", ""]),
                "role": st.sampled_from(["publisher", "viewer", "patient", "clinician", "x"]),
                "token": st.sampled_from([*mesh.fuzz.tokens.values(), "junk"]),
                "session_id": st.sampled_from([mesh.fuzz.session_id, "x"]),
                "patient_id": st.sampled_from(["p-fuzz", "p-honest"]),
            }
            body = json.dumps(draw(st.fixed_dictionaries({}, optional=fields_))).encode()
        elif shape == "raw":
            body = draw(st.binary(max_size=2048))
        else:
            body = b""
    return route, path, headers, body


def _http(mesh: Mesh, route: Route, path: str, headers: dict[str, str], body: bytes | None) -> int:
    base = mesh.core.http.url if route.where == "core" else mesh.edge.http.url
    req = urllib.request.Request(base + path, data=body, headers=headers, method=route.method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read(1 << 16)
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        raise AssertionError(f"{route.method} {route.where}{path[:60]}: {e}") from None


def test_every_http_route_survives_hostile_requests(mesh: Mesh) -> None:
    routes = every_route(mesh)
    assert len(routes) >= 30

    # One hypothesis run per route, so every route gets its share whatever it favours.
    def fuzz(route: Route) -> None:
        @settings(
            max_examples=max(6, EXAMPLES // 2 // len(routes)),
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(data=st.data())
        def one(data: st.DataObject) -> None:
            _ensure_fuzz_session(mesh)
            _, path, headers, body = data.draw(http_case(route, mesh))
            mesh.tally.cases += 1
            mesh.tally.by_target[f"{route.where} {route.method} {route.path}"] += 1
            try:
                status = _http(mesh, route, path, headers, body)
            except AssertionError as e:
                mesh.tally.crash(str(e))
                raise
            if status >= 500 and status != 503:
                mesh.tally.crash(f"{route.method} {route.where}{path[:60]}: HTTP {status}")
                raise AssertionError(mesh.tally.crashes[-1])

        one()

    for route in routes:
        fuzz(route)


def test_every_http_route_was_driven(mesh: Mesh) -> None:
    routes = every_route(mesh)
    missing = [
        f"{r.where} {r.method} {r.path}"
        for r in routes
        if mesh.tally.by_target[f"{r.where} {r.method} {r.path}"] == 0
    ]
    assert not missing, f"routes never requested: {missing}"


@st.composite
def ws_case(draw: st.DrawFn, mesh: Mesh) -> tuple[Any, list[Any]]:
    hello: Any
    if draw(st.booleans()):
        hello = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "session_id": st.sampled_from(
                        [mesh.fuzz.session_id, mesh.honest.session_id, "x", ""]
                    )
                    | st.integers(),
                    "token": st.sampled_from(
                        [mesh.fuzz.tokens["viewer"], mesh.fuzz.tokens["publisher"], "junk"]
                    )
                    | st.integers(),
                    "resume_after_seq": st.integers(-5, 2**70) | st.text(max_size=3) | st.none(),
                },
            )
        )
    else:
        hello = draw(json_values)
    then = draw(
        st.lists(json_values | st.binary(max_size=200).map(lambda b: ("bin", b)), max_size=3)
    )
    return hello, then


async def _ws(mesh: Mesh, hello: Any, then: list[Any]) -> str:
    url = mesh.edge.http.url.replace("http", "ws", 1) + "/media/ws"
    async with aiohttp.ClientSession() as s, s.ws_connect(url) as ws:
        await ws.send_str(json.dumps(hello))
        for m in then:
            if isinstance(m, tuple):
                await ws.send_bytes(m[1])
            else:
                await ws.send_str(json.dumps(m))
        try:
            first = await ws.receive(timeout=2)
        except TimeoutError:
            return "open"
        if first.type == aiohttp.WSMsgType.TEXT:
            kind = str(json.loads(first.data).get("type", ""))
            if kind == "welcome":
                # A genuine view: it must be the session its token names.
                assert json.loads(first.data)["session_id"] == mesh.fuzz.session_id
            return kind
        return first.type.name


@settings(
    max_examples=max(30, EXAMPLES // 7),
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_the_websocket_survives_hostile_messages(mesh: Mesh, data: st.DataObject) -> None:
    _ensure_fuzz_session(mesh)
    hello, then = data.draw(ws_case(mesh))
    mesh.tally.cases += 1
    mesh.tally.by_target["edge websocket"] += 1
    try:
        mesh.run(_ws(mesh, hello, then), timeout=20)
    except (aiohttp.ClientError, AssertionError) as e:
        mesh.tally.crash(f"websocket: {type(e).__name__}: {e}")
        raise


# -- replays, floods, oversize ----------------------------------------------------------------


def test_replays_floods_and_oversize_are_refused_or_dropped(mesh: Mesh) -> None:
    h, fz = mesh.honest, mesh.fuzz

    async def attack() -> dict[str, Counter[str]]:
        seen: dict[str, Counter[str]] = {}

        def note(what: str, code: Any) -> None:
            name = code.name if hasattr(code, "name") else str(code)
            seen.setdefault(what, Counter())[name] += 1
            mesh.tally.cases += 1
            if code in CRASH_CODES:
                mesh.tally.crash(f"{what}: {name}")

        async with grpc.aio.insecure_channel(mesh.edge.address) as ch:
            stub = vitals_pb2_grpc.VitalsServiceStub(ch)

            async def publish(reqs: list[vitals_pb2.PublishVitalsRequest], token: str) -> Any:
                async def gen() -> Any:
                    for r in reqs:
                        yield r

                try:
                    async for _ in stub.Publish(gen(), metadata=bearer(token)):
                        pass
                except grpc.aio.AioRpcError as e:
                    return e.code()
                return grpc.StatusCode.OK

            # Replay: the honest device's own batches again, and again with other readings
            # under the same seqs, on its own (stolen) token: dropped as duplicates.
            replay = [vitals_pb2.PublishVitalsRequest(batch=b) for b in list(h.sent)[:20]]
            note("replay as sent", await publish(replay, h.publisher_token))
            forged = []
            for b in list(h.sent)[:20]:
                f = vitals_pb2.VitalsBatch()
                f.CopyFrom(b)
                f.vitals[0].heart_rate_bpm = 41.0
                forged.append(vitals_pb2.PublishVitalsRequest(batch=f))
            note("replay with other readings", await publish(forged, h.publisher_token))
            # Into the honest session with the fuzz's own tokens: refused.
            ahead = vitals_pb2.PublishVitalsRequest(batch=make_batch(h.session_id, 10**6))
            for name in ("publisher", "viewer"):
                note(f"honest session with fuzz {name}", await publish([ahead], fz.tokens[name]))
            # Flood: junk subscriptions at once.
            calls = [
                stub.Subscribe(
                    vitals_pb2.SubscribeVitalsRequest(session_id=h.session_id),
                    metadata=bearer(f"junk{i}"),
                )
                for i in range(100)
            ]
            for c in calls:
                try:
                    await c.read()
                    note("junk subscription", grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as e:
                    note("junk subscription", e.code())
            # Flood: a backlog far over the fuzz session's rate on one stream (paced, all
            # taken), and many parallel streams of it (the excess refused).
            base = 10**5
            burst = [
                vitals_pb2.PublishVitalsRequest(batch=make_batch(fz.session_id, base + i))
                for i in range(100)
            ]
            note("paced backlog", await publish(burst, fz.tokens["publisher"]))
            # Each of 200 streams owes up to 3 batches: far more than the rate can pay.
            parallel = await asyncio.gather(
                *[
                    publish(
                        [
                            vitals_pb2.PublishVitalsRequest(
                                batch=make_batch(fz.session_id, 2 * base + 3 * i + k)
                            )
                            for k in range(3)
                        ],
                        fz.tokens["publisher"],
                    )
                    for i in range(200)
                ]
            )
            for code in parallel:
                note("parallel streams", code)
            # Oversize: past grpc_max_message_bytes.
            big = vitals_pb2.PublishVitalsRequest(batch=make_batch(fz.session_id, 3 * base))
            big.batch.waveforms[0].samples.extend([0.0] * 1_200_000)
            note("oversize", await publish([big], fz.tokens["publisher"]))
        async with grpc.aio.insecure_channel(mesh.core.address) as ch:
            login = auth_pb2_grpc.AuthServiceStub(ch)
            for i in range(40):
                try:
                    await login.Login(
                        auth_pb2.LoginRequest(user_id="dr-fuzz", password=f"guess-{i}")
                    )
                    note("login flood", grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as e:
                    note("login flood", e.code())
        return seen

    seen = mesh.run(attack(), timeout=120)
    assert seen["replay as sent"] == Counter({"OK": 1})
    assert seen["replay with other readings"] == Counter({"OK": 1})
    assert seen["honest session with fuzz publisher"] == Counter({"PERMISSION_DENIED": 1})
    assert seen["honest session with fuzz viewer"] == Counter({"PERMISSION_DENIED": 1})
    assert seen["junk subscription"] == Counter({"UNAUTHENTICATED": 100})
    assert seen["paced backlog"] == Counter({"OK": 1}), seen["paced backlog"]
    assert set(seen["parallel streams"]) <= {"OK", "RESOURCE_EXHAUSTED"}
    assert seen["parallel streams"]["RESOURCE_EXHAUSTED"] > 0, {
        k: dict(v) for k, v in seen.items() if "paral" in k or "paced" in k
    }
    assert seen["oversize"] == Counter({"RESOURCE_EXHAUSTED": 1})
    assert seen["login flood"]["RESOURCE_EXHAUSTED"] > 0
    assert set(seen["login flood"]) <= {"UNAUTHENTICATED", "RESOURCE_EXHAUSTED"}


# -- mTLS: the identity rules under fuzz ------------------------------------------------------


@settings(
    max_examples=max(40, EXAMPLES // 4),
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    case=hostile_case([r for r in RPCS if r.where == "core"]),
    cert=st.sampled_from(["device", "clinician", "operator"]),
)
def test_with_mtls_no_certificate_but_the_edges_acts_as_an_edge(
    tls_mesh: Mesh, case: tuple[Rpc, str, str, Any], cert: str
) -> None:
    rpc, token, mode, data = case
    mesh = tls_mesh
    _ensure_fuzz_session(mesh)
    if rpc.path in EDGE_ONLY:
        # Forged edge traffic naming the real edge, the honest session and its patient.
        ids = Ids(
            (mesh.honest.session_id,),
            (mesh.honest.patient_id,),
            ("edge-a",),
            ("",),
            "",
        )
        msgs = [data.draw(message_of(rpc.request.DESCRIPTOR, ids)) for _ in range(2)]
        payloads = [m.SerializeToString() for m in msgs]
        code = _run_case(mesh, rpc, "", payloads, cert)
        # Refused, every time (a deadline under load proves nothing, but is no breach).
        if code not in ("PERMISSION_DENIED", "DEADLINE_EXCEEDED"):
            mesh.tally.corruptions.append(f"{cert} certificate on {rpc.path}: {code}")
        return
    _run_case(mesh, rpc, token, _payloads(mesh, rpc, token, mode, data), cert)


# -- afterwards -------------------------------------------------------------------------------


async def _settle(mesh: Mesh) -> None:
    h = mesh.honest
    h.stop.set()
    await asyncio.gather(*h.tasks, return_exceptions=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if await mesh.core.archive.archived_seq(h.session_id) >= len(h.sent):
            return
        await asyncio.sleep(0.05)


async def _check_data(mesh: Mesh, label: str) -> list[str]:
    """What is stored for the honest session, against what the honest device sent."""
    h, core, edge = mesh.honest, mesh.core, mesh.edge
    problems = []
    sent = [b.SerializeToString() for b in h.sent]
    if not sent:
        return [f"{label}: the honest device sent nothing"]
    if [b.SerializeToString() for b in h.seen] != sent:
        problems.append(f"{label}: the honest viewer saw {len(h.seen)} batches != {len(sent)} sent")
    journal = await asyncio.to_thread(edge.journal.read_session, h.session_id, 0, 10**6)
    if [vitals_pb2.VitalsBatch.FromString(e.batch).SerializeToString() for e in journal] != sent:
        problems.append(f"{label}: the journal differs from what the device sent")
    rows = await core.archive.store.query(session_id=h.session_id, limit=10**6)
    archived = [
        vitals_pb2.VitalsBatch.FromString(r.batch).SerializeToString()
        for r in sorted(rows, key=lambda r: r.seq)
    ]
    if archived != sent:
        problems.append(f"{label}: the archive holds {len(archived)} batches, not what was sent")
    if {(r.patient_id, r.edge_id) for r in rows} != {(h.patient_id, "edge-a")}:
        problems.append(f"{label}: archived rows name another patient or edge")
    s = await core.directory.get(h.session_id)
    if (s.patient_id, s.zone, s.edge_id, s.state.name) != (
        h.patient_id,
        "zone-a",
        "edge-a",
        "OPEN",
    ):
        problems.append(f"{label}: the honest session changed: {s}")
    e = core.edges.edges.get("edge-a")
    if e is None or e.address != edge.address:
        problems.append(f"{label}: edge-a's registration was taken over")
    report = await core.security.audit.report()
    if report.problems:
        problems.append(f"{label}: audit chain: {report.problems[0]}")
    if mesh.pki is not None:
        async for entry in core.security.audit.entries():
            if entry.event.subject == FORGED:
                problems.append(f"{label}: a forged audit record was chained")
                break
    return problems


def _healthy(mesh: Mesh) -> bool:
    for where in ("core", "edge"):
        r = health_pb2_grpc.HealthStub(mesh.channel(where)).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        if r.status != health_pb2.HealthCheckResponse.SERVING:
            return False
    return True


def test_afterwards_healthy_bounded_and_the_data_is_exactly_what_was_sent(
    mesh: Mesh, tls_mesh: Mesh, tally: Tally, rss_before: int
) -> None:
    for path in EDGE_ONLY:
        refused = {c: n for (t, c), n in tally.outcomes.items() if t == "mTLS " + path}
        assert sum(refused.values()) >= 5, f"mTLS {path}: too few forged calls {refused}"
    for m, label in ((mesh, "plaintext"), (tls_mesh, "mTLS")):
        assert _healthy(m), f"{label} mesh not serving"
        m.run(_settle(m))
        tally.corruptions += m.run(_check_data(m, label))
    gc.collect()
    growth_mib = (psutil.Process().memory_info().rss - rss_before) / 2**20
    print(
        f"\nhostile suite: {tally.cases} cases over {len(RPCS)} RPCs, "
        f"{len(every_route(mesh))} HTTP routes and the WebSocket; "
        f"{len(tally.crashes)} crashes, {len(tally.corruptions)} corruptions; "
        f"honest batches {len(mesh.honest.sent)} + {len(tls_mesh.honest.sent)} (mTLS); "
        f"RSS growth {growth_mib:.0f} MiB (bound {MEMORY_BOUND_MIB})"
    )
    assert tally.crashes == []
    assert tally.corruptions == []
    assert growth_mib < MEMORY_BOUND_MIB
