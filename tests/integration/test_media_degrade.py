"""Graceful degradation end to end, over a real lossy link (no forced modes).

The patient's uplink drops a share of its RTP packets at the edge; the edge measures the loss
as any receiver does (sequence numbers, audio and video), steps the call down to reduced video
and then audio only, asks the patient's device to send less (which the device agent's video
honours), and climbs back up only on evidence (clean audio, then clean video). And a busy edge
lowers a low-priority call by having its patient send less, while the edge keeps passing the
video through rather than re-encoding it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import grpc

from clients.video import AdaptiveVideoTrack, MediaCall
from core_services.server import CoreServer
from edge_nodes.server import EdgeServer
from telehealth.rpc import bearer
from telehealth.v1 import media_pb2, media_pb2_grpc, vitals_pb2
from tests.conftest import EdgeFactory, eventually
from tests.integration.test_media_audit import publish
from tests.integration.test_media_call import (
    LossyUplink,
    Session,
    clinician_call,
    live_peer_connections,
    open_session,
    patient_call,
)
from tests.integration.test_vitals_path import make_batch

ChannelTo = Callable[[str], grpc.aio.Channel]
FULL, REDUCED, AUDIO_ONLY = (
    media_pb2.CALL_MODE_FULL,
    media_pb2.CALL_MODE_REDUCED,
    media_pb2.CALL_MODE_AUDIO_ONLY,
)


def high_risk(session_id: str, seq: int) -> vitals_pb2.VitalsBatch:
    """Readings scoring NEWS2 high: pulse 135, breathing 26, SpO2 90, systolic 88, 39.2 C."""
    b = make_batch(session_id, seq, hr=135.0)
    v = b.vitals[0]
    v.respiration_rate_bpm, v.spo2_percent, v.systolic_mmhg, v.temperature_c = 26, 90, 88, 39.2
    return b


async def follow_states(
    stub: media_pb2_grpc.MediaServiceAsyncStub, sid: str, token: str
) -> AsyncIterator[media_pb2.CallState]:
    async for ev in stub.WatchCall(
        media_pb2.WatchCallRequest(session_id=sid), metadata=bearer(token)
    ):
        if ev.HasField("state"):
            yield ev.state


@asynccontextmanager
async def two_consultations(
    core: CoreServer, edge: EdgeServer, channel_to: ChannelTo, patients: tuple[str, str]
) -> AsyncIterator[tuple[Session, Session, list[MediaCall]]]:
    """An older and a newer consultation on the edge, each with its patient and a clinician
    connected (calls: patient, clinician of the first, then of the second). Everyone hangs
    up at the end, and the edge's peer connections close."""
    first = await open_session(core, channel_to, patients[0])
    second = await open_session(core, channel_to, patients[1])
    calls = [patient_call(edge, first), clinician_call(edge, first)]
    calls += [patient_call(edge, second), clinician_call(edge, second)]
    try:
        for c in calls:
            await c.start()
        yield first, second, calls
    finally:
        for c in calls:
            await c.hangup()
    await eventually(lambda: edge.media.calls.peer_count == 0, 10, "peers closed")


async def test_a_lossy_uplink_steps_down_to_audio_only_and_back_up_on_evidence(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: Callable[[str], grpc.aio.Channel]
) -> None:
    edge = await edge_factory(media_udp_port_min=41600, media_udp_port_max=41631)
    s = await open_session(core, channel_to, "p-lossy")
    patient, clinician = patient_call(edge, s), clinician_call(edge, s)
    states: list[media_pb2.CallState] = []
    stub = media_pb2_grpc.MediaServiceStub(channel_to(edge.address))

    async def record() -> None:
        async for st in follow_states(stub, s.session_id, s.viewer_token):
            states.append(st)

    watch: asyncio.Task[None] | None = None
    try:
        await patient.start()
        await clinician.start()
        await eventually(lambda: clinician.received.frames > 10, 20, "clinician sees patient")
        call = edge.media.calls.calls[s.session_id]
        assert call.patient is not None
        (viewer,) = call.clinicians.values()
        fwd = viewer.outgoing["video"]
        link = LossyUplink(call.patient.pc)
        watch = asyncio.create_task(record())
        await eventually(lambda: states and states[-1].mode == FULL, 10, "full video")
        sent = patient.video
        assert isinstance(sent, AdaptiveVideoTrack)

        # 10 % of the patient's packets lost: reduced video. The patient is asked to send half
        # size, does, and the edge forwards that as it comes (still no re-encoding).
        link.loss = 0.10
        await eventually(lambda: states[-1].mode == REDUCED, 30, "reduced on a lossy link")
        assert states[-1].send_mode == REDUCED and "lost" in states[-1].reason
        await eventually(lambda: sent.mode == REDUCED, 10, "patient sends reduced")
        await eventually(lambda: clinician.received.width == 160, 20, "clinician gets half size")
        through = fwd.passed_through
        await eventually(lambda: fwd.passed_through > through + 5, 20, "still passed through")

        # 35 %: audio only; the patient stops sending video, the clinician's video stops.
        link.loss = 0.35
        await eventually(lambda: states[-1].mode == AUDIO_ONLY, 30, "audio only")
        await eventually(lambda: sent.mode == AUDIO_ONLY, 10, "patient stops sending video")
        frames, audio = clinician.received.frames, clinician.audio_frames
        await eventually(lambda: clinician.audio_frames > audio + 50, 20, "audio goes on")
        assert clinician.received.frames <= frames + 3  # at most what was in flight

        # The link heals. With no video flowing, only the clean audio is evidence; the call
        # climbs one step at a time, and the patient's video comes back at full size.
        link.loss = 0.0
        climbed = len(states)
        await eventually(lambda: states[-1].mode == FULL, 40, "full video again")
        path = [st.mode for st in states[climbed:]]
        assert REDUCED in path and path.index(REDUCED) < path.index(FULL), path
        await eventually(lambda: clinician.received.width == 320, 20, "full size again")
        assert link.dropped > 50
    finally:
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        await patient.hangup()
        await clinician.hangup()
    await eventually(lambda: edge.media.calls.peer_count == 0, 10, "peers closed")
    assert live_peer_connections() == 0


