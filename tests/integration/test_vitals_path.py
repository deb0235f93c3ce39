"""Device to edge to subscriber over real gRPC on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from core_services.server import CoreServer
from edge_nodes.server import EdgeServer
from telehealth.rpc import bearer
from telehealth.v1 import sessions_pb2, sessions_pb2_grpc, vitals_pb2, vitals_pb2_grpc
from tests.conftest import EdgeFactory, eventually, staff

ChannelTo = Callable[[str], grpc.aio.Channel]


def make_batch(session_id: str, seq: int, hr: float = 72.0) -> vitals_pb2.VitalsBatch:
    now = time.time_ns()
    b = vitals_pb2.VitalsBatch(session_id=session_id, seq=seq, device_time_unix_ns=now)
    b.vitals.add(
        device_time_unix_ns=now,
        heart_rate_bpm=hr,
        spo2_percent=97,
        respiration_rate_bpm=16,
        systolic_mmhg=120,
        diastolic_mmhg=80,
        temperature_c=36.8,
        consciousness=vitals_pb2.CONSCIOUSNESS_ALERT,
        oxygen_support=vitals_pb2.OXYGEN_SUPPORT_AIR,
    )
    b.waveforms.add(
        kind=vitals_pb2.WAVEFORM_KIND_ECG_LEAD_II,
        start_time_unix_ns=now,
        sample_rate_hz=250,
        samples=[0.0] * 10,
    )
    return b


async def requests(
    batches: list[vitals_pb2.VitalsBatch],
) -> AsyncIterator[vitals_pb2.PublishVitalsRequest]:
    for b in batches:
        yield vitals_pb2.PublishVitalsRequest(batch=b)


async def publish_all(
    vitals: vitals_pb2_grpc.VitalsServiceAsyncStub,
    batches: list[vitals_pb2.VitalsBatch],
    token: str,
) -> list[vitals_pb2.PublishVitalsResponse]:
    """Publish the batches on one stream and return every ack once the edge ends it."""
    return [r async for r in vitals.Publish(requests(batches), metadata=bearer(token))]


async def open_session(
    core: CoreServer,
    channel_to: Callable[[str], grpc.aio.Channel],
    zone: str = "zone-a",
    patient: str = "p-1",
    spo2_scale: int = 1,
) -> sessions_pb2.OpenSessionResponse:
    stub = sessions_pb2_grpc.SessionsServiceStub(channel_to(core.address))
    return await stub.Open(
        sessions_pb2.OpenSessionRequest(
            patient_id=patient,
            zone=zone,
            spo2_scale=spo2_scale,  # type: ignore[arg-type]
        )
    )


async def test_batches_reach_subscriber_in_order_without_loss(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: Callable[[str], grpc.aio.Channel]
) -> None:
    edge = await edge_factory()
    opened = await open_session(core, channel_to)
    assert opened.assignment.edge_id == "edge-a"
    sid = opened.session.session_id
    vitals = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    sub = await clinician_view(core, channel_to, vitals, sid)
    await eventually(lambda: edge.sessions.subscribers == 1, what="subscriber joined")
    n = 200
    acks = await publish_all(
        vitals, [make_batch(sid, i) for i in range(1, n + 1)], opened.assignment.token
    )
    assert acks[-1].received_seq == n
    seen: list[int] = []
    news2: list[int] = []
    async for ev in sub:
        if ev.HasField("batch"):
            seen.append(ev.batch.seq)
        elif ev.HasField("news2"):
            news2.append(ev.news2.total)
        if len(seen) == n:
            break
    sub.cancel()
    assert seen == list(range(1, n + 1))
    assert news2 and news2[-1] == 0


class Feed:
    """A publish request stream the test writes to batch by batch (the stream stays open)."""

    def __init__(self) -> None:
        self._q: asyncio.Queue[vitals_pb2.PublishVitalsRequest | None] = asyncio.Queue()

    def send(self, batch: vitals_pb2.VitalsBatch | None = None, refresh_token: str = "") -> None:
        req = vitals_pb2.PublishVitalsRequest(refresh_token=refresh_token)
        if batch is not None:
            req.batch.CopyFrom(batch)
        self._q.put_nowait(req)

    def close(self) -> None:
        self._q.put_nowait(None)

    async def requests(self) -> AsyncIterator[vitals_pb2.PublishVitalsRequest]:
        while (req := await self._q.get()) is not None:
            yield req


async def read_ack(
    call: grpc.aio.StreamStreamCall[Any, vitals_pb2.PublishVitalsResponse],
) -> vitals_pb2.PublishVitalsResponse:
    resp = await call.read()
    assert isinstance(resp, vitals_pb2.PublishVitalsResponse), "publish stream ended"
    return resp


async def viewer_token(core: CoreServer, channel_to: ChannelTo, sid: str) -> str:
    sessions = sessions_pb2_grpc.SessionsServiceStub(channel_to(core.address))
    viewer = await sessions.Attach(
        sessions_pb2.AttachSessionRequest(session_id=sid, role=sessions_pb2.ROLE_VIEWER),
        metadata=await staff(core, "clinician", ("p-1",)),
    )
    return viewer.assignment.token


async def clinician_view(
    core: CoreServer,
    channel_to: ChannelTo,
    vitals: vitals_pb2_grpc.VitalsServiceAsyncStub,
    sid: str,
    **request: Any,
) -> grpc.aio.UnaryStreamCall[Any, vitals_pb2.SubscribeVitalsResponse]:
    """A clinician's Subscribe to the session (request fields as given), with a viewer token
    of its own."""
    return vitals.Subscribe(
        vitals_pb2.SubscribeVitalsRequest(session_id=sid, **request),
        metadata=bearer(await viewer_token(core, channel_to, sid)),
    )


async def next_event(
    sub: grpc.aio.UnaryStreamCall[Any, vitals_pb2.SubscribeVitalsResponse], kind: str
) -> vitals_pb2.SubscribeVitalsResponse:
    while True:
        ev = await sub.read()
        assert isinstance(ev, vitals_pb2.SubscribeVitalsResponse), f"ended before a {kind}"
        if ev.WhichOneof("event") == kind:
            return ev


async def test_moving_tells_publisher_and_viewers_and_serves_until_released(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    edge = await edge_factory()
    opened = await open_session(core, channel_to)
    sid = opened.session.session_id
    vitals = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    token = await viewer_token(core, channel_to, sid)
    view = vitals.Subscribe(
        vitals_pb2.SubscribeVitalsRequest(session_id=sid), metadata=bearer(token)
    )
    await eventually(lambda: edge.sessions.subscribers == 1, what="subscriber joined")
    feed = Feed()
    pub = vitals.Publish(feed.requests(), metadata=bearer(opened.assignment.token))
    feed.send(make_batch(sid, 1))
    assert (await read_ack(pub)).received_seq == 1

    await edge.sessions.moving(sid, "edge-b", "drain")
    # The device hears of the move on its ack stream without sending anything...
    told = await read_ack(pub)
    assert told.HasField("moving")
    assert (told.moving.new_edge_id, told.moving.reason) == ("edge-b", "drain")
    # ...the viewer in its event stream, and a view opened now learns at once.
    assert (await next_event(view, "moving")).moving.new_edge_id == "edge-b"
    late = vitals.Subscribe(
        vitals_pb2.SubscribeVitalsRequest(session_id=sid), metadata=bearer(token)
    )
    assert (await next_event(late, "moving")).moving.reason == "drain"

    # Make-before-break: this edge keeps taking batches and serving views meanwhile.
    feed.send(make_batch(sid, 2))
    ack = await read_ack(pub)
    assert ack.received_seq == 2 and not ack.HasField("rejection")
    assert (await next_event(view, "batch")).batch.seq == 2
    assert (await next_event(late, "batch")).batch.seq == 2

    # The release ends every stream at once, saying where the session went.
    await edge.sessions.release(sid, "moved", "edge-b", "127.0.0.1:1")
    for call in (pub, view, late):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while await call.read() is not grpc.aio.EOF:
                pass
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "moved to edge edge-b" in (err.value.details() or "")
    # Moving a session this edge does not serve is a no-op, not an error.
    await edge.sessions.moving("ses_unknown", "edge-b", "drain")


async def batch_seqs(
    sub: grpc.aio.UnaryStreamCall[Any, vitals_pb2.SubscribeVitalsResponse],
    last: int,
    gaps: list[vitals_pb2.SubscriptionGap] | None = None,
) -> list[int]:
    """Seqs of the batch events up to `last` (gaps collected on the side)."""
    seen: list[int] = []
    while not seen or seen[-1] != last:
        ev = await sub.read()
        assert isinstance(ev, vitals_pb2.SubscribeVitalsResponse), "stream ended"
        if ev.HasField("batch"):
            seen.append(ev.batch.seq)
        elif ev.HasField("gap") and gaps is not None:
            gaps.append(ev.gap)
    return seen


async def test_resume_replays_then_goes_live_without_dup_or_hole(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    edge = await edge_factory()
    opened = await open_session(core, channel_to)
    sid = opened.session.session_id
    vitals = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    token = await viewer_token(core, channel_to, sid)
    n = 400
    feed = Feed()
    pub = vitals.Publish(feed.requests(), metadata=bearer(opened.assignment.token))
    acked = 0

    async def publish() -> None:
        # Steadily, so views join while batches are being taken: the seam is exercised.
        nonlocal acked
        for seq in range(1, n + 1):
            feed.send(make_batch(sid, seq))
            if seq % 8 == 0:
                while acked < seq:
                    acked = (await read_ack(pub)).received_seq
        feed.close()

    publisher = asyncio.create_task(publish())
    views = []
    for after in (3, 60, 150):

        def reached(target: int = after + 20) -> bool:
            return acked >= target

        await eventually(reached, what=f"{after + 20} acked")
        views.append(
            (
                after,
                vitals.Subscribe(
                    vitals_pb2.SubscribeVitalsRequest(session_id=sid, resume_after_seq=after),
                    metadata=bearer(token),
                ),
            )
        )
    await publisher
    for after, view in views:
        gaps: list[vitals_pb2.SubscriptionGap] = []
        # Journal replay, then live: every seq after the resume point once, in order.
        assert await batch_seqs(view, n, gaps) == list(range(after + 1, n + 1))
        assert gaps == []
        view.cancel()


async def test_resume_names_what_this_edge_cannot_replay(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    edge = await edge_factory()
    opened = await open_session(core, channel_to)
    sid = opened.session.session_id
    await eventually(lambda: sid in edge.sessions.assignments, what="assignment")
    # As when the core places a session here after another edge archived seqs 1-5: this
    # edge starts from the archived watermark and never holds those seqs.
    await edge.sessions.assign(sid, 1, archived_seq=5, patient_id="p-1")
    vitals = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    # Seq 8 is refused (pulse 900): journaled as a tombstone.
    batches = [make_batch(sid, s, hr=900 if s == 8 else 72) for s in range(6, 11)]
    acks = await publish_all(vitals, batches, opened.assignment.token)
    assert acks[-1].received_seq == 10
    view = await clinician_view(core, channel_to, vitals, sid, resume_after_seq=2)
    first = await view.read()
    assert isinstance(first, vitals_pb2.SubscribeVitalsResponse)
    assert first.HasField("gap")
    assert (first.gap.first_missing_seq, first.gap.last_missing_seq) == (3, 5)
    assert "archive" in first.gap.reason
    # The tombstone (seq 8) is a consumed seq with nothing to show: skipped, not missing.
    assert await batch_seqs(view, 10) == [6, 7, 9, 10]
    view.cancel()


async def test_include_latest_replays_each_value_with_its_own_time(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    edge = await edge_factory()
    opened = await open_session(core, channel_to)
    sid = opened.session.session_id
    full = make_batch(sid, 1)
    t_full = full.vitals[0].device_time_unix_ns
    # A later reading of heart rate alone: the view must keep the other fields' older time.
    pulse = vitals_pb2.VitalsBatch(session_id=sid, seq=2, device_time_unix_ns=t_full + 10**9)
    pulse.vitals.add(device_time_unix_ns=t_full + 10**9, heart_rate_bpm=101)
    vitals = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    acks = await publish_all(vitals, [full, pulse], opened.assignment.token)
    assert acks[-1].received_seq == 2
    view = await clinician_view(core, channel_to, vitals, sid, include_latest=True)
    snap = await next_event(view, "batch")
    assert snap.batch.seq == 0  # not a published batch: the latest value of each field
    older, newer = snap.batch.vitals
    assert (older.device_time_unix_ns, newer.device_time_unix_ns) == (t_full, t_full + 10**9)
    assert newer.heart_rate_bpm == 101 and not newer.HasField("spo2_percent")
    assert not older.HasField("heart_rate_bpm")
    assert (older.spo2_percent, older.systolic_mmhg, older.diastolic_mmhg) == (97, 120, 80)
    assert older.consciousness == vitals_pb2.CONSCIOUSNESS_ALERT
    assert older.oxygen_support == vitals_pb2.OXYGEN_SUPPORT_AIR
    news2 = await next_event(view, "news2")
    assert news2.news2.seq == 2 and news2.news2.total == 1  # pulse 101 scores 1
    view.cancel()


async def stream_error(call: grpc.aio.Call) -> grpc.aio.AioRpcError:
    """Read the stream until it fails; return the failure."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        while await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
            pass
    return err.value


