"""The archive: batches arrive from the edge's journal exactly once, queries, FHIR R4 export."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from fhir.resources.R4B.bundle import Bundle

from clients import ctl
from core_services.archive import http as archive_http
from core_services.server import CoreServer
from telehealth.v1 import archive_pb2, archive_pb2_grpc, vitals_pb2_grpc
from tests.conftest import EdgeFactory, eventually, staff
from tests.integration.test_vitals_path import make_batch, open_session, publish_all

ChannelTo = Callable[[str], grpc.aio.Channel]


async def until_archived(
    archive: archive_pb2_grpc.ArchiveServiceAsyncStub, sid: str, last: int
) -> None:
    """Poll the archive until the session is durable up to seq `last`."""

    async def all_archived() -> bool:
        r = await archive.GetWatermark(archive_pb2.GetWatermarkRequest(session_id=sid))
        return r.watermark.archived_seq == last

    await eventually(all_archived, what=f"all {last} archived")


async def test_every_batch_archived_once_and_exported_as_fhir(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    edge = await edge_factory()
    opened = await open_session(core, channel_to)
    sid = opened.session.session_id
    stub = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    token = opened.assignment.token
    batches = [make_batch(sid, i, hr=60 + i) for i in range(1, 41)]
    # Sent twice, on two streams: the second time every one is a duplicate.
    for _ in range(2):
        acks = await publish_all(stub, batches, token)
        assert acks[-1].received_seq == 40
    archive = archive_pb2_grpc.ArchiveServiceStub(channel_to(core.address))
    await until_archived(archive, sid, 40)
    counted = await archive.GetWatermark(archive_pb2.GetWatermarkRequest(session_id=sid))
    assert counted.archived_batches == 40
    # The edge learns the durable watermark and passes it on to the device.
    await eventually(lambda: edge.sessions.channels[sid].archived_seq == 40, what="edge told")

    clinician = await staff(core, "clinician", patients=("p-1",))
    got = await archive.QueryVitals(
        archive_pb2.QueryVitalsRequest(patient_id="p-1", limit=25), metadata=clinician
    )
    assert [b.batch.seq for b in got.batches] == list(range(1, 26)) and got.truncated
    pages = [
        p
        async for p in archive.ExportFhir(
            archive_pb2.ExportFhirRequest(patient_id="p-1"), metadata=clinician
        )
    ]
    assert [(p.page, p.last) for p in pages] == [(1, True)]
    export = pages[0]
    doc = json.loads(export.bundle_json)
    Bundle.model_validate(doc)
    assert export.observations == 40 * 5
    codes: dict[str, list[dict[str, Any]]] = {}
    for e in doc["entry"]:
        o = e["resource"]
        assert o["subject"]["reference"] == "Patient/p-1"
        assert o["category"][0]["coding"][0]["code"] == "vital-signs"
        codes.setdefault(o["code"]["coding"][0]["code"], []).append(o)
    assert sorted(codes) == ["2708-6", "8310-5", "85354-9", "8867-4", "9279-1"]
    assert [c["code"] for c in codes["2708-6"][0]["code"]["coding"]] == ["2708-6", "59408-5"]
    bp = codes["85354-9"][0]
    assert [c["code"]["coding"][0]["code"] for c in bp["component"]] == ["8480-6", "8462-4"]
    assert bp["component"][0]["valueQuantity"]["code"] == "mm[Hg]"
    hr = sorted(o["valueQuantity"]["value"] for o in codes["8867-4"])
    assert hr == [float(60 + i) for i in range(1, 41)]
    # Each Observation claims its FHIR R4 vital-signs profile and carries UCUM units.
    profiles = {
        "8867-4": ("heartrate", "/min"),
        "2708-6": ("oxygensat", "%"),
        "9279-1": ("resprate", "/min"),
        "8310-5": ("bodytemp", "Cel"),
        "85354-9": ("bp", None),
    }
    for code, (profile, unit) in profiles.items():
        for o in codes[code]:
            assert o["meta"]["profile"] == [f"http://hl7.org/fhir/StructureDefinition/{profile}"]
            quantities = (
                [c["valueQuantity"] for c in o["component"]]
                if unit is None
                else [o["valueQuantity"]]
            )
            for q in quantities:
                assert q["system"] == "http://unitsofmeasure.org"
                assert q["code"] == (unit or "mm[Hg]")


async def test_a_views_hole_is_read_by_seq_over_http_by_the_patients_clinician_only(
    core: CoreServer,
    edge_factory: EdgeFactory,
    channel_to: ChannelTo,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The console's fill: /api/v1/sessions/{id}/vitals?after_seq&through_seq answers the
    batches in the range in seq order with the watermark; seq 12 (refused at the edge, a
    tombstone) is never shown; every read is audited, refusals too."""
    edge = await edge_factory()
    opened = await open_session(core, channel_to)
    sid = opened.session.session_id
    stub = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    batches = [make_batch(sid, i, hr=60 + i) for i in range(1, 31)]
    batches[11].vitals[0].heart_rate_bpm = 900  # impossible: refused, its seq consumed
    acks = await publish_all(stub, batches, opened.assignment.token)
    assert acks[-1].received_seq == 30
    await until_archived(archive_pb2_grpc.ArchiveServiceStub(channel_to(core.address)), sid, 30)
    mine = dict(await staff(core, "clinician", patients=("p-1",)))
    theirs = dict(await staff(core, "clinician", patients=("p-2",)))
    ops = dict(await staff(core, "operator"))
    url = f"{core.http.url}/api/v1/sessions/{sid}/vitals"
    async with aiohttp.ClientSession() as s:

        async def get(params: dict[str, Any], headers: dict[str, str]) -> tuple[int, Any]:
            async with s.get(url, params=params, headers=headers) as r:
                if r.content_type == "application/json":
                    return r.status, await r.json()
                return r.status, r.reason

        status, body = await get({"after_seq": 5, "through_seq": 20}, mine)
        assert status == 200
        assert [int(b["seq"]) for b in body["batches"]] == [s for s in range(6, 21) if s != 12]
        assert [b["vitals"][0]["heart_rate_bpm"] for b in body["batches"]][:3] == [66, 67, 68]
        assert body["archived_seq"] == 30 and body["truncated"] is False
        # A long hole comes a page at a time.
        monkeypatch.setattr(archive_http, "MAX_FILL", 4)
        status, body = await get({"after_seq": 0, "through_seq": 30}, mine)
        assert [int(b["seq"]) for b in body["batches"]] == [1, 2, 3, 4] and body["truncated"]

        for params, reason in [
            ({"through_seq": 3}, "give after_seq"),
            ({"after_seq": "x", "through_seq": 3}, "must be an integer"),
            ({"after_seq": -1, "through_seq": 3}, "between 0 and"),
            ({"after_seq": 0, "through_seq": 2**63}, "between 0 and"),
            ({"after_seq": 9, "through_seq": 3}, "before after_seq"),
        ]:
            status, why = await get(params, mine)
            assert status == 400 and reason in why, params
        # The export's window takes the same integers (times in ns, within int64).
        fhir = f"{core.http.url}/api/v1/patients/p-1/fhir"
        for params, reason in [
            ({"from": "soon"}, "must be an integer"),
            ({"to": 2**63}, "between 0 and"),
        ]:
            async with s.get(fhir, params=params, headers=mine) as r:
                assert r.status == 400 and reason in (r.reason or ""), params
        nope = {"after_seq": 0, "through_seq": 1}
        async with s.get(url.replace(sid, "ses_nope"), params=nope, headers=mine) as r:
            assert r.status == 404 and "ses_nope" in (await r.json())["message"]
        status, body = await get({"after_seq": 0, "through_seq": 3}, theirs)
        assert status == 403 and "not assigned to you" in body["message"]
        status, body = await get({"after_seq": 0, "through_seq": 3}, ops)
        assert status == 403 and "never vitals" in body["message"]
        status, body = await get({"after_seq": 0, "through_seq": 3}, {})
        assert status == 401
    reads = [
        (e.event.action, e.event.outcome)
        async for e in core.security.audit.entries()
        if e.event.session_id == sid and e.event.action == "archive.query"
    ]
    assert reads.count(("archive.query", "allowed")) >= 2
    assert reads.count(("archive.query", "denied")) == 2


