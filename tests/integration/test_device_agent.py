"""The device agent against a real core and edges: streams, gets everything archived, follows
moves, and never gives up on a recoverable status (rate limiting, token expiry)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from clients.device import Backlog, DeviceAgent, DeviceConfig
from core_services.server import CoreServer
from telehealth.rpc import bearer
from telehealth.v1 import archive_pb2, archive_pb2_grpc, vitals_pb2, vitals_pb2_grpc
from tests.conftest import EdgeFactory, eventually


async def archived(core: CoreServer, session_id: str) -> archive_pb2.GetWatermarkResponse:
    async with grpc.aio.insecure_channel(core.address) as ch:
        return await archive_pb2_grpc.ArchiveServiceStub(ch).GetWatermark(
            archive_pb2.GetWatermarkRequest(session_id=session_id), timeout=5
        )


async def test_agent_streams_and_everything_is_archived(
    core: CoreServer, edge_factory: EdgeFactory
) -> None:
    edge = await edge_factory()
    agent = DeviceAgent(
        DeviceConfig(core.address, "p-7", "zone-a", scenario="deteriorating", deterioration_s=1.0)
    )
    stats = await asyncio.wait_for(agent.run(asyncio.Event(), duration_s=2.0), 30)
    assert stats.sent == 50 and stats.acked == 50 and stats.rejected == 0
    assert stats.reconnects == 0 and agent.pending == 0
    ch = edge.sessions.channels[agent.session_id]
    assert ch.watermark.value == 50
    # Fully deteriorated by the second reading (t = 1 s): NEWS2 high, every parameter known.
    assert ch.news2 is not None and ch.news2.complete and ch.news2.total >= 7
    wm = await archived(core, agent.session_id)
    assert wm.watermark.archived_seq == 50 and wm.archived_batches == 50


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
    assert stats.reconnects >= 1 and stats.handovers == 0
    assert edge_b.sessions.channels[agent.session_id].watermark.value > mark
    wm = await archived(core, agent.session_id)
    assert wm.watermark.archived_seq == agent.next_seq() - 1 == wm.archived_batches


async def test_agent_survives_rate_limiting_and_archives_everything(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: Callable[[str], grpc.aio.Channel]
) -> None:
    # The edge paces a publisher over its rate and refuses (RESOURCE_EXHAUSTED) only a session
    # owing more than a burst across parallel streams. A second publisher of the same session
    # (a duplicated device) flooding beside the agent gets the agent's stream refused too: the
    # agent must back off, come back, and in the end the archive has every batch once.
    edge = await edge_factory(publish_rate_batches_per_s=30.0, publish_burst_batches=1)
    stop = asyncio.Event()
    agent = DeviceAgent(DeviceConfig(core.address, "p-limited", "zone-a", flush_timeout_s=20))
    run = asyncio.create_task(agent.run(stop))
    await eventually(lambda: agent.received_seq >= 5, what="agent streaming")
    flooding = asyncio.Event()
    flooding.set()

    async def flood() -> None:
        dup = vitals_pb2.PublishVitalsRequest(
            batch=vitals_pb2.VitalsBatch(session_id=agent.session_id, seq=1)
        )

        async def reqs() -> AsyncIterator[vitals_pb2.PublishVitalsRequest]:
            while flooding.is_set():
                yield dup

        stub = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
        while flooding.is_set():
            with contextlib.suppress(grpc.aio.AioRpcError):
                async for _ in stub.Publish(reqs(), metadata=bearer(agent.token)):
                    pass

    rogue = asyncio.create_task(flood())
    await eventually(lambda: agent.stats.rate_limited >= 1, timeout=20, what="agent refused")
    flooding.clear()
    rogue.cancel()
    await asyncio.gather(rogue, return_exceptions=True)
    mark = agent.received_seq
    await eventually(lambda: agent.received_seq > mark + 10, what="agent back after refusals")
    stop.set()
    stats = await asyncio.wait_for(run, 30)
    assert stats.reconnects >= stats.rate_limited >= 1
    assert agent.pending == 0, f"{agent.pending} batches never archived"
    wm = await archived(core, agent.session_id)
    assert wm.watermark.archived_seq == agent.next_seq() - 1 == wm.archived_batches


async def test_agent_paces_a_backlog_instead_of_bursting_it(
    core: CoreServer, edge_factory: EdgeFactory
) -> None:
    # 300 batches are waiting when the stream opens; the edge takes a burst of 100 and then
    # 200/s, pacing (holding back) a publisher beyond that. The device resends at 150/s, so
    # the edge never has to hold it back, and nothing is lost.
    edge = await edge_factory(publish_rate_batches_per_s=200.0, publish_burst_batches=100)
    agent = DeviceAgent(DeviceConfig(core.address, "p-backlog", "zone-a", flush_timeout_s=20))

    class Backlogged(DeviceAgent):
        async def _produce(self, stop: asyncio.Event, duration_s: float) -> None:
            await self.opened.wait()
            t0 = 1_700_000_000_000_000_000
            for k in range(300):
                self.enqueue(self.make_batch(t0, k * 0.04, k % 25 == 0))

    agent = Backlogged(agent.cfg)
    stats = await asyncio.wait_for(agent.run(asyncio.Event()), 60)
    assert stats.rate_limited == 0 and stats.reconnects == 0
    assert edge.guard.paced == 0
    assert agent.pending == 0
    wm = await archived(core, agent.session_id)
    assert wm.watermark.archived_seq == 300 == wm.archived_batches


async def test_rejection_logs_name_fields_not_values(
    core: CoreServer, edge_factory: EdgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    await edge_factory()

    class OneBadReading(DeviceAgent):
        def make_batch(self, t0_ns: int, t_s: float, with_vitals: bool) -> vitals_pb2.VitalsBatch:
            b = super().make_batch(t0_ns, t_s, with_vitals)
            if b.seq == 26:  # carries the second reading
                b.vitals[0].heart_rate_bpm = 917.0
            return b

    agent = OneBadReading(DeviceConfig(core.address, "p-bad", "zone-a"))
    with caplog.at_level(logging.INFO, logger="device"):
        stats = await asyncio.wait_for(agent.run(asyncio.Event(), duration_s=1.2), 30)
    assert stats.rejected == 1
    [rec] = [r for r in caplog.records if r.getMessage() == "edge rejected a batch"]
    assert (rec.seq, rec.code, rec.fields) == (26, "INVALID_ARGUMENT", ["heart_rate_bpm"])  # type: ignore[attr-defined]
    for r in caplog.records:
        assert "917" not in r.getMessage() + json.dumps(r.__dict__, default=str)


def test_backlog_is_bounded_by_bytes_and_drops_oldest_first() -> None:
    b = Backlog(max_bytes=1000)
    for seq in range(1, 11):
        assert b.append(seq, bytes(100)) == 0
    assert (len(b), b.bytes, b.first_seq, b.last_seq) == (10, 1000, 1, 10)
    assert b.append(11, bytes(250)) == 3  # the three oldest make room
    assert (b.first_seq, b.last_seq, b.bytes) == (4, 11, 950)
    assert b.get(3) is None and b.get(4) == bytes(100) and b.get(11) == bytes(250)
    b.release_through(8)
    assert (b.first_seq, len(b), b.bytes) == (9, 3, 450)
    b.release_through(20)
    assert (len(b), b.bytes, b.first_seq) == (0, 0, 21)
    with pytest.raises(ValueError, match="contiguous"):
        b.append(21, b"x")
        b.append(23, b"x")


async def test_a_full_backlog_is_logged_counted_and_then_passed_by_the_archive(
    core: CoreServer, edge_factory: EdgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # ~20 batches fit; the edge is gone for longer than that, so the oldest must go, loudly.
    # Once an edge is back the agent sends each dropped seq as an empty batch, which the
    # edge refuses into a tombstone: the archive's watermark passes the loss and moves on.
    edge = await edge_factory("edge-a", "zone-a")
    stop = asyncio.Event()
    agent = DeviceAgent(
        DeviceConfig(core.address, "p-full", "zone-a", max_backlog_bytes=2000, flush_timeout_s=15)
    )
    with caplog.at_level(logging.INFO, logger="device"):
        run = asyncio.create_task(agent.run(stop))
        await eventually(lambda: agent.received_seq >= 5, what="first acks")
        await edge.stop(grace=0)
        await eventually(lambda: agent.stats.dropped_unacked > 10, what="backlog overflow")
        await edge_factory("edge-a", "zone-a")  # back, with its journal
        await eventually(lambda: agent.archived_seq > agent.stats.dropped_unacked + 5, 15, "past")
        stop.set()
        stats = await asyncio.wait_for(run, 30)
    assert stats.backlog_overflows == 1 and stats.peak_backlog_bytes <= 2000
    assert any(
        r.levelno == logging.ERROR and "backlog full" in r.getMessage() for r in caplog.records
    )
    # The markers are refused by design: not logged as the device's bad data.
    assert not [r for r in caplog.records if r.getMessage() == "edge rejected a batch"]
    assert agent.pending == 0
    wm = await archived(core, agent.session_id)
    last = agent.next_seq() - 1
    assert wm.watermark.archived_seq == last
    # Every seq is accounted for: stored, or a tombstone for one the device had to drop (a
    # dropped one edge-a had archived before it stopped stays stored).
    assert last - stats.dropped_unacked <= wm.archived_batches < last


async def test_zone_change_is_a_handover_not_a_reconnect(
    core: CoreServer, edge_factory: EdgeFactory
) -> None:
    edge_a = await edge_factory("edge-a", "zone-a")
    edge_b = await edge_factory("edge-b", "zone-b")
    stop = asyncio.Event()
    agent = DeviceAgent(DeviceConfig(core.address, "p-mover", "zone-a"))
    run = asyncio.create_task(agent.run(stop))
    await eventually(lambda: agent.received_seq >= 10, what="streaming to edge-a")
    assert await agent.change_zone("zone-b")
    await eventually(lambda: agent.stats.handovers == 1, what="handover to edge-b")
    assert agent.assignment is not None and agent.assignment.edge_id == "edge-b"
    # The old stream was closed only after edge-b acknowledged: the handover time is to the
    # first ack from edge-b, and edge-b has everything the archive did not hold at the switch.
    assert len(agent.stats.handovers_s) == 1
    mark = agent.received_seq
    await eventually(lambda: agent.received_seq > mark + 10, what="streaming on edge-b")
    sid = agent.session_id
    await eventually(
        lambda: (a := edge_a.sessions.assignments.get(sid)) is not None and a.released,
        what="edge-a released",
    )
    stop.set()
    stats = await asyncio.wait_for(run, 30)
    assert stats.reconnects == 0 and stats.gaps_s == []
    assert stats.edges == ["edge-a", "edge-b"]
    assert edge_b.sessions.channels[sid].watermark.value == agent.next_seq() - 1
    wm = await archived(core, sid)
    assert wm.watermark.archived_seq == agent.next_seq() - 1 == wm.archived_batches


async def test_agent_renews_its_token_in_band_without_reconnecting(
    core: CoreServer, edge_factory: EdgeFactory
) -> None:
    # Tokens live ~3 s here and the edge ends a stream whose token has expired: the agent
    # must renew through the core before 2/3 of the lifetime and hand the new token to the
    # open stream (PublishVitalsRequest.refresh_token), never losing the stream.
    await edge_factory()
    core.issuer.ttl_s = 3
    agent = DeviceAgent(DeviceConfig(core.address, "p-renew", "zone-a"))
    stats = await asyncio.wait_for(agent.run(asyncio.Event(), duration_s=7.0), 40)
    assert stats.token_refreshes >= 2
    assert stats.reconnects == 0 and stats.rejected == 0
    wm = await archived(core, agent.session_id)
    assert wm.watermark.archived_seq == 175 == wm.archived_batches


async def test_agent_whose_token_expires_attaches_again_and_loses_nothing(
    core: CoreServer, edge_factory: EdgeFactory
) -> None:
    # An agent that could not renew in time (asleep, core away): the edge ends its stream
    # with UNAUTHENTICATED at expiry; the agent attaches again (the core renews an expired
    # device token within its grace period) and resends what the archive lacks.
    await edge_factory()
    core.issuer.ttl_s = 2

    class NeverRenews(DeviceAgent):
        def _refresh_due_in(self) -> float:
            return float("inf")

    agent = NeverRenews(DeviceConfig(core.address, "p-expired", "zone-a"))
    stats = await asyncio.wait_for(agent.run(asyncio.Event(), duration_s=5.0), 40)
    assert stats.reconnects >= 1 and stats.token_refreshes == 0
    assert agent.pending == 0
    wm = await archived(core, agent.session_id)
    assert wm.watermark.archived_seq == 125 == wm.archived_batches
