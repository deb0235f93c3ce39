"""Encoded passthrough through a real edge: used when codecs match, left for the decode path in
reduced mode and when switched off, and back again."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from core_services.server import CoreServer
from edge_nodes.media.quality import CallMode
from tests.conftest import EdgeFactory, eventually
from tests.integration.test_media_call import (
    clinician_call,
    live_peer_connections,
    open_session,
    patient_call,
)

PORTS = {"media_udp_port_min": 41100, "media_udp_port_max": 41131}


async def test_video_and_audio_pass_through_and_fall_back_to_re_encoding_in_reduced_mode(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: Callable[[str], grpc.aio.Channel]
) -> None:
    edge = await edge_factory(**PORTS)
    # This test sets the modes itself: no quality pass may set them back meanwhile.
    quality = edge.media.calls._quality
    assert quality is not None
    quality.cancel()
    s = await open_session(core, channel_to)
    patient, clinician = patient_call(edge, s), clinician_call(edge, s)
    try:
        await patient.start()
        await clinician.start()
        await eventually(lambda: clinician.received.frames >= 20, 20, "clinician sees patient")
        await eventually(lambda: patient.received.frames >= 20, 20, "patient sees clinician")
        await eventually(lambda: clinician.audio_frames > 10, 10, "clinician hears patient")
        call = edge.media.calls.calls[s.session_id]
        (viewer,) = call.clinicians.values()
        fwd = viewer.outgoing["video"]
        assert fwd.passed_through >= 20 and fwd.out_codec == "VP8"
        assert viewer.outgoing["audio"].out_codec == "opus"
        # Vision still gets decoded pictures of the patient, sampled.
        await eventually(lambda: call.last_hint is not None, 20, "vision hint")
        # Reduced mode needs scaled pictures: decode and re-encode, at a quarter of the size.
        fwd.set_mode(CallMode.REDUCED)
        await eventually(
            lambda: clinician.received.width == 320 // 2, 20, "clinician gets reduced video"
        )
        # Full again: passthrough resumes from a keyframe at full size.
        before = fwd.passed_through
        fwd.set_mode(CallMode.FULL)
        await eventually(lambda: fwd.passed_through >= before + 10, 20, "passthrough resumes")
        await eventually(lambda: clinician.received.width == 320, 20, "full size again")
    finally:
        await patient.hangup()
        await clinician.hangup()
    await eventually(lambda: edge.media.calls.peer_count == 0, what="peers closed")
    assert live_peer_connections() == 0


async def test_with_passthrough_off_video_is_re_encoded(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: Callable[[str], grpc.aio.Channel]
) -> None:
    edge = await edge_factory(**PORTS, media_passthrough=False)
    s = await open_session(core, channel_to)
    patient, clinician = patient_call(edge, s), clinician_call(edge, s)
    try:
        await patient.start()
        await clinician.start()
        await eventually(lambda: clinician.received.frames >= 20, 20, "clinician sees patient")
        await eventually(lambda: patient.received.frames >= 20, 20, "patient sees clinician")
        call = edge.media.calls.calls[s.session_id]
        (viewer,) = call.clinicians.values()
        assert viewer.outgoing["video"].passed_through == 0
        assert viewer.outgoing["video"].forwarded >= 20
    finally:
        await patient.hangup()
        await clinician.hangup()
    await eventually(lambda: edge.media.calls.peer_count == 0, what="peers closed")
    assert live_peer_connections() == 0
