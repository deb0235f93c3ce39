"""A patient whose device stops sending (its process frozen): the edge notices from the media
itself within a few seconds, long before ICE gives up, and tells the clinician."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from collections.abc import Callable

import grpc

from clients.video import VIEWER, MediaCall
from core_services.server import CoreServer
from telehealth.rpc import bearer
from telehealth.v1 import media_pb2, media_pb2_grpc
from tests.conftest import EdgeFactory, eventually
from tests.integration.test_media_call import live_peer_connections, open_session

PUBLISHER = textwrap.dedent(
    """
    import asyncio, sys
    from aiortc.mediastreams import AudioStreamTrack
    from clients.video import PUBLISHER, MediaCall, synthetic_track

    async def main() -> None:
        edge, sid, token = sys.argv[1:4]
        call = MediaCall(edge, sid, token, PUBLISHER,
                         video=synthetic_track(width=160, height=120, fps=15.0),
                         audio=AudioStreamTrack())
        await call.start()
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


async def test_a_frozen_patient_device_is_reported_gone_within_seconds_and_back_after(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: Callable[[str], grpc.aio.Channel]
) -> None:
    edge = await edge_factory(
        media_udp_port_min=41500, media_udp_port_max=41531, media_silence_s=2.0
    )
    s = await open_session(core, channel_to, "p-vanish")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PUBLISHER,
        edge.address,
        s.session_id,
        s.publisher_token,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    clinician = MediaCall(edge.address, s.session_id, s.viewer_token, VIEWER)
    states: list[media_pb2.CallState] = []
    stub = media_pb2_grpc.MediaServiceStub(channel_to(edge.address))
    watch: asyncio.Task[None] | None = None
    try:
        await eventually(
            lambda: (c := edge.media.calls.calls.get(s.session_id)) and c.patient_video,
            30,
            "the patient's video at the edge",
        )
        await clinician.start()
        await eventually(lambda: clinician.received.frames > 10, 20, "clinician sees the patient")

        async def follow() -> None:
            stream = stub.WatchCall(
                media_pb2.WatchCallRequest(session_id=s.session_id),
                metadata=bearer(s.viewer_token),
            )
            async for ev in stream:
                if ev.HasField("state"):
                    states.append(ev.state)

        watch = asyncio.create_task(follow())
        await eventually(lambda: states and states[-1].patient_connected, 10, "patient shown")
        # The device freezes: no RTP, no RTCP, no ICE consent answers, no hang-up.
        os.kill(proc.pid, signal.SIGSTOP)
        await eventually(
            lambda: states and not states[-1].patient_connected, 15, "patient reported gone"
        )
        gone = states[-1]
        assert "no video or audio from the patient" in gone.reason
        call = edge.media.calls.calls[s.session_id]
        # Noticed from the media, not by ICE giving up: the peer connection is still there.
        assert call.patient is not None and not call.patient.closed
        await eventually(lambda: call.state().patient_fps == 0.0, 10, "patient fps falls to 0")
        # It wakes up: media flows again and the clinician is told.
        os.kill(proc.pid, signal.SIGCONT)
        await eventually(
            lambda: states and states[-1].patient_connected, 20, "patient reported back"
        )
        before = clinician.received.frames
        await eventually(lambda: clinician.received.frames > before + 10, 20, "video again")
    finally:
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
        left = edge.media.calls.calls.get(s.session_id)
        if left is not None and left.patient is not None:
            # The device's own hang-up never came: end its call with its token.
            await stub.Hangup(
                media_pb2.HangupMediaRequest(session_id=s.session_id, call_id=left.patient.call_id),
                metadata=bearer(s.publisher_token),
            )
        await clinician.hangup()
    await eventually(lambda: edge.media.calls.peer_count == 0, 10, "peers closed")
    assert live_peer_connections() == 0