async def test_a_busy_edge_has_the_low_risk_patient_send_less_and_keeps_passing_through(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: Callable[[str], grpc.aio.Channel]
) -> None:
    # Room for one 320x240@15 call at full quality and a little more: not for two.
    edge: EdgeServer = await edge_factory(
        media_udp_port_min=41640, media_udp_port_max=41671, media_pixel_budget=320 * 240 * 20
    )
    consultations = two_consultations(core, edge, channel_to, ("p-first", "p-second"))
    async with consultations as (first, second, calls):
        older, newer = (edge.media.calls.calls[x.session_id] for x in (first, second))
        # The older call keeps full quality; the newer one's patient is asked to send less.
        await eventually(lambda: newer.send_mode.name == "REDUCED", 20, "newer call reduced")
        assert older.send_mode.name == "FULL"
        watcher = calls[3]
        sent = calls[2].video
        assert isinstance(sent, AdaptiveVideoTrack)
        await eventually(lambda: sent.mode == REDUCED, 10, "second patient sends reduced")
        await eventually(lambda: watcher.received.width == 160, 20, "its clinician: half size")
        (viewer,) = newer.clinicians.values()
        fwd = viewer.outgoing["video"]
        # Passed through as it came: the edge did not decode and re-encode to save effort.
        through = fwd.passed_through
        await eventually(lambda: fwd.passed_through > through + 10, 20, "passed through")
        assert calls[1].received.width == 320

        # The newer patient's vitals turn high-risk (NEWS2 7+): their video comes first now.
        await publish(edge, channel_to, second.session_id, second.publisher_token, high_risk)
        await eventually(lambda: newer.news2_band == 4, 10, "edge scored the newer patient high")
        await eventually(lambda: older.send_mode.name == "REDUCED", 20, "older call reduced")
        await eventually(lambda: newer.send_mode.name == "FULL", 20, "high-risk call full")
        await eventually(lambda: watcher.received.width == 320, 20, "its clinician: full size")
        state = newer.state()
        assert state.priority_band == 4 and state.send_mode == FULL
        assert "by clinical priority" in older.state().reason
    assert live_peer_connections() == 0


async def test_measured_cpu_pressure_has_the_newer_patient_send_less(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    # Any CPU at all is "too much" here, so the edge's own measured load is what degrades.
    edge: EdgeServer = await edge_factory(
        media_udp_port_min=41680, media_udp_port_max=41711, media_cpu_limit=0.001
    )
    consultations = two_consultations(core, edge, channel_to, ("p-cpu-first", "p-cpu-second"))
    async with consultations as (first, second, _):
        older, newer = (edge.media.calls.calls[x.session_id] for x in (first, second))
        await eventually(lambda: newer.send_mode.name == "REDUCED", 30, "newer call reduced")
        assert older.send_mode.name == "FULL"
        assert edge.media.calls.cpu_cores > 0.001
        assert "edge is busy" in newer.state().reason
        (viewer,) = newer.clinicians.values()
        through = viewer.outgoing["video"].passed_through
        await eventually(
            lambda: viewer.outgoing["video"].passed_through > through + 10, 20, "passed through"
        )