async def test_streams_end_when_their_token_expires_unless_refreshed(
    core: CoreServer,
    edge_factory: EdgeFactory,
    channel_to: ChannelTo,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    edge = await edge_factory()
    other = await open_session(core, channel_to)
    # The core's own issuer, with a lifetime short enough to watch tokens expire; every
    # token the stream needs later is taken at once, inside that lifetime.
    monkeypatch.setattr(core.issuer, "ttl_s", 3)
    opened = await open_session(core, channel_to)
    sid, short = opened.session.session_id, opened.assignment.token
    short_viewer = await viewer_token(core, channel_to, sid)
    monkeypatch.setattr(core.issuer, "ttl_s", 60)
    sessions = sessions_pb2_grpc.SessionsServiceStub(channel_to(core.address))
    fresh = await sessions.Attach(
        sessions_pb2.AttachSessionRequest(session_id=sid, role=sessions_pb2.ROLE_PUBLISHER),
        metadata=bearer(short),
    )
    vitals = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    view = vitals.Subscribe(
        vitals_pb2.SubscribeVitalsRequest(session_id=sid), metadata=bearer(short_viewer)
    )
    kept, lapsing = Feed(), Feed()
    pub = vitals.Publish(kept.requests(), metadata=bearer(short))
    control = vitals.Publish(lapsing.requests(), metadata=bearer(short))
    kept.send(make_batch(sid, 1))
    assert (await read_ack(pub)).received_seq == 1
    lapsing.send(make_batch(sid, 2))
    assert (await read_ack(control)).received_seq == 2

    # Bad refreshes are refused in-band with the reason; the stream goes on.
    for bad, code, named in [
        ("x.y.z", grpc.StatusCode.UNAUTHENTICATED, "malformed"),
        (other.assignment.token, grpc.StatusCode.PERMISSION_DENIED, "session"),
        (short_viewer, grpc.StatusCode.PERMISSION_DENIED, "role"),
    ]:
        kept.send(refresh_token=bad)
        refused = await read_ack(pub)
        assert refused.rejection.seq == 0 and refused.rejection.code == code.value[0]
        assert "refresh_token refused" in refused.rejection.message
        assert named in refused.rejection.message
    kept.send(make_batch(sid, 3))
    assert (await read_ack(pub)).received_seq == 3

    # A good refresh (a fresh publisher token from Attach) extends the stream.
    kept.send(refresh_token=fresh.assignment.token)

    # The stream that was not refreshed, and the viewer, end as their token expires...
    for call in (control, view):
        err = await asyncio.wait_for(stream_error(call), 30)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert err.details() == "token expired; attach again for a fresh one"
    # ...while the refreshed one, opened with the same token, still takes batches.
    kept.send(make_batch(sid, 4))
    ack = await read_ack(pub)
    assert ack.received_seq == 4 and not ack.HasField("rejection")
    kept.close()


AIR, OXYGEN = vitals_pb2.OXYGEN_SUPPORT_AIR, vitals_pb2.OXYGEN_SUPPORT_SUPPLEMENTAL
ALERT, VOICE = vitals_pb2.CONSCIOUSNESS_ALERT, vitals_pb2.CONSCIOUSNESS_VOICE
BAND = {
    vitals_pb2.RISK_BAND_LOW: "low",
    vitals_pb2.RISK_BAND_LOW_MEDIUM: "low-medium",
    vitals_pb2.RISK_BAND_MEDIUM: "medium",
    vitals_pb2.RISK_BAND_HIGH: "high",
}


def reading(sid: str, seq: int, **fields: float) -> vitals_pb2.VitalsBatch:
    """One full reading: a healthy patient (NEWS2 0) but for `fields`."""
    t = time.time_ns()
    values: dict[str, float] = {
        "respiration_rate_bpm": 16,
        "spo2_percent": 97,
        "oxygen_support": AIR,
        "systolic_mmhg": 120,
        "diastolic_mmhg": 70,
        "heart_rate_bpm": 70,
        "consciousness": ALERT,
        "temperature_c": 36.8,
    }
    values.update(fields)
    b = vitals_pb2.VitalsBatch(session_id=sid, seq=seq, device_time_unix_ns=t)
    b.vitals.add(device_time_unix_ns=t, **values)
    return b


async def scored(
    core: CoreServer,
    edge: EdgeServer,
    channel_to: ChannelTo,
    sid: str,
    token: str,
    readings: list[dict[str, float]],
) -> tuple[list[vitals_pb2.News2Update], list[tuple[int, str, str, str]]]:
    """Publish the readings (seq 1..n) under a live view; return every NEWS2 update and
    every alert as (seq, kind, previous band, band)."""
    vitals = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    view = await clinician_view(core, channel_to, vitals, sid)
    await eventually(lambda: edge.sessions.subscribers >= 1, what="viewer")
    batches = [reading(sid, i + 1, **r) for i, r in enumerate(readings)]
    # Then a waveform-only batch: its event follows everything the last reading raised.
    end = make_batch(sid, len(readings) + 1)
    del end.vitals[:]
    batches.append(end)
    acks = await publish_all(vitals, batches, token)
    assert acks[-1].received_seq == end.seq
    assert not any(a.HasField("rejection") for a in acks)
    updates: list[vitals_pb2.News2Update] = []
    alerts: list[tuple[int, str, str, str]] = []
    while True:
        ev = await view.read()
        assert isinstance(ev, vitals_pb2.SubscribeVitalsResponse)
        if ev.HasField("news2"):
            updates.append(ev.news2)
        elif ev.HasField("alert"):
            a = ev.alert
            kind = vitals_pb2.AlertKind.Name(a.kind).removeprefix("ALERT_KIND_").lower()
            alerts.append((a.seq, kind, BAND.get(a.previous_band, "-"), BAND[a.band]))
        elif ev.HasField("batch") and ev.batch.seq == end.seq:
            break
    view.cancel()
    return updates, alerts


async def test_news2_over_grpc_at_band_boundaries_with_alerts(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    edge = await edge_factory()
    opened = await open_session(core, channel_to)
    sid = opened.session.session_id
    steps: list[tuple[dict[str, float], int, str]] = [
        ({}, 0, "low"),
        # 4, the top of low: pulse 91 (1), RR 21 (2), temperature 38.05 (1: as float32 it
        # is 38.0499..., which the chart reads as 38.1).
        ({"heart_rate_bpm": 91, "respiration_rate_bpm": 21, "temperature_c": 38.05}, 4, "low"),
        # 5, the bottom of medium: and systolic 110 (1).
        (
            {
                "heart_rate_bpm": 91,
                "respiration_rate_bpm": 21,
                "temperature_c": 38.05,
                "systolic_mmhg": 110,
            },
            5,
            "medium",
        ),
        # One parameter at 3 with an aggregate under 5: low-medium.
        ({"consciousness": VOICE}, 3, "low-medium"),
        # 7, the bottom of high: RR 25 (3), SpO2 94 (1), systolic 101 (1), temp 39.1 (2).
        (
            {
                "respiration_rate_bpm": 25,
                "spo2_percent": 94,
                "systolic_mmhg": 101,
                "temperature_c": 39.1,
            },
            7,
            "high",
        ),
        # Just below each upper edge of 0: pulse 90, RR 20, systolic 111, temp 38.0.
        (
            {
                "heart_rate_bpm": 90,
                "respiration_rate_bpm": 20,
                "systolic_mmhg": 111,
                "temperature_c": 38.0,
                "spo2_percent": 96,
            },
            0,
            "low",
        ),
    ]
    updates, alerts = await scored(
        core, edge, channel_to, sid, opened.assignment.token, [r for r, _, _ in steps]
    )
    assert [(u.seq, u.total, BAND[u.band]) for u in updates] == [
        (i + 1, total, band) for i, (_, total, band) in enumerate(steps)
    ]
    assert all(u.complete and u.spo2_scale == vitals_pb2.SPO2_SCALE_1 for u in updates)
    assert all(u.oldest_input_unix_ns > 0 for u in updates)
    # An alert on every band change (none for the first score, already low), and one when
    # a parameter turns red.
    assert alerts == [
        (3, "band_changed", "low", "medium"),
        (4, "band_changed", "medium", "low-medium"),
        (4, "single_parameter_red", "low-medium", "low-medium"),
        (5, "band_changed", "low-medium", "high"),
        (5, "single_parameter_red", "high", "high"),
        (6, "band_changed", "high", "low"),
    ]
    assert edge.metrics.news2_alerts._value.get() == len(alerts)


async def test_news2_over_grpc_on_spo2_scale_2(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    edge = await edge_factory()
    opened = await open_session(core, channel_to, spo2_scale=2)
    sid = opened.session.session_id
    # (SpO2, oxygen, SpO2 points on scale 2); oxygen itself adds 2.
    steps = [
        (88, AIR, 0),
        (87, AIR, 1),
        (85, AIR, 2),
        (83, AIR, 3),
        (92, OXYGEN, 0),
        (93, AIR, 0),
        (93, OXYGEN, 1),
        (95, OXYGEN, 2),
        (97, OXYGEN, 3),
    ]
    updates, _ = await scored(
        core,
        edge,
        channel_to,
        sid,
        opened.assignment.token,
        [{"spo2_percent": s, "oxygen_support": o} for s, o, _ in steps],
    )
    assert all(u.spo2_scale == vitals_pb2.SPO2_SCALE_2 for u in updates)
    spo2 = [next(p.score for p in u.parameters if p.parameter == "spo2") for u in updates]
    assert spo2 == [points for _, _, points in steps]
    assert [u.total for u in updates] == [
        points + (2 if o == OXYGEN else 0) for _, o, points in steps
    ]


async def test_news2_leaves_out_stale_inputs(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    edge = await edge_factory(news2_max_input_age_s=60)
    opened = await open_session(core, channel_to)
    sid = opened.session.session_id
    vitals = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    view = await clinician_view(core, channel_to, vitals, sid)
    await eventually(lambda: edge.sessions.subscribers == 1, what="viewer")
    # A blood pressure (systolic 90: 3 points) measured two minutes ago, then a fresh
    # reading of everything else.
    old = reading(sid, 1, systolic_mmhg=90, diastolic_mmhg=60)
    t_old = old.vitals[0].device_time_unix_ns - 120 * 10**9
    old.vitals[0].device_time_unix_ns = t_old
    fresh = reading(sid, 2)
    fresh.vitals[0].ClearField("systolic_mmhg")
    fresh.vitals[0].ClearField("diastolic_mmhg")
    acks = await publish_all(vitals, [old, fresh], opened.assignment.token)
    assert acks[-1].received_seq == 2
    first = (await next_event(view, "news2")).news2
    second = (await next_event(view, "news2")).news2
    view.cancel()
    for u in (first, second):
        bp = next(p for p in u.parameters if p.parameter == "systolic_bp")
        assert bp.stale and bp.score == 3 and bp.measured_unix_ns == t_old
        assert not u.complete and u.total == 0
    assert second.oldest_input_unix_ns == fresh.vitals[0].device_time_unix_ns
    assert not any(p.stale for p in second.parameters if p.parameter != "systolic_bp")
