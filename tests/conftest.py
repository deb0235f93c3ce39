"""Shared fixtures: a real core and real edges on loopback ports chosen at run time."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from core_services.server import CoreServer
from core_services.store import SqlStore
from edge_nodes.server import EdgeServer
from telehealth.config import CoreSettings, EdgeSettings
from telehealth.rpc import bearer, channel_options
from telehealth.security.pki import init_pki, load_authority, write_certificate
from telehealth.security.tls import TlsFiles

EdgeFactory = Callable[..., Awaitable[EdgeServer]]
Metadata = tuple[tuple[str, str], ...]


async def eventually(
    predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition"
) -> Any:
    """Poll until predicate() is truthy (no fixed sleeps); fail with `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def core_settings(tmp_path: Path, **kw: Any) -> CoreSettings:
    values: dict[str, Any] = {
        "grpc_listen": "127.0.0.1:0",
        "http_listen": "127.0.0.1:0",
        "data_dir": tmp_path / "core",
        "log_format": "text",
        "zone_latency_ms": {"zone-a": {"zone-b": 5, "zone-c": 12}, "zone-b": {"zone-c": 6}},
        # The floor, not OWASP's cost: tests add many users; production keeps the default.
        "password_scrypt_n": 1024,
        "password_scrypt_p": 1,
    }
    values.update(kw)
    return CoreSettings.model_validate(values)


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[CoreServer]:
    server = CoreServer(core_settings(tmp_path))
    await server.start()
    yield server
    await server.stop(grace=0)


@pytest.fixture
async def edge_factory(core: CoreServer, tmp_path: Path) -> AsyncIterator[EdgeFactory]:
    started: list[EdgeServer] = []

    async def make(edge_id: str = "edge-a", zone: str = "zone-a", **kw: Any) -> EdgeServer:
        values: dict[str, Any] = {
            "edge_id": edge_id,
            "zone": zone,
            "grpc_listen": "127.0.0.1:0",
            "http_listen": "127.0.0.1:0",
            "core_address": core.address,
            "heartbeat_interval_s": 0.1,
            "log_format": "text",
            # Each edge its own journal: the default (./var) would be shared by every test run.
            "data_dir": tmp_path / edge_id,
        }
        values.update(kw)
        edge = EdgeServer(EdgeSettings.model_validate(values))
        await edge.start()
        started.append(edge)
        await eventually(lambda: edge_id in core.edges.edges, what=f"{edge_id} registered")
        return edge

    yield make
    for e in started:
        await e.stop(grace=0)


async def staff(core: CoreServer, role: str, patients: tuple[str, ...] = ()) -> Metadata:
    """A clinician (assigned to `patients`) or operator: the bearer metadata of a login."""
    user_id = f"{role}-{uuid.uuid4().hex[:8]}"
    await core.security.users.add_user(user_id, role, "correct horse battery staple")
    for p in patients:
        await core.security.users.assign(user_id, p)
    token, _ = core.issuer.issue_user(user_id=user_id, role=role, ttl_s=600)
    return bearer(token)


@pytest.fixture
async def channel_to() -> AsyncIterator[Callable[[str], grpc.aio.Channel]]:
    channels: list[grpc.aio.Channel] = []

    def open_channel(address: str) -> grpc.aio.Channel:
        ch = grpc.aio.insecure_channel(address, options=channel_options())
        channels.append(ch)
        return ch

    yield open_channel
    for ch in channels:
        await ch.close()


def tls_kw(f: TlsFiles) -> dict[str, str]:
    """A process's TLS files as the tls_*_file settings of CoreSettings / EdgeSettings."""
    return {"tls_cert_file": str(f.cert), "tls_key_file": str(f.key), "tls_ca_file": str(f.ca)}


# The name edge-a's certificate gives it: DNS only, no IP (as with Kubernetes pod IPs).
EDGE_TLS_NAME = "edge-a.zone-a.telehealth.test"


@pytest.fixture
def named_edge_pki(tmp_path: Path) -> dict[str, TlsFiles]:
    """A CA with core, device and clinician certificates, and edge-a's naming it by
    EDGE_TLS_NAME only: dialling the edge's IP works only with that name."""
    out = init_pki(tmp_path / "pki", services=["core"], clients=["device", "clinician"])
    ca = load_authority(tmp_path / "pki")
    assert ca is not None
    out["edge-a"] = write_certificate(tmp_path / "pki", ca, "edge-a", [EDGE_TLS_NAME])
    return out


@pytest.fixture
def tls_edge_settings() -> dict[str, Any]:
    """More settings for the edge of `tls_mesh`; a test module overrides this fixture (media
    tests give each module its own UDP port range)."""
    return {}


@pytest.fixture
async def tls_mesh(
    tmp_path: Path, named_edge_pki: dict[str, TlsFiles], tls_edge_settings: dict[str, Any]
) -> AsyncIterator[tuple[CoreServer, EdgeServer]]:
    """A core and edge-a with mTLS on, the edge announcing EDGE_TLS_NAME, registered."""
    core = CoreServer(core_settings(tmp_path, **tls_kw(named_edge_pki["core"])))
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
                **tls_edge_settings,
                "tls_server_name": EDGE_TLS_NAME,
                **tls_kw(named_edge_pki["edge-a"]),
            }
        )
    )
    await edge.start()
    await eventually(lambda: "edge-a" in core.edges.edges, 10, "edge registered")
    yield core, edge
    await edge.stop(grace=0)
    await core.stop(grace=0)


PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def sql_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlStore]:
    """The core's store on real SQLite and on the real PostgreSQL, in a schema of its own
    so runs side by side never see each other's rows."""
    if request.param == "sqlite":
        s = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'core.db'}")
        await s.start()
        yield s
        await s.close()
        return
    schema = "t_" + uuid.uuid4().hex[:12]
    admin = create_async_engine(PG_URL)
    async with admin.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    s = SqlStore(PG_URL, connect_args={"server_settings": {"search_path": schema}})
    try:
        await s.start()
        yield s
    finally:
        await s.close()
        async with admin.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await admin.dispose()
