"""Each kind of bad input gets a clear gRPC status; nothing wrong is stored or fanned out,
and other streams carry on."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from core_services.server import CoreServer
from edge_nodes.server import EdgeServer
from edge_nodes.vitals.domain import MAX_SEQ_AHEAD
from telehealth.rpc import bearer
from telehealth.v1 import (
    archive_pb2,
    archive_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
    vitals_pb2,
    vitals_pb2_grpc,
)
from tests.conftest import EdgeFactory, eventually, staff
from tests.integration.test_vitals_path import make_batch, open_session, requests

ChannelTo = Callable[[str], grpc.aio.Channel]


def setting(**fields: float) -> Callable[[vitals_pb2.VitalsBatch], None]:
    def mutate(b: vitals_pb2.VitalsBatch) -> None:
        for k, v in fields.items():
            setattr(b.vitals[0], k, v)

    return mutate


def ahead(where: str, seconds: float) -> Callable[[vitals_pb2.VitalsBatch], None]:
    """Stamp the batch, its reading or its ECG chunk this far ahead of the edge clock."""

    def mutate(b: vitals_pb2.VitalsBatch) -> None:
        shift = int(seconds * 1e9)
        if where == "batch":
            b.device_time_unix_ns += shift
        elif where == "reading":
            b.vitals[0].device_time_unix_ns += shift
        else:
            b.waveforms[0].start_time_unix_ns += shift

    return mutate


# (case, how the batch is spoiled, what the message names, the reason code logged,
# the fields logged)
BAD_BATCHES = [
    ("pulse 900", setting(heart_rate_bpm=900), "heart_rate_bpm=900", "impossible_value",
     ["heart_rate_bpm"]),
    ("SpO2 130", setting(spo2_percent=130), "spo2_percent=130", "impossible_value",
     ["spo2_percent"]),
    ("negative respiration", setting(respiration_rate_bpm=-4), "respiration_rate_bpm",
     "impossible_value", ["respiration_rate_bpm"]),
    ("NaN temperature", setting(temperature_c=math.nan), "temperature_c", "impossible_value",
     ["temperature_c"]),
    ("diastolic above systolic", setting(systolic_mmhg=90, diastolic_mmhg=120), "diastolic",
     "impossible_value", ["diastolic_mmhg", "systolic_mmhg"]),
    ("batch 10 min ahead", ahead("batch", 600), "ahead of the edge clock", "time_in_future",
     ["device_time_unix_ns"]),
    ("reading a day ahead", ahead("reading", 86_400), "reading 0: device_time_unix_ns is",
     "time_in_future", ["device_time_unix_ns"]),
    ("ECG 10 min ahead", ahead("ecg", 600), "start_time_unix_ns is 600 s ahead",
     "time_in_future", ["start_time_unix_ns"]),
]  # fmt: skip


async def viewer_of(core: CoreServer, channel_to: ChannelTo, sid: str, patient: str = "p-1") -> str:
    sessions = sessions_pb2_grpc.SessionsServiceStub(channel_to(core.address))
    viewer = await sessions.Attach(
        sessions_pb2.AttachSessionRequest(session_id=sid, role=sessions_pb2.ROLE_VIEWER),
        metadata=await staff(core, "clinician", (patient,)),
    )
    return viewer.assignment.token


async def events_until(
    sub: grpc.aio.UnaryStreamCall[Any, vitals_pb2.SubscribeVitalsResponse], last_seq: int
) -> list[vitals_pb2.SubscribeVitalsResponse]:
    """Every event up to and including the NEWS2 of the batch with last_seq (the batch's
    own event comes first, its score right after)."""
    got: list[vitals_pb2.SubscribeVitalsResponse] = []
    async for ev in sub:
        got.append(ev)
        if ev.HasField("news2") and ev.news2.seq == last_seq:
            break
    sub.cancel()
    return got


async def archived_to(core: CoreServer, channel_to: ChannelTo, sid: str, seq: int) -> None:
    archive = archive_pb2_grpc.ArchiveServiceStub(channel_to(core.address))

    async def reached() -> bool:
        r = await archive.GetWatermark(archive_pb2.GetWatermarkRequest(session_id=sid))
        return r.watermark.archived_seq == seq

    await eventually(reached, what=f"archived_seq {seq}")


def journaled(edge: EdgeServer, sid: str) -> dict[int, tuple[bool, vitals_pb2.VitalsBatch]]:
    return {
        e.seq: (e.rejected, vitals_pb2.VitalsBatch.FromString(e.batch))
        for e in edge.journal.read_after(0, 10_000)
        if e.session_id == sid
    }


@pytest.mark.parametrize(
    ("name", "spoil", "named", "reason", "fields"), BAD_BATCHES, ids=[c[0] for c in BAD_BATCHES]
)
async def test_bad_batches_are_rejected_and_never_fanned_out(
    core: CoreServer,
    edge_factory: EdgeFactory,
    channel_to: ChannelTo,
    caplog: pytest.LogCaptureFixture,
    name: str,
    spoil: Callable[[vitals_pb2.VitalsBatch], None],
    named: str,
    reason: str,
    fields: list[str],
) -> None:
    caplog.set_level(logging.INFO, logger="edge_nodes.vitals.servicer")
    edge = await edge_factory()
    opened = await open_session(core, channel_to)
    sid = opened.session.session_id
    vitals = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    sub = vitals.Subscribe(
        vitals_pb2.SubscribeVitalsRequest(session_id=sid),
        metadata=bearer(await viewer_of(core, channel_to, sid)),
    )
    await eventually(lambda: edge.sessions.subscribers == 1, what="subscriber joined")
    # The bad reading also carries a distinctive heart rate (or the impossible one): if
    # anything of it leaked into scoring or fan-out, it would show.
    bad = make_batch(sid, 2, hr=99)
    spoil(bad)
    marker = float(bad.vitals[0].heart_rate_bpm)
    batches = [make_batch(sid, 1), bad, make_batch(sid, 3)]
    resps = [
        r async for r in vitals.Publish(requests(batches), metadata=bearer(opened.assignment.token))
    ]
    rejected = [r.rejection for r in resps if r.HasField("rejection")]
    assert len(rejected) == 1
    assert rejected[0].seq == 2
    assert rejected[0].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert named in rejected[0].message
    # The stream went on: batch 3 accepted and the watermark passed the rejected seq.
    assert resps[-1].received_seq == 3
    # The log says which fields and why, never the values (the device's message may).
    (logged,) = [r for r in caplog.records if r.getMessage() == "batch rejected"]
    assert (logged.seq, logged.code, logged.reason, logged.fields) == (  # type: ignore[attr-defined]
        2,
        "invalid_argument",
        reason,
        fields,
    )
    assert edge.metrics.batches_rejected._value.get() == 1
    assert edge.metrics.batches_accepted._value.get() == 2

    # Nothing of batch 2 reached the live subscriber: not the batch, not a score of it.
    events = await events_until(sub, 3)
    assert [e.batch.seq for e in events if e.HasField("batch")] == [1, 3]
    assert [e.news2.seq for e in events if e.HasField("news2")] == [1, 3]
    pulses = [p.value for e in events if e.HasField("news2") for p in e.news2.parameters]
    assert marker not in pulses and 72.0 in pulses
    assert edge.sessions.channels[sid].latest.heart_rate_bpm.value == 72.0  # type: ignore[union-attr]

    # The journal holds a tombstone for seq 2 (session and seq only), not its vitals.
    held = journaled(edge, sid)
    assert sorted(held) == [1, 2, 3]
    assert [held[s][0] for s in (1, 2, 3)] == [False, True, False]
    assert held[2][1] == vitals_pb2.VitalsBatch(session_id=sid, seq=2)

    # The archive consumed seq 2, so the durable watermark reaches the end; readers see
    # only the two real batches, and the device is told through its acks.
    await archived_to(core, channel_to, sid, 3)
    archive = archive_pb2_grpc.ArchiveServiceStub(channel_to(core.address))
    wm = await archive.GetWatermark(archive_pb2.GetWatermarkRequest(session_id=sid))
    assert wm.archived_batches == 2
    clinician = await staff(core, "clinician", ("p-1",))
    got = await archive.QueryVitals(
        archive_pb2.QueryVitalsRequest(session_id=sid), metadata=clinician
    )
    assert [b.batch.seq for b in got.batches] == [1, 3]
    assert all(b.batch.vitals[0].heart_rate_bpm == 72.0 for b in got.batches)
    pages = [
        p
        async for p in archive.ExportFhir(
            archive_pb2.ExportFhirRequest(patient_id="p-1"), metadata=clinician
        )
    ]
    assert sum(p.observations for p in pages) == 2 * 5
    await eventually(lambda: edge.sessions.channels[sid].archived_seq == 3, what="edge told")
    acks = [
        r
        async for r in vitals.Publish(
            requests([make_batch(sid, 4)]), metadata=bearer(opened.assignment.token)
        )
    ]
    assert acks[-1].archived_seq >= 3


async def publish_expect(
    stub: vitals_pb2_grpc.VitalsServiceAsyncStub,
    batches: list[vitals_pb2.VitalsBatch],
    token: str,
    code: grpc.StatusCode,
    match: str,
) -> list[vitals_pb2.PublishVitalsResponse]:
    got: list[vitals_pb2.PublishVitalsResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for r in stub.Publish(requests(batches), metadata=bearer(token)):
            got.append(r)
    assert err.value.code() == code, err.value.details()
    assert match in (err.value.details() or "")
    return got


async def test_empty_and_oversize_batches(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    edge = await edge_factory(max_batch_samples=100, grpc_max_message_bytes=64 * 1024)
    opened = await open_session(core, channel_to)
    sid, token = opened.session.session_id, opened.assignment.token
    stub = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    empty = vitals_pb2.VitalsBatch(session_id=sid, seq=1, device_time_unix_ns=1)
    big = make_batch(sid, 2)
    big.waveforms[0].samples.extend([0.1] * 200)
    resps = [r async for r in stub.Publish(requests([empty, big]), metadata=bearer(token))]
    assert resps[0].rejection.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "empty" in resps[0].rejection.message
    assert resps[1].rejection.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "at most 100" in resps[1].rejection.message
    # Both seqs consumed as tombstones, so the archive's watermark passes them.
    held = journaled(edge, sid)
    assert {s: rejected for s, (rejected, _) in held.items()} == {1: True, 2: True}
    assert held[2][1] == vitals_pb2.VitalsBatch(session_id=sid, seq=2)
    await archived_to(core, channel_to, sid, 2)
    # Beyond the transport's message limit the stream itself ends with RESOURCE_EXHAUSTED.
    huge = make_batch(sid, 3)
    huge.waveforms[0].samples.extend([0.1] * 40_000)
    await publish_expect(stub, [huge], token, grpc.StatusCode.RESOURCE_EXHAUSTED, "")
    assert sid not in edge.sessions.channels or edge.sessions.channels[sid].fanout is not None


async def test_sequence_going_backwards_and_duplicates(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    edge = await edge_factory()
    opened = await open_session(core, channel_to)
    sid, token = opened.session.session_id, opened.assignment.token
    stub = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    # Duplicates (same seq, already received) are dropped silently, with the ack repeated.
    resps = [
        r
        async for r in stub.Publish(
            requests([make_batch(sid, s) for s in (1, 2, 2, 1, 3)]), metadata=bearer(token)
        )
    ]
    # Acks are cumulative (a burst may be acked as one): never backwards, ending at 3.
    acked = [r.received_seq for r in resps]
    assert acked == sorted(acked) and acked[-1] == 3
    assert sum(r.duplicates_dropped for r in resps) == 2
    # A seq lower than one already sent on this stream, and never received, is an error.
    got = await publish_expect(
        stub,
        [make_batch(sid, 6), make_batch(sid, 5)],
        token,
        grpc.StatusCode.INVALID_ARGUMENT,
        "went backwards",
    )
    assert got[0].received_seq == 3
    assert edge.metrics.batches_duplicate._value.get() == 2
    # seq 0 is never valid.
    r = [x async for x in stub.Publish(requests([make_batch(sid, 0)]), metadata=bearer(token))]
    assert r[0].rejection.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


async def test_tokens_sessions_and_placement_errors(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    edge_a = await edge_factory("edge-a", "zone-a")
    edge_b = await edge_factory("edge-b", "zone-b")
    opened = await open_session(core, channel_to)
    sid, token = opened.session.session_id, opened.assignment.token
    stub_a = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge_a.address))
    stub_b = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge_b.address))
    sessions = sessions_pb2_grpc.SessionsServiceStub(channel_to(core.address))
    # No token, a garbage token, a token for another session, a viewer token to publish.
    await publish_expect(
        stub_a, [make_batch(sid, 1)], "", grpc.StatusCode.UNAUTHENTICATED, "missing"
    )
    await publish_expect(stub_a, [make_batch(sid, 1)], "x.y.z", grpc.StatusCode.UNAUTHENTICATED, "")
    other = await open_session(core, channel_to)
    await publish_expect(
        stub_a,
        [make_batch(sid, 1)],
        other.assignment.token,
        grpc.StatusCode.PERMISSION_DENIED,
        "token is for session",
    )
    viewer = await sessions.Attach(
        sessions_pb2.AttachSessionRequest(session_id=sid, role=sessions_pb2.ROLE_VIEWER),
        metadata=await staff(core, "clinician", ("p-1",)),
    )
    await publish_expect(
        stub_a,
        [make_batch(sid, 1)],
        viewer.assignment.token,
        grpc.StatusCode.PERMISSION_DENIED,
        "role",
    )
    # A publisher for a session placed on another edge.
    await publish_expect(
        stub_b,
        [make_batch(sid, 1)],
        token,
        grpc.StatusCode.FAILED_PRECONDITION,
        "placed on edge edge-a",
    )
    # Switching session mid-stream.
    await publish_expect(
        stub_a,
        [make_batch(sid, 1), make_batch(other.session.session_id, 1)],
        token,
        grpc.StatusCode.PERMISSION_DENIED,
        "this stream publishes",
    )
    # Unknown and closed sessions at the core; a closed session at the edge.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sessions.Attach(
            sessions_pb2.AttachSessionRequest(session_id="ses_nope", role=sessions_pb2.ROLE_VIEWER),
            metadata=await staff(core, "clinician"),
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    await sessions.Close(sessions_pb2.CloseSessionRequest(session_id=sid), metadata=bearer(token))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sessions.Close(
            sessions_pb2.CloseSessionRequest(session_id=sid), metadata=bearer(token)
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await eventually(lambda: edge_a.sessions.assignments[sid].released == "closed", what="release")
    await publish_expect(
        stub_a, [make_batch(sid, 2)], token, grpc.StatusCode.FAILED_PRECONDITION, "closed"
    )
    # Bad Open requests.
    for req, match in [
        (sessions_pb2.OpenSessionRequest(patient_id="", zone="zone-a"), "patient_id"),
        (sessions_pb2.OpenSessionRequest(patient_id="p", zone=""), "zone"),
        (
            sessions_pb2.OpenSessionRequest(
                patient_id="p",
                zone="zone-a",
                spo2_scale=7,  # type: ignore[arg-type]
            ),
            "spo2_scale",
        ),
        (sessions_pb2.OpenSessionRequest(patient_id="p" * 500, zone="zone-a"), "patient_id"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await sessions.Open(req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert match in (err.value.details() or "")
    # The edge still serves a healthy session afterwards.
    fresh = await open_session(core, channel_to)
    ok = [
        r.received_seq
        async for r in stub_a.Publish(
            requests([make_batch(fresh.session.session_id, 1)]),
            metadata=bearer(fresh.assignment.token),
        )
    ]
    assert ok == [1]


async def test_subscribe_errors(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    edge = await edge_factory()
    opened = await open_session(core, channel_to)
    sid = opened.session.session_id
    stub = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    for req, token, code in [
        (
            vitals_pb2.SubscribeVitalsRequest(session_id=""),
            opened.assignment.token,
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            vitals_pb2.SubscribeVitalsRequest(session_id=sid),
            opened.assignment.token,
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        (vitals_pb2.SubscribeVitalsRequest(session_id=sid), "", grpc.StatusCode.UNAUTHENTICATED),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.Subscribe(req, metadata=bearer(token)):
                pass
        assert err.value.code() == code


async def test_no_edge_at_all_is_unavailable(core: CoreServer, channel_to: ChannelTo) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await open_session(core, channel_to)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no healthy edge" in (err.value.details() or "")


async def test_far_ahead_seq_is_refused_without_being_consumed(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    edge = await edge_factory()
    opened = await open_session(core, channel_to)
    sid, token = opened.session.session_id, opened.assignment.token
    stub = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    far = 1 + MAX_SEQ_AHEAD + 1
    batches = [make_batch(sid, s) for s in (1, far, 2, far)]
    resps = [r async for r in stub.Publish(requests(batches), metadata=bearer(token))]
    # Refused the first time, with where to resume from...
    refusal = next(r.rejection for r in resps if r.HasField("rejection"))
    assert refusal.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "resend from 2" in refusal.message
    # ...and once in reach, the same seq is taken (not dropped as a duplicate), on the
    # same stream (not refused as going backwards).
    assert [r.rejection.seq for r in resps if r.HasField("rejection")] == [far]
    assert sum(r.duplicates_dropped for r in resps) == 0
    assert resps[-1].received_seq == 2
    assert edge.metrics.batches_accepted._value.get() == 3
    held = journaled(edge, sid)
    assert {s: rejected for s, (rejected, _) in held.items()} == {1: False, 2: False, far: False}


async def test_unknown_and_closed_sessions_at_the_edge(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    edge = await edge_factory(assignment_wait_s=0.2)
    stub = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    # A genuine token (the core's issuer) for a session the core never placed here.
    ghost = "ses_never_placed"
    for role in ("publisher", "viewer"):
        token, _ = core.issuer.issue(
            session_id=ghost, role=role, edge_id="edge-a", zone="zone-a", spo2_scale=1
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            if role == "publisher":
                async for _ in stub.Publish(
                    requests([make_batch(ghost, 1)]), metadata=bearer(token)
                ):
                    pass
            else:
                async for _ in stub.Subscribe(
                    vitals_pb2.SubscribeVitalsRequest(session_id=ghost), metadata=bearer(token)
                ):
                    pass
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, role
        assert "not placed on edge edge-a" in (err.value.details() or "")

    # A view of a session that has been closed.
    opened = await open_session(core, channel_to)
    sid = opened.session.session_id
    viewer = await viewer_of(core, channel_to, sid)
    sessions = sessions_pb2_grpc.SessionsServiceStub(channel_to(core.address))
    await sessions.Close(
        sessions_pb2.CloseSessionRequest(session_id=sid),
        metadata=bearer(opened.assignment.token),
    )
    await eventually(lambda: edge.sessions.assignments[sid].released == "closed", what="release")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.Subscribe(
            vitals_pb2.SubscribeVitalsRequest(session_id=sid), metadata=bearer(viewer)
        ):
            pass
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"session {sid} is closed" in (err.value.details() or "")