async def test_archive_refuses_bad_queries(core: CoreServer, channel_to: ChannelTo) -> None:
    archive = archive_pb2_grpc.ArchiveServiceStub(channel_to(core.address))
    clinician = await staff(core, "clinician", patients=("p-9",))
    for req, match in [
        (archive_pb2.QueryVitalsRequest(patient_id="p-9", limit=10**6), "limit"),
        (archive_pb2.QueryVitalsRequest(patient_id="p-9", from_unix_ns=5, to_unix_ns=1), "before"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await archive.QueryVitals(req, metadata=clinician)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert match in (err.value.details() or "")
    exports: list[tuple[archive_pb2.ExportFhirRequest, grpc.StatusCode]] = [
        (archive_pb2.ExportFhirRequest(patient_id="p-other"), grpc.StatusCode.PERMISSION_DENIED),
        (
            archive_pb2.ExportFhirRequest(patient_id="p-9", page_size=10**6),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            archive_pb2.ExportFhirRequest(patient_id="p-9", from_unix_ns=5, to_unix_ns=1),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ]
    for export, code in exports:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in archive.ExportFhir(export, metadata=clinician):
                pass
        assert err.value.code() == code


async def test_long_record_exports_in_pages_joined_into_one_bundle(
    core: CoreServer,
    edge_factory: EdgeFactory,
    channel_to: ChannelTo,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    edge = await edge_factory()
    opened = await open_session(core, channel_to, patient="p-long")
    sid = opened.session.session_id
    stub = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    batches = [make_batch(sid, i, hr=50 + i % 90) for i in range(1, 121)]
    acks = await publish_all(stub, batches, opened.assignment.token)
    assert acks[-1].received_seq == 120
    archive = archive_pb2_grpc.ArchiveServiceStub(channel_to(core.address))
    await until_archived(archive, sid, 120)
    clinician = await staff(core, "clinician", patients=("p-long",))
    pages = [
        p
        async for p in archive.ExportFhir(
            archive_pb2.ExportFhirRequest(patient_id="p-long", page_size=70), metadata=clinician
        )
    ]
    # 600 Observations in pages of 70: nine pages, only the last one says so.
    assert [p.page for p in pages] == list(range(1, 10))
    assert [p.last for p in pages] == [False] * 8 + [True]
    assert sum(p.observations for p in pages) == 600
    ids = set()
    for p in pages:
        doc = json.loads(p.bundle_json)
        Bundle.model_validate(doc)
        ids |= {e["resource"]["id"] for e in doc["entry"]}
    assert len(ids) == 600

    # The CLI joins the pages into one Bundle file.
    user_id = "dr-long"
    await core.security.users.add_user(user_id, "clinician", "correct horse battery staple")
    await core.security.users.assign(user_id, "p-long")
    token, _ = core.issuer.issue_user(user_id=user_id, role="clinician", ttl_s=600)
    monkeypatch.setenv("TELEHEALTH_TOKEN", token)
    out = tmp_path / "p-long.json"
    sink = io.StringIO()
    argv = ["--core", core.address, "export", "p-long", "--out", str(out)]
    assert await asyncio.to_thread(ctl.main, argv, sink) == 0
    assert "600 observation(s)" in sink.getvalue()
    doc = json.loads(out.read_text())
    Bundle.model_validate(doc)
    assert len(doc["entry"]) == 600
    hr = sorted(
        e["resource"]["valueQuantity"]["value"]
        for e in doc["entry"]
        if e["resource"]["code"]["coding"][0]["code"] == "8867-4"
    )
    assert hr == sorted(float(50 + i % 90) for i in range(1, 121))
    left = await asyncio.to_thread(lambda: sorted(p.name for p in tmp_path.glob("p-long*")))
    assert left == [out.name]  # no .partial left beside it


async def test_query_and_export_by_time_window(
    core: CoreServer, edge_factory: EdgeFactory, channel_to: ChannelTo
) -> None:
    edge = await edge_factory()
    opened = await open_session(core, channel_to, patient="p-window")
    sid = opened.session.session_id
    t0 = time.time_ns() - 60 * 10**9
    batches = []
    for i in range(1, 11):
        # One reading a second, a minute ago: seq i measured at t0 + i s.
        b = make_batch(sid, i, hr=60 + i)
        t = t0 + i * 10**9
        b.device_time_unix_ns = b.vitals[0].device_time_unix_ns = t
        b.waveforms[0].start_time_unix_ns = t
        batches.append(b)
    stub = vitals_pb2_grpc.VitalsServiceStub(channel_to(edge.address))
    acks = await publish_all(stub, batches, opened.assignment.token)
    assert acks[-1].received_seq == 10
    archive = archive_pb2_grpc.ArchiveServiceStub(channel_to(core.address))
    await until_archived(archive, sid, 10)
    clinician = await staff(core, "clinician", patients=("p-window",))
    # [from, to): readings at t0+3 s up to, not including, t0+7 s.
    since, until = t0 + 3 * 10**9, t0 + 7 * 10**9
    got = await archive.QueryVitals(
        archive_pb2.QueryVitalsRequest(patient_id="p-window", from_unix_ns=since, to_unix_ns=until),
        metadata=clinician,
    )
    assert [b.batch.seq for b in got.batches] == [3, 4, 5, 6] and not got.truncated
    by_session = await archive.QueryVitals(
        archive_pb2.QueryVitalsRequest(session_id=sid, from_unix_ns=t0 + 9 * 10**9),
        metadata=clinician,
    )
    assert [b.batch.seq for b in by_session.batches] == [9, 10]
    pages = [
        p
        async for p in archive.ExportFhir(
            archive_pb2.ExportFhirRequest(
                patient_id="p-window", from_unix_ns=since, to_unix_ns=until
            ),
            metadata=clinician,
        )
    ]
    doc = json.loads(pages[0].bundle_json)
    hr = sorted(
        e["resource"]["valueQuantity"]["value"]
        for e in doc["entry"]
        if e["resource"]["code"]["coding"][0]["code"] == "8867-4"
    )
    assert hr == [63.0, 64.0, 65.0, 66.0]
