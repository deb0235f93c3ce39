"""TURN and NAT: short-lived coturn credentials from the edge, a call relayed through a real
coturn (Debian's package), the edge gathering relayed candidates of its own, and host candidates
advertised with the 1:1 NAT address while the ports stay in the configured range."""

from __future__ import annotations

import asyncio
import base64
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from aiortc.mediastreams import AudioStreamTrack

from clients.mesh import free_port
from clients.video import PUBLISHER, MediaCall, synthetic_track
from core_services.server import CoreServer
from edge_nodes.media.ports import candidate_ports
from edge_nodes.media.turn import advertise_host_candidates, ice_servers, turn_credential
from telehealth.config import EdgeSettings
from telehealth.rpc import bearer
from telehealth.v1 import media_pb2, media_pb2_grpc
from tests.conftest import EdgeFactory, eventually
from tests.integration.test_media_call import (
    clinician_call,
    live_peer_connections,
    open_session,
    patient_call,
)

ChannelTo = Callable[[str], grpc.aio.Channel]
TURNSERVER = shutil.which("turnserver")
SECRET = "correct-horse-turn-secret"


def candidates(sdp: str) -> list[list[str]]:
    return [line.split() for line in sdp.splitlines() if line.startswith("a=candidate:")]


def test_credentials_follow_coturns_rest_scheme() -> None:
    servers, expiry = ice_servers(
        ["stun:stun.example.org:3478", "turn:turn.example.org:3478?transport=udp", "turns:t:5349"],
        "s3cret",
        "ses_1",
        ttl_s=600,
        now=1_700_000_000,
    )
    stun, turn = servers
    assert stun.urls == ("stun:stun.example.org:3478",) and not stun.username
    assert turn.urls == ("turn:turn.example.org:3478?transport=udp", "turns:t:5349")
    assert expiry == 1_700_000_600 and turn.username == "1700000600:ses_1"
    assert len(base64.b64decode(turn.credential)) == 20  # an HMAC-SHA1
    assert turn.credential == turn_credential("s3cret", "1700000600:ses_1")
    assert turn.credential != turn_credential("other", "1700000600:ses_1")
    assert ice_servers([], "", "ses_1", 600) == ([], 0)


def test_turn_settings_are_checked_at_start() -> None:
    for bad, words in (
        ({"turn_urls": ["http://turn.example.org"]}, "must start with"),
        ({"turn_urls": ["turn:turn.example.org:3478"]}, "turn_secret"),
        ({"media_advertise_address": "edge.example.org"}, "IPv4"),
    ):
        with pytest.raises(ValueError, match=words):
            EdgeSettings.model_validate(bad)


def test_only_ipv4_host_candidates_take_the_advertised_address() -> None:
    sdp = "\r\n".join(
        [
            "c=IN IP4 10.1.2.3",
            "a=candidate:1 1 udp 2130706431 10.1.2.3 40001 typ host",
            "a=candidate:2 1 udp 1694498815 198.51.100.9 40001 typ srflx raddr 10.1.2.3 rport 40001",
            "a=candidate:3 1 udp 16777215 192.0.2.50 49152 typ relay raddr 0.0.0.0 rport 0",
            "a=candidate:4 1 udp 2130706431 abcd.local 40002 typ host",
        ]
    )
    out = advertise_host_candidates(sdp, "203.0.113.7").split("\r\n")
    assert out[0] == "c=IN IP4 203.0.113.7"
    assert out[1] == "a=candidate:1 1 udp 2130706431 203.0.113.7 40001 typ host"
    assert out[2:] == sdp.split("\r\n")[2:]


