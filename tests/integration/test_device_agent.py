"""The device agent against a real core and edges: streams, gets everything acked, follows moves."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from clients.device import DeviceAgent, DeviceConfig
from core_services.server import CoreServer
from tests.conftest import EdgeFactory, eventually


async def test_agent_streams_and_everything_is_acked(
    core: CoreServer, edge_factory: EdgeFactory
) -> None:
    edge = await edge_factory()
    agent = DeviceAgent(
        DeviceConfig(core.address, "p-7", "zone-a", scenario="deteriorating", deterioration_s=2.0)
    )
    stats = await asyncio.wait_for(agent.run(asyncio.Event(), duration_s=2.0), 30)
    assert stats.sent == 50 and stats.acked == 50 and stats.rejected == 0
    ch = edge.sessions.channels[agent.session_id]
    assert ch.watermark.value == 50
    assert ch.news2 is not None


async def test_agent_follows_its_session_when_the_edge_dies(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: Callable[[str], grpc.aio.Channel]
) -> None:
    edge_a = await edge_factory("edge-a", "zone-a")
    edge_b = await edge_factory("edge-b", "zone-b")
    core.edges.heartbeat_timeout_s = 0.5
    stop = asyncio.Event()
    agent = DeviceAgent(DeviceConfig(core.address, "p-8", "zone-a"))
    run = asyncio.create_task(agent.run(stop))
    await eventually(lambda: agent.received_seq >= 10, what="first acks")
    assert agent.stats.edges == ["edge-a"]
    await edge_a.stop(grace=0)
    await eventually(lambda: "edge-b" in agent.stats.edges, timeout=15, what="moved to edge-b")
    mark = agent.received_seq
    await eventually(lambda: agent.received_seq > mark + 10, what="acks from edge-b")
    stop.set()
    stats = await asyncio.wait_for(run, 15)
    assert stats.reconnects >= 1
    assert edge_b.sessions.channels[agent.session_id].watermark.value > mark
