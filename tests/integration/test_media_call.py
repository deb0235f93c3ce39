"""Program -> edge -> program WebRTC calls over real loopback, through the edge's MediaService."""

from __future__ import annotations

import gc
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from aiortc import RTCPeerConnection
from aiortc.mediastreams import AudioStreamTrack

from clients.video import PUBLISHER, VIEWER, MediaCall, synthetic_track
from core_services.server import CoreServer
from edge_nodes.media.ports import candidate_ports
from edge_nodes.server import EdgeServer
from telehealth.v1 import media_pb2, sessions_pb2, sessions_pb2_grpc
from tests.conftest import EdgeFactory, eventually, staff

PORTS = {"media_udp_port_min": 41000, "media_udp_port_max": 41031}


@dataclass
class Session:
    session_id: str
    publisher_token: str
    viewer_token: str


async def open_session(
    core: CoreServer, channel_to: Callable[[str], grpc.aio.Channel], patient: str = "p-1"
) -> Session:
    stub = sessions_pb2_grpc.SessionsServiceStub(channel_to(core.address))
    opened = await stub.Open(sessions_pb2.OpenSessionRequest(patient_id=patient, zone="zone-a"))
    sid = opened.session.session_id
    viewer = await stub.Attach(
        sessions_pb2.AttachSessionRequest(session_id=sid, role=sessions_pb2.ROLE_VIEWER),
        metadata=await staff(core, "clinician", (patient,)),
    )
    return Session(sid, opened.assignment.token, viewer.assignment.token)


def live_peer_connections() -> int:
    """RTCPeerConnections anywhere in this process that are not closed (leak check)."""
    gc.collect()
    return sum(
        1
        for o in gc.get_objects()
        if isinstance(o, RTCPeerConnection) and o.connectionState != "closed"
    )


class LossyUplink:
    """A lossy network between a peer and the edge, on the edge's side of the wire: a share of
    the peer's RTP packets (audio and video) is dropped before the edge's SRTP sees them, as a
    congested radio link would. STUN, DTLS and RTCP pass, so the connection itself stays up and
    the edge learns of the loss only as a real receiver does, from sequence numbers."""

    def __init__(self, pc: RTCPeerConnection, seed: int = 1) -> None:
        self.loss = 0.0
        self.dropped = 0
        self._rng = random.Random(seed)
        seen: set[int] = set()
        for t in pc.getTransceivers():
            conn = t.receiver.transport.transport.iceGatherer._connection
            for proto in conn._protocols:
                if id(proto) not in seen:
                    seen.add(id(proto))
                    proto.datagram_received = self._wrap(proto.datagram_received)  # type: ignore[method-assign,assignment]

    def _wrap(self, deliver: Callable[[bytes, Any], None]) -> Callable[[bytes, Any], None]:
        def datagram_received(data: bytes, addr: Any) -> None:
            # RFC 7983: 128-191 first is RTP/RTCP; RFC 5761: payload type 192-223 is RTCP.
            rtp = len(data) > 1 and 128 <= data[0] <= 191 and not 192 <= data[1] <= 223
            if rtp and self.loss > 0 and self._rng.random() < self.loss:
                self.dropped += 1
                return
            deliver(data, addr)

        return datagram_received


@pytest.fixture
async def media_edge(edge_factory: EdgeFactory) -> AsyncIterator[EdgeServer]:
    edge = await edge_factory(**PORTS)
    yield edge
    # Whatever a test did, the edge ends with no peer connection of its own left open.
    await eventually(lambda: edge.media.calls.peer_count == 0, what="edge peers closed")


def patient_call(edge: EdgeServer, s: Session, **kw: object) -> MediaCall:
    return MediaCall(
        edge.address,
        s.session_id,
        s.publisher_token,
        PUBLISHER,
        video=synthetic_track(width=320, height=240, fps=15.0),
        audio=AudioStreamTrack(),
        **kw,  # type: ignore[arg-type]
    )


def clinician_call(edge: EdgeServer, s: Session) -> MediaCall:
    return MediaCall(
        edge.address,
        s.session_id,
        s.viewer_token,
        VIEWER,
        video=synthetic_track(pulse_bpm=60, width=320, height=240, fps=15.0),
        audio=AudioStreamTrack(),
    )