async def test_host_candidates_carry_the_advertised_address_and_ports_stay_in_range(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    edge = await edge_factory(
        media_udp_port_min=42000, media_udp_port_max=42031, media_advertise_address="198.51.100.20"
    )
    s = await open_session(core, channel_to, "p-nat")
    patient, clinician = patient_call(edge, s), clinician_call(edge, s)
    try:
        await patient.start()
        await clinician.start()
        for call in (patient, clinician):
            cands = candidates(call.answer_sdp)
            # IPv4 hosts (the NAT is IPv4; IPv6 addresses are global already and kept).
            hosts = [c for c in cands if c[7] == "host" and ":" not in c[4]]
            assert hosts and all(c[4] == "198.51.100.20" for c in hosts), cands
            ports = candidate_ports(call.answer_sdp)
            assert ports and all(42000 <= p <= 42031 for p in ports), ports
        # The call still connects: 198.51.100.20 (a documentation address) does not route on
        # a test machine, so here it is the edge's own checks that peers answer (peer-
        # reflexive candidates), as through a real 1:1 NAT they may too.
        await eventually(lambda: clinician.received.frames > 10, 20, "clinician sees patient")
    finally:
        await patient.hangup()
        await clinician.hangup()
    await eventually(lambda: edge.media.calls.peer_count == 0, 10, "peers closed")


@pytest.fixture
async def coturn(tmp_path: Path) -> AsyncIterator[str]:
    """Debian's coturn on loopback with the REST-API shared secret; yields its turn: url."""
    if TURNSERVER is None:
        pytest.skip("needs Debian's coturn: `make system-packages`")
    port = free_port()
    log = tmp_path / "turn.log"
    proc = await asyncio.create_subprocess_exec(
        TURNSERVER, "-n", "--listening-ip=127.0.0.1", f"--listening-port={port}",
        "--use-auth-secret", f"--static-auth-secret={SECRET}", "--realm=telehealth",
        "--no-tls", "--no-dtls", "--no-cli", "--min-port=49400", "--max-port=49499",
        "--allow-loopback-peers", f"--log-file={log}", "--simple-log",
        f"--pidfile={tmp_path / 'turn.pid'}", f"--userdb={tmp_path / 'turndb'}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await eventually(
            lambda: log.exists() and "Total General servers" in log.read_text(), 15, "coturn up"
        )
        yield f"turn:127.0.0.1:{port}?transport=udp"
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


async def test_a_relay_only_patient_calls_through_coturn_with_the_edges_credentials(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo, coturn: str
) -> None:
    edge = await edge_factory(
        media_udp_port_min=42040,
        media_udp_port_max=42071,
        turn_urls=[coturn],
        turn_secret=SECRET,
        turn_credential_ttl_s=120,
    )
    s = await open_session(core, channel_to, "p-turn")
    stub = media_pb2_grpc.MediaServiceStub(channel_to(edge.address))
    got = await stub.GetIceServers(
        media_pb2.GetIceServersRequest(session_id=s.session_id), metadata=bearer(s.publisher_token)
    )
    (server,) = got.ice_servers
    assert list(server.urls) == [coturn] and server.username.endswith(":" + s.session_id)
    assert 0 < got.expires_unix_ns / 1e9 - time.time() <= 120
    # A patient whose network lets nothing out but the relay: all its candidates are relayed.
    patient = MediaCall(
        edge.address,
        s.session_id,
        s.publisher_token,
        PUBLISHER,
        video=synthetic_track(width=320, height=240, fps=15.0),
        audio=AudioStreamTrack(),
        relay_only=True,
    )
    clinician = clinician_call(edge, s)
    try:
        await patient.start()
        offered = candidates(patient.pc.localDescription.sdp)
        assert offered and all(c[7] == "relay" for c in offered), offered
        # The edge gathered a relayed candidate of its own (ports.py keeps aioice's TURN path).
        assert any(c[7] == "relay" for c in candidates(patient.answer_sdp))
        await clinician.start()
        await eventually(lambda: clinician.received.frames > 10, 30, "video through the relay")
        await eventually(lambda: patient.received.frames > 10, 30, "and back through it")
    finally:
        await patient.hangup()
        await clinician.hangup()
    await eventually(lambda: edge.media.calls.peer_count == 0, 10, "peers closed")
    assert live_peer_connections() == 0


async def test_credentials_made_with_another_secret_get_no_relay(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo, coturn: str
) -> None:
    # coturn really checks the HMAC: an edge with the wrong secret hands out useless ones.
    edge = await edge_factory(
        media_udp_port_min=42080, media_udp_port_max=42111, turn_urls=[coturn], turn_secret="x"
    )
    s = await open_session(core, channel_to, "p-turn-bad")
    patient = patient_call(edge, s, relay_only=True)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await patient.start()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no ICE candidates" in (err.value.details() or "")
    finally:
        await patient.close()
    assert edge.media.calls.peer_count == 0
