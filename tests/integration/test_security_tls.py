"""mTLS: plaintext clients and certificates from another CA are refused; renewed certificates
are picked up without a restart; edges heartbeat to the core over mTLS."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.ctl import main as ctl
from core_services.server import CoreServer
from edge_nodes.server import EdgeServer
from telehealth.config import EdgeSettings
from telehealth.rpc import secure_channel
from telehealth.security.pki import init_pki, load_authority, write_certificate
from telehealth.security.tls import TlsFiles
from tests.conftest import core_settings, eventually, tls_kw


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, TlsFiles]:
    return init_pki(tmp_path / "pki", services=["core", "edge-a"])


@pytest.fixture
async def tls_core(tmp_path: Path, pki: dict[str, TlsFiles]) -> AsyncIterator[CoreServer]:
    server = CoreServer(core_settings(tmp_path, **tls_kw(pki["core"])))
    await server.start()
    yield server
    await server.stop(grace=0)


async def check(address: str, tls: TlsFiles | None) -> grpc.StatusCode:
    async with secure_channel(address, tls) as ch:
        try:
            r = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=3
            )
        except grpc.aio.AioRpcError as e:
            return e.code()
        assert r.status == health_pb2.HealthCheckResponse.SERVING
        return grpc.StatusCode.OK


async def test_plaintext_client_is_refused(tls_core: CoreServer, pki: dict[str, TlsFiles]) -> None:
    assert await check(tls_core.address, None) == grpc.StatusCode.UNAVAILABLE
    assert await check(tls_core.address, pki["device"]) == grpc.StatusCode.OK


async def test_certificate_from_another_ca_is_refused(
    tls_core: CoreServer, pki: dict[str, TlsFiles], tmp_path: Path
) -> None:
    other = init_pki(tmp_path / "other", services=[], clients=["device"])["device"]
    # Trusts the right CA, but presents a certificate the core's CA never signed.
    forged = TlsFiles(other.cert, other.key, pki["device"].ca)
    assert await check(tls_core.address, forged) == grpc.StatusCode.UNAVAILABLE


async def test_renewed_certificate_is_used_without_restart(
    tls_core: CoreServer, pki: dict[str, TlsFiles], tmp_path: Path
) -> None:
    assert tls_core.grpc.tls is not None
    before = pki["core"].cert.read_bytes()
    ca = load_authority(tmp_path / "pki")
    assert ca is not None
    write_certificate(tmp_path / "pki", ca, "core", ["127.0.0.1", "localhost"])
    st = pki["core"].cert.stat()
    os.utime(pki["core"].cert, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert pki["core"].cert.read_bytes() != before
    # A new connection triggers the certificate fetch and completes with the new pair.
    assert await check(tls_core.address, pki["operator"]) == grpc.StatusCode.OK
    await eventually(lambda: tls_core.grpc.tls.reloads >= 1, what="reload")  # type: ignore[union-attr]


async def test_edge_heartbeats_over_mtls(
    tls_core: CoreServer, pki: dict[str, TlsFiles], tmp_path: Path
) -> None:
    settings = EdgeSettings.model_validate(
        {
            "edge_id": "edge-a",
            "grpc_listen": "127.0.0.1:0",
            "http_listen": "127.0.0.1:0",
            "core_address": tls_core.address,
            "heartbeat_interval_s": 0.1,
            "data_dir": tmp_path / "edge-a",
            **tls_kw(pki["edge-a"]),
        }
    )
    edge = EdgeServer(settings)
    await edge.start()
    try:
        await eventually(lambda: "edge-a" in tls_core.edges.edges, what="edge registered")
        assert await check(edge.address, pki["device"]) == grpc.StatusCode.OK
        assert await check(edge.address, None) == grpc.StatusCode.UNAVAILABLE
    finally:
        await edge.stop(grace=0)


def served_serial(port: int, client: TlsFiles | None, ca: Path, alpn: str) -> int:
    """The serial of the certificate a server presents to a new TLS connection."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols([alpn])
    if client is not None:
        ctx.load_cert_chain(client.cert, client.key)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def file_serial(f: TlsFiles) -> int:
    return int(x509.load_pem_x509_certificate(f.cert.read_bytes()).serial_number)


async def test_pki_renew_is_served_on_new_connections_without_restart(
    tmp_path: Path, pki: dict[str, TlsFiles]
) -> None:
    core_files = pki["core"]
    server = CoreServer(
        core_settings(
            tmp_path,
            **tls_kw(core_files),
            http_tls_cert_file=str(core_files.cert),
            http_tls_key_file=str(core_files.key),
        )
    )
    await server.start()
    try:
        assert server.http.url.startswith("https://")
        ca = core_files.ca
        device = pki["device"]

        async def grpc_serial() -> int:
            return await asyncio.to_thread(served_serial, server.grpc.port, device, ca, "h2")

        async def https_serial() -> int:
            return await asyncio.to_thread(served_serial, server.http.port, None, ca, "http/1.1")

        before = file_serial(core_files)
        assert await grpc_serial() == before == await https_serial()
        out = io.StringIO()
        code = await asyncio.to_thread(
            ctl, ["pki", "renew", "--dir", str(tmp_path / "pki"), "--names", "core"], out
        )
        assert code == 0, out.getvalue()
        after = file_serial(core_files)
        assert after != before and f"{before:x} -> {after:x}" in out.getvalue()
        assert await grpc_serial() == after

        # HTTPS looks at its files every second: poll until the renewal is served.
        async def https_renewed() -> bool:
            return await https_serial() == after

        await eventually(https_renewed, what="HTTPS serves the renewed certificate")
        assert await check(server.address, device) == grpc.StatusCode.OK
        http_ssl = ssl.create_default_context(cafile=str(ca))
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"https://localhost:{server.http.port}/healthz", ssl=http_ssl) as r,
        ):
            assert r.status == 200
    finally:
        await server.stop(grace=0)


async def test_pki_renew_refuses_without_a_ca(tmp_path: Path) -> None:
    out = io.StringIO()
    code = await asyncio.to_thread(ctl, ["pki", "renew", "--dir", str(tmp_path / "none")], out)
    assert code == 1 and "no CA" in out.getvalue()