async def test_patient_and_clinician_receive_each_others_video_through_the_edge(
    core: CoreServer, media_edge: EdgeServer, channel_to: Callable[[str], grpc.aio.Channel]
) -> None:
    s = await open_session(core, channel_to)
    patient = patient_call(media_edge, s)
    clinician = clinician_call(media_edge, s)
    try:
        answer = await patient.start()
        assert answer.mode == media_pb2.CALL_MODE_FULL
        await clinician.start()
        # Every candidate the edge offers is inside the configured UDP range.
        for call in (patient, clinician):
            ports = candidate_ports(call.answer_sdp)
            assert ports and all(41000 <= p <= 41031 for p in ports), ports
        await eventually(lambda: clinician.received.frames >= 20, 20, "clinician sees patient")
        await eventually(lambda: patient.received.frames >= 20, 20, "patient sees clinician")
        await eventually(
            lambda: clinician.audio_frames > 10 and patient.audio_frames > 10, 10, "audio both ways"
        )
        assert (clinician.received.width, clinician.received.height) == (320, 240)
        calls = media_edge.media.calls
        assert calls.peer_count == 2
        consultation = calls.calls[s.session_id]
        state = consultation.state()
        assert state.patient_connected and state.clinicians_connected == 1
        metrics = media_edge.media.metrics
        assert metrics.frames_relayed._value.get() >= 40
    finally:
        await patient.hangup()
        await clinician.hangup()
    await eventually(lambda: media_edge.media.calls.peer_count == 0, what="peers closed")
    assert s.session_id not in media_edge.media.calls.calls
    assert live_peer_connections() == 0


async def test_two_clinicians_both_see_the_patient_and_the_second_takes_over(
    core: CoreServer, media_edge: EdgeServer, channel_to: Callable[[str], grpc.aio.Channel]
) -> None:
    s = await open_session(core, channel_to)
    patient = patient_call(media_edge, s)
    first, second = clinician_call(media_edge, s), clinician_call(media_edge, s)
    try:
        await patient.start()
        await first.start()
        await second.start()
        await eventually(
            lambda: first.received.frames >= 10 and second.received.frames >= 10, 20, "both see"
        )
        await eventually(lambda: patient.received.frames >= 10, 20, "patient sees first")
        await first.hangup()
        before = patient.received.frames
        # The patient now sees the second clinician, without renegotiating.
        await eventually(lambda: patient.received.frames >= before + 10, 20, "second takes over")
    finally:
        for c in (patient, first, second):
            await c.hangup()
    assert live_peer_connections() == 0


async def test_watch_call_reports_state_and_vision_hints(
    core: CoreServer, media_edge: EdgeServer, channel_to: Callable[[str], grpc.aio.Channel]
) -> None:
    from telehealth.rpc import bearer
    from telehealth.v1 import media_pb2_grpc

    s = await open_session(core, channel_to)
    patient = patient_call(media_edge, s)
    clinician = clinician_call(media_edge, s)
    try:
        await patient.start()
        await clinician.start()
        stub = media_pb2_grpc.MediaServiceStub(channel_to(media_edge.address))
        stream = stub.WatchCall(
            media_pb2.WatchCallRequest(session_id=s.session_id), metadata=bearer(s.viewer_token)
        )
        seen_state = seen_hint = False
        async for ev in stream:
            if ev.HasField("state"):
                seen_state = True
                assert ev.state.session_id == s.session_id
            if ev.HasField("hint"):
                seen_hint = True
                assert ev.hint.face_in_view and ev.hint.kind == media_pb2.VISION_HINT_KIND_GOOD
            if seen_state and seen_hint:
                break
        stream.cancel()
        assert media_edge.media.metrics.vision_latency._sum.get() > 0
    finally:
        await patient.hangup()
        await clinician.hangup()


async def test_a_patient_joining_after_the_clinician_sees_them(
    core: CoreServer, media_edge: EdgeServer, channel_to: Callable[[str], grpc.aio.Channel]
) -> None:
    # The order after a move, when the clinician's console may be back at the new edge first.
    s = await open_session(core, channel_to)
    patient, clinician = patient_call(media_edge, s), clinician_call(media_edge, s)
    try:
        await clinician.start()
        await patient.start()
        await eventually(lambda: patient.received.frames >= 10, 20, "patient sees clinician")
        await eventually(lambda: clinician.received.frames >= 10, 20, "clinician sees patient")
    finally:
        await patient.hangup()
        await clinician.hangup()
    assert live_peer_connections() == 0
