"""The device agent's --video synthetic: vitals and a video call to the edge from one program."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from clients.device import DeviceAgent, DeviceConfig
from clients.video import VIEWER, MediaCall, run_with_video
from core_services.server import CoreServer
from telehealth.v1 import sessions_pb2, sessions_pb2_grpc
from tests.conftest import EdgeFactory, eventually, staff


async def test_device_agent_publishes_synthetic_video_a_clinician_sees(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: Callable[[str], grpc.aio.Channel]
) -> None:
    edge = await edge_factory(media_udp_port_min=41300, media_udp_port_max=41331)
    agent = DeviceAgent(DeviceConfig(core.address, "p-video", "zone-a"))
    stop = asyncio.Event()
    task = asyncio.create_task(run_with_video([agent], "synthetic:80", stop, 0.0))
    try:
        await eventually(lambda: agent.session_id, 10, "session opened")
        await eventually(
            lambda: (c := edge.media.calls.calls.get(agent.session_id)) and c.patient_video,
            15,
            "device video at the edge",
        )
        viewer = await sessions_pb2_grpc.SessionsServiceStub(channel_to(core.address)).Attach(
            sessions_pb2.AttachSessionRequest(
                session_id=agent.session_id, role=sessions_pb2.ROLE_VIEWER
            ),
            metadata=await staff(core, "clinician", ("p-video",)),
        )
        clinician = MediaCall(edge.address, agent.session_id, viewer.assignment.token, VIEWER)
        await clinician.start()
        await eventually(lambda: clinician.received.frames > 15, 20, "clinician sees the device")
        assert (clinician.received.width, clinician.received.height) == (640, 480)
        await clinician.hangup()
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
    await eventually(lambda: edge.media.calls.peer_count == 0, 10, "device hung up")
