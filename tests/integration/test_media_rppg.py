"""The video pulse (rPPG at the edge) reaches clinicians on the vitals stream, through a real call.

Patient's synthetic face pulsing at a known rate -> VP8 over WebRTC -> the edge decodes, vision
samples it -> DerivedHeartRate.rppg_heart_rate_bpm on VitalsService.Subscribe.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
from aiortc.mediastreams import AudioStreamTrack

from clients.video import PUBLISHER, MediaCall, synthetic_track
from core_services.server import CoreServer
from telehealth.rpc import bearer
from telehealth.v1 import vitals_pb2, vitals_pb2_grpc
from tests.conftest import EdgeFactory, eventually
from tests.integration.test_media_call import live_peer_connections, open_session

TRUE_BPM = 84.0


async def test_rppg_pulse_of_the_patients_video_reaches_the_vitals_subscriber(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: Callable[[str], grpc.aio.Channel]
) -> None:
    edge = await edge_factory(media_udp_port_min=41400, media_udp_port_max=41431)
    s = await open_session(core, channel_to, "p-rppg")
    vitals = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    patient = MediaCall(
        edge.address,
        s.session_id,
        s.publisher_token,
        PUBLISHER,
        video=synthetic_track(pulse_bpm=TRUE_BPM, width=320, height=240, fps=15.0),
        audio=AudioStreamTrack(),
    )
    try:
        await patient.start()
        # The session's channel exists once the call does; subscribe as the clinician would.
        sub = vitals.Subscribe(
            vitals_pb2.SubscribeVitalsRequest(session_id=s.session_id),
            metadata=bearer(s.viewer_token),
        )
        pulses: list[float] = []

        async def two_pulses() -> None:
            async for ev in sub:
                bpm = ev.derived_heart_rate.rppg_heart_rate_bpm
                if ev.HasField("derived_heart_rate") and bpm:
                    pulses.append(bpm)
                    if len(pulses) >= 2:
                        return

        # Vision needs 6 s of face before its first estimate, then one a second.
        await asyncio.wait_for(two_pulses(), 45)
        sub.cancel()
        assert all(abs(p - TRUE_BPM) <= 5.0 for p in pulses), pulses
        call = edge.media.calls.calls[s.session_id]
        assert call.last_hint is not None and call.last_hint.face_in_view
    finally:
        await patient.hangup()
    await eventually(lambda: edge.media.calls.peer_count == 0, what="peers closed")
    assert live_peer_connections() == 0
