"""Failover and migration figures for make bench: kill -9 an edge under 20 patients, move
patients to another zone, drain an edge; every figure from real processes on loopback.

edge_kill_gap: a device's last ack from the killed edge to its first from the new one.
zone_change_handover / drain_handover: a make-before-break move, from its start (ChangeZone
asked, or `moving` heard from the old edge) to the first ack from the new edge; the device's
stream never breaks, so *_gaps (streams lost) should be empty and *_reconnects 0."""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from clients.device import DeviceAgent, DeviceConfig
from clients.mesh import LocalMesh
from core_services.auth.users import UserStore
from core_services.store import SqlStore
from telehealth.rpc import bearer, channel_options
from telehealth.v1 import (
    archive_pb2,
    archive_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    edges_pb2,
    edges_pb2_grpc,
)

PATIENTS = 20


def _summary(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0, "p50_s": 0.0, "max_s": 0.0}
    return {
        "n": len(values),
        "p50_s": round(statistics.median(values), 4),
        "max_s": round(max(values), 4),
    }


async def _until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"failover bench: timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def _archived_exactly(mesh: LocalMesh, devices: list[DeviceAgent]) -> tuple[int, int]:
    """(batches sent, batches archived) over all devices; the archive keys on (session, seq)."""
    assert mesh.core is not None
    sent = archived = 0
    async with grpc.aio.insecure_channel(mesh.core.grpc_address, options=channel_options()) as ch:
        stub = archive_pb2_grpc.ArchiveServiceStub(ch)
        for a in devices:
            r = await stub.GetWatermark(archive_pb2.GetWatermarkRequest(session_id=a.session_id))
            sent += a.next_seq() - 1
            archived += r.archived_batches
    return sent, archived


async def _operator_token(mesh: LocalMesh) -> str:
    store = SqlStore(f"sqlite+aiosqlite:///{mesh.data_dir / 'core' / 'core.db'}")
    await store.start()
    try:
        await UserStore(store.engine).add_user("ops-bench", "operator", "bench-only-password")
    finally:
        await store.close()
    assert mesh.core is not None
    async with grpc.aio.insecure_channel(mesh.core.grpc_address) as ch:
        r = await auth_pb2_grpc.AuthServiceStub(ch).Login(
            auth_pb2.LoginRequest(user_id="ops-bench", password="bench-only-password")
        )
    return str(r.token)


async def measure(work_dir: Path) -> dict[str, Any]:
    """Run the three scenarios on a fresh one-core mesh; return the figures."""
    data = work_dir / "failover-mesh"
    shutil.rmtree(data, ignore_errors=True)
    mesh = LocalMesh(data, ("zone-a", "zone-b", "zone-c"))
    await mesh.start()
    assert mesh.core is not None
    stop = asyncio.Event()
    devices = [
        DeviceAgent(DeviceConfig(mesh.core.grpc_address, f"fo-{i:02d}", "zone-a", seed=i))
        for i in range(PATIENTS)
    ]
    tasks = [asyncio.create_task(a.run(stop)) for a in devices]
    try:
        await _until(lambda: all(a.received_seq >= 25 for a in devices), 60, "streaming")
        # 1. kill -9 the edge all 20 are on.
        mesh.kill(mesh.edges[0])
        await _until(lambda: all(a.stats.gaps_s for a in devices), 60, "failover")
        failover = _summary([a.stats.gaps_s[0] for a in devices])
        # 2. Half of them move to zone-c (a handover), make-before-break.
        movers = devices[: PATIENTS // 2]
        reconnects_before_move = sum(a.stats.reconnects for a in movers)
        for a in movers:
            await a.change_zone("zone-c")
        await _until(lambda: all(a.stats.handovers_s for a in movers), 60, "handover")
        handover = _summary([a.stats.handovers_s[0] for a in movers])
        handover_gaps = [g for a in movers for g in a.stats.gaps_s[1:]]
        zone_change_reconnects = sum(a.stats.reconnects for a in movers) - reconnects_before_move
        # 3. Drain edge-b (the other half): the operator's drain returns once all moved, and
        # each device hands over to the new edge without losing its stream.
        stayers = devices[PATIENTS // 2 :]
        gaps_before = {id(a): len(a.stats.gaps_s) for a in devices}
        handovers_before = {id(a): len(a.stats.handovers_s) for a in stayers}
        reconnects_before = sum(a.stats.reconnects for a in stayers)
        token = await _operator_token(mesh)
        t0 = time.monotonic()
        async with grpc.aio.insecure_channel(mesh.core.grpc_address) as ch:
            resp = await edges_pb2_grpc.EdgesServiceStub(ch).Drain(
                edges_pb2.DrainEdgeRequest(edge_id="edge-b", draining=True),
                metadata=bearer(token),
                timeout=120,
            )
        drain_s = time.monotonic() - t0
        await _until(
            lambda: all(len(a.stats.handovers_s) > handovers_before[id(a)] for a in stayers),
            60,
            "drain handovers",
        )
        drain_handover = _summary(
            [h for a in stayers for h in a.stats.handovers_s[handovers_before[id(a)] :]]
        )
        drain_gaps = _summary([g for a in stayers for g in a.stats.gaps_s[gaps_before[id(a)] :]])
        drain_reconnects = sum(a.stats.reconnects for a in stayers) - reconnects_before
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        sent, archived = await _archived_exactly(mesh, devices)
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        mesh.stop()
    return {
        "patients": PATIENTS,
        "edge_kill_gap": failover,
        "zone_change_handover": handover,
        "zone_change_gaps": _summary(handover_gaps),
        "zone_change_reconnects": zone_change_reconnects,
        "drain_rpc_s": round(drain_s, 4),
        "drain_edge_empty": resp.edge.placed_sessions == 0,
        "drain_handover": drain_handover,
        "drain_gap": drain_gaps,
        "drain_reconnects": drain_reconnects,
        "batches_sent": sent,
        "batches_archived": archived,
        "lost": sent - archived,
        "cpus": os.cpu_count(),
    }


if __name__ == "__main__":
    import json
    import tempfile

    print(json.dumps(asyncio.run(measure(Path(tempfile.mkdtemp()))), indent=2), file=sys.stdout)
