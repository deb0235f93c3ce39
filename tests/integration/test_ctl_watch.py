"""`telehealth-ctl watch` and the SessionViewer behind it, against a real core and edges:
per-field ages from real events, and following the session through edge loss with every
batch shown once and in order."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from clients.ctl import WatchView, build_parser, cmd_watch, main
from clients.ctl_security import bearer_interceptors
from clients.device import DeviceAgent, DeviceConfig, DeviceStats
from clients.mesh import free_port
from clients.viewer import Following, Interrupted, Missing, SessionViewer, VitalsEvent
from core_services.server import CoreServer
from edge_nodes.server import EdgeServer
from telehealth.config import EdgeSettings
from telehealth.rpc import bearer, channel_options
from telehealth.v1 import (
    edges_pb2,
    edges_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
    vitals_pb2,
    vitals_pb2_grpc,
)
from tests.conftest import EdgeFactory, Metadata, core_settings, eventually, staff

ChannelTo = Callable[[str], grpc.aio.Channel]
S = 1_000_000_000


async def crash(edge: EdgeServer) -> None:
    """The edge's gRPC server goes away at once: streams break with no goodbye (the nearest
    in-process thing to kill -9; its core link stays up, so only a client's report of the
    unreachable edge makes the core check it now)."""
    await edge.grpc.server.stop(0)


def reading_batch(sid: str, seq: int, t_ns: int, **fields: float) -> vitals_pb2.VitalsBatch:
    b = vitals_pb2.VitalsBatch(session_id=sid, seq=seq, device_time_unix_ns=t_ns)
    b.vitals.add(device_time_unix_ns=t_ns, **fields)  # type: ignore[arg-type]
    return b


async def publish(
    edge_address: str, token: str, batches: list[vitals_pb2.VitalsBatch], channel_to: ChannelTo
) -> None:
    async def reqs() -> AsyncIterator[vitals_pb2.PublishVitalsRequest]:
        for b in batches:
            yield vitals_pb2.PublishVitalsRequest(batch=b)

    stub = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge_address))
    acks = [r async for r in stub.Publish(reqs(), metadata=bearer(token))]
    assert acks and acks[-1].received_seq == batches[-1].seq
    assert not any(r.HasField("rejection") for r in acks)


async def streaming_device(
    core: CoreServer, patient_id: str, stop: asyncio.Event
) -> tuple[DeviceAgent, asyncio.Task[DeviceStats]]:
    """A device agent for `patient_id` in zone-a, running until `stop`, with acks coming."""
    device = DeviceAgent(DeviceConfig(core.address, patient_id, "zone-a"))
    run = asyncio.create_task(device.run(stop))
    await eventually(lambda: device.received_seq >= 5, what="device streaming")
    return device, run


async def clinician_viewer(
    core: CoreServer, channel_to: ChannelTo, device: DeviceAgent, resume_after_seq: int = 0
) -> SessionViewer:
    """A SessionViewer of the device's session, logged in as its patient's clinician."""
    login = await staff(core, "clinician", (device.cfg.patient_id,))
    return SessionViewer(
        channel_to(core.address),
        device.session_id,
        metadata=login,
        resume_after_seq=resume_after_seq,
    )


@dataclass
class Seen:
    """What a view showed: the seqs of live batches in order (snapshots left out), those of
    them filled from the archive, and every note (Following, Interrupted, Missing)."""

    task: asyncio.Task[None] | None = None
    seqs: list[int] = field(default_factory=list)
    from_archive: list[int] = field(default_factory=list)
    notes: list[object] = field(default_factory=list)


@asynccontextmanager
async def watching(viewer: SessionViewer) -> AsyncIterator[Seen]:
    """Consume the viewer in the background, as `watch` does, until the block ends."""
    seen = Seen()

    async def consume() -> None:
        async for ev in viewer:
            if isinstance(ev, VitalsEvent) and ev.event.HasField("batch") and not ev.snapshot:
                seen.seqs.append(ev.event.batch.seq)
                if ev.from_archive:
                    seen.from_archive.append(ev.event.batch.seq)
            elif not isinstance(ev, VitalsEvent):
                seen.notes.append(ev)

    seen.task = asyncio.create_task(consume())
    try:
        yield seen
    finally:
        seen.task.cancel()
        await asyncio.gather(seen.task, return_exceptions=True)


async def stop_and_see_last(
    seen: Seen,
    device: DeviceAgent,
    stop: asyncio.Event,
    run: asyncio.Task[DeviceStats],
    run_timeout: float = 15,
) -> int:
    """Stop the device; once it has stopped, wait for the view to show its last batch (the
    seq returned)."""
    stop.set()
    await asyncio.wait_for(run, run_timeout)
    last = device.next_seq() - 1
    await eventually(
        lambda: seen.seqs and seen.seqs[-1] == last, timeout=10, what="viewer saw the last batch"
    )
    return last


async def test_watch_shows_each_field_with_its_own_age(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    edge = await edge_factory()
    sessions = sessions_pb2_grpc.SessionsServiceStub(channel_to(core.address))
    opened = await sessions.Open(sessions_pb2.OpenSessionRequest(patient_id="p-w", zone="zone-a"))
    sid = opened.session.session_id
    login = await staff(core, "clinician", ("p-w",))
    view = WatchView(sid)
    viewer = SessionViewer(channel_to(core.address), sid, metadata=login)
    got: list[VitalsEvent] = []

    async def watch() -> None:
        async for ev in viewer:
            view.apply(ev)
            if isinstance(ev, VitalsEvent):
                got.append(ev)

    task = asyncio.create_task(watch())
    await eventually(lambda: edge.sessions.subscribers == 1, what="viewer subscribed")
    now = time.time_ns()
    # A full reading 90 s ago (a cuff and thermometer round), then the monitor's pulse and
    # SpO2 only, 2 s ago: blood pressure and temperature keep their older values and ages.
    full = reading_batch(
        sid,
        1,
        now - 90 * S,
        heart_rate_bpm=88,
        spo2_percent=95,
        respiration_rate_bpm=18,
        systolic_mmhg=131,
        diastolic_mmhg=84,
        temperature_c=37.9,
        consciousness=vitals_pb2.CONSCIOUSNESS_ALERT,
        oxygen_support=vitals_pb2.OXYGEN_SUPPORT_AIR,
    )
    monitor = reading_batch(sid, 2, now - 2 * S, heart_rate_bpm=104, spo2_percent=93)
    await publish(edge.address, opened.assignment.token, [full, monitor], channel_to)
    await eventually(lambda: view.last_seq == 2 and view.news2 is not None, what="both shown")
    await eventually(lambda: view.news2 is not None and view.news2.seq == 2, what="NEWS2 of 2")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert [e.event.batch.seq for e in got if e.event.HasField("batch")] == [1, 2]

    lines = {ln.split()[0] + " " + ln.split()[1]: ln for ln in view.render(now).splitlines()[1:]}
    assert "104 bpm" in lines["heart rate"] and lines["heart rate"].endswith("age 2.0s")
    assert "93 %" in lines["SpO2 93"] and lines["SpO2 93"].endswith("age 2.0s")
    assert "131/84 mmHg" in lines["blood pressure"] and lines["blood pressure"].endswith("age 90s")
    assert "37.9 °C" in lines["temperature 37.9"] and lines["temperature 37.9"].endswith("age 90s")
    assert lines["respiration 18"].endswith("age 90s")
    assert lines["oxygen air"].endswith("age 90s")
    assert lines["consciousness alert"].endswith("age 90s")
    # NEWS2 is as old as its oldest input, not the time the edge computed it.
    news2 = next(ln for ln in lines.values() if ln.lstrip().startswith("NEWS2"))
    assert "inputs up to 90s old" in news2, news2
    # Twelve minutes on, the same view says so: ages are computed at render time.
    later = view.render(now + 12 * 60 * S)
    assert "age 12m" in later and "age 14m" in later


async def test_watch_command_renders_live_vitals(
    core: CoreServer, edge_factory: EdgeFactory
) -> None:
    await edge_factory()
    stop = asyncio.Event()
    device, run = await streaming_device(core, "p-cli", stop)
    login: Metadata = await staff(core, "clinician", ("p-cli",))
    token = login[0][1].removeprefix("Bearer ")
    ns = build_parser().parse_args(
        ["watch", device.session_id, "--duration", "2.5", "--refresh", "1"]
    )
    ns.tls = None
    out = io.StringIO()
    async with grpc.aio.insecure_channel(
        core.address, options=channel_options(), interceptors=bearer_interceptors(token)
    ) as ch:
        assert await cmd_watch(ch, ns, out) == 0
    stop.set()
    await asyncio.wait_for(run, 15)
    final = out.getvalue().strip().split("\n\n")[-1]
    assert final.startswith(f"session {device.session_id} on edge-a")
    for label in ("heart rate", "SpO2", "respiration", "blood pressure", "temperature"):
        row = next(ln for ln in final.splitlines() if ln.strip().startswith(label))
        assert " age " in row and " - " not in row, row
    assert "NEWS2" in final and "inputs up to" in final


async def test_viewer_follows_edge_loss_with_every_batch_once_in_order(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    edge_a = await edge_factory("edge-a", "zone-a")
    edge_b = await edge_factory("edge-b", "zone-b")
    stop = asyncio.Event()
    device, run = await streaming_device(core, "p-follow", stop)
    viewer = await clinician_viewer(core, channel_to, device)
    async with watching(viewer) as seen:
        seqs, notes = seen.seqs, seen.notes
        await eventually(lambda: len(seqs) >= 10, what="viewer live on edge-a")
        await crash(edge_a)
        await eventually(lambda: viewer.edge_id == "edge-b", timeout=15, what="viewer on edge-b")
        mark = device.next_seq()
        await eventually(lambda: seqs and seqs[-1] > mark + 10, timeout=15, what="live on edge-b")
        last = await stop_and_see_last(seen, device, stop, run)

    assert seqs == list(range(seqs[0], last + 1)), "a batch shown twice, out of order, or lost"
    assert not [n for n in notes if isinstance(n, Missing)]
    # The viewer (like the device) told the core its edge was unreachable: the core checked
    # it and re-placed the session at once, well before the heartbeat timeout would have.
    assert any(isinstance(n, Interrupted) and "edge-a" in n.message for n in notes)
    assert [n.edge_id for n in notes if isinstance(n, Following)][-1] == "edge-b"
    assert viewer.stats.resubscribes >= 1 and viewer.stats.edges[0] == "edge-a"
    assert edge_b.sessions.channels[device.session_id].watermark.value == last


async def test_viewer_resuming_late_gets_what_the_edge_lacks_from_the_archive(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    edge_a = await edge_factory("edge-a", "zone-a")
    await edge_factory("edge-b", "zone-b")
    stop = asyncio.Event()
    device = DeviceAgent(DeviceConfig(core.address, "p-late", "zone-a"))
    run = asyncio.create_task(device.run(stop))
    await eventually(lambda: device.archived_seq >= 30, what="30 batches archived via edge-a")
    await crash(edge_a)
    await eventually(lambda: "edge-b" in device.stats.edges, timeout=15, what="device on edge-b")
    mark = device.received_seq
    await eventually(lambda: device.received_seq > mark + 10, what="acks from edge-b")
    # A clinician whose view stopped at seq 5 picks up again now: edge-b never held 6..30
    # (they were archived before it took over), so they come from the archive, then live.
    viewer = await clinician_viewer(core, channel_to, device, resume_after_seq=5)
    async with watching(viewer) as seen:
        seqs, from_archive = seen.seqs, seen.from_archive
        await eventually(lambda: seqs and seqs[-1] > device.received_seq - 5, what="viewer live")
        last = await stop_and_see_last(seen, device, stop, run)
    assert seqs == list(range(6, last + 1)), "a batch shown twice, out of order, or lost"
    assert not [n for n in seen.notes if isinstance(n, Missing)]
    assert from_archive[0] == 6 and from_archive[-1] >= 30
    assert from_archive == seqs[: len(from_archive)]


async def test_viewer_follows_a_drain_before_the_old_edge_lets_go(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    await edge_factory("edge-a", "zone-a")
    await edge_factory("edge-b", "zone-b")
    stop = asyncio.Event()
    device, run = await streaming_device(core, "p-drained", stop)
    viewer = await clinician_viewer(core, channel_to, device)
    async with watching(viewer) as seen:
        seqs, notes = seen.seqs, seen.notes
        await eventually(lambda: len(seqs) >= 10, what="viewer live on edge-a")
        edges = edges_pb2_grpc.EdgesServiceStub(channel_to(core.address))
        drained = await edges.Drain(
            edges_pb2.DrainEdgeRequest(edge_id="edge-a", draining=True),
            metadata=await staff(core, "operator"),
        )
        assert drained.edge.placed_sessions == 0
        await eventually(lambda: viewer.stats.moves_followed == 1, what="viewer followed the move")
        mark = device.next_seq()
        await eventually(lambda: seqs[-1] > mark + 10, what="live on edge-b")
        last = await stop_and_see_last(seen, device, stop, run)
    assert seqs == list(range(seqs[0], last + 1)), "a batch shown twice, out of order, or lost"
    # Make-before-break for the view: it was never interrupted, and never fell back on the
    # archive.
    assert viewer.stats.resubscribes == 0 and viewer.stats.filled_from_archive == 0
    assert not [n for n in notes if isinstance(n, (Interrupted, Missing))]
    assert [(n.edge_id, n.reason) for n in notes if isinstance(n, Following)] == [
        ("edge-a", "start"),
        ("edge-b", "moving"),
    ]
    assert device.stats.reconnects == 0 and device.stats.handovers == 1


async def test_viewer_resubscribes_before_its_token_expires_without_a_hole(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    # Viewer tokens live ~3 s and the edge ends a view whose token has expired: the viewer
    # subscribes again beside the old stream before that (resume_after_seq = last seen).
    await edge_factory()
    stop = asyncio.Event()
    device, run = await streaming_device(core, "p-renewed", stop)
    login = await staff(core, "clinician", ("p-renewed",))
    core.issuer.ttl_s = 3
    viewer = SessionViewer(channel_to(core.address), device.session_id, metadata=login)
    async with watching(viewer) as seen:
        await eventually(lambda: viewer.stats.token_refreshes >= 2, timeout=15, what="two renewals")
        last = await stop_and_see_last(seen, device, stop, run, run_timeout=30)
    seqs = seen.seqs
    assert seqs == list(range(seqs[0], last + 1)), "a batch shown twice, out of order, or lost"
    assert viewer.stats.resubscribes == 0
    assert not [n for n in seen.notes if isinstance(n, (Interrupted, Missing))]


async def test_viewer_rides_out_a_core_outage_while_it_must_re_attach(
    tmp_path: Path, channel_to: ChannelTo
) -> None:
    # The core is down exactly when the viewer needs it (its edge just went away): the viewer
    # says so and retries with backoff (audit: this crashed `watch`), and once the core is
    # back it is re-placed and carries on, every batch once and in order.
    port = free_port()
    settings = core_settings(tmp_path, grpc_listen=f"127.0.0.1:{port}")
    core = CoreServer(settings)
    await core.start()
    edges: list[EdgeServer] = []

    async def edge(edge_id: str) -> EdgeServer:
        e = EdgeServer(
            EdgeSettings.model_validate(
                {
                    "edge_id": edge_id,
                    "zone": "zone-a",
                    "grpc_listen": "127.0.0.1:0",
                    "http_listen": "127.0.0.1:0",
                    "core_address": f"127.0.0.1:{port}",
                    "heartbeat_interval_s": 0.1,
                    "data_dir": tmp_path / edge_id,
                    "log_format": "text",
                }
            )
        )
        await e.start()
        edges.append(e)
        return e

    stop = asyncio.Event()
    run: asyncio.Task[DeviceStats] | None = None
    try:
        edge_a = await edge("edge-a")
        await eventually(lambda: "edge-a" in core.edges.edges, what="edge-a registered")
        device, run = await streaming_device(core, "p-outage", stop)
        viewer = await clinician_viewer(core, channel_to, device)
        async with watching(viewer) as seen:
            seqs, notes = seen.seqs, seen.notes
            await eventually(lambda: len(seqs) >= 10, what="viewer live")
            await core.stop(grace=0)
            await crash(edge_a)
            await eventually(
                lambda: sum(isinstance(n, Interrupted) and "core" in n.message for n in notes) >= 3,
                what="the viewer retrying the core",
            )
            assert seen.task is not None and not seen.task.done()
            retries = [
                n.retry_in_s for n in notes if isinstance(n, Interrupted) and "core" in n.message
            ]
            assert max(retries) > min(retries)  # backing off, not spinning
            core = CoreServer(settings)
            await core.start()
            await edge("edge-b")
            await eventually(
                lambda: viewer.edge_id == "edge-b", timeout=20, what="viewer on edge-b"
            )
            mark = device.next_seq()
            await eventually(lambda: seqs[-1] > mark + 10, timeout=15, what="live on edge-b")
            last = await stop_and_see_last(seen, device, stop, run, run_timeout=20)
            assert seqs == list(range(seqs[0], last + 1)), (
                "a batch shown twice, out of order, or lost"
            )
            assert not [n for n in notes if isinstance(n, Missing)]
    finally:
        stop.set()
        if run is not None:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
        for e in edges:
            await e.stop(grace=0)
        await core.stop(grace=0)


async def test_watch_refusals_end_with_a_message_not_a_retry_loop(
    core: CoreServer,
    edge_factory: EdgeFactory,
    channel_to: ChannelTo,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await edge_factory()
    sessions = sessions_pb2_grpc.SessionsServiceStub(channel_to(core.address))
    opened = await sessions.Open(sessions_pb2.OpenSessionRequest(patient_id="p-x", zone="zone-a"))
    sid = opened.session.session_id
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "nobody"))  # no saved login
    monkeypatch.delenv("TELEHEALTH_TOKEN", raising=False)
    argv = ["--core", core.address, "watch", sid, "--duration", "20"]
    # main() runs its own event loop: give it a thread, as a terminal would a process.
    assert await asyncio.to_thread(main, argv, io.StringIO()) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    # Logged in, but not this patient's clinician: refused at once too.
    login = await staff(core, "clinician", ("someone-else",))
    monkeypatch.setenv("TELEHEALTH_TOKEN", login[0][1].removeprefix("Bearer "))
    assert await asyncio.to_thread(main, argv, io.StringIO()) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err
