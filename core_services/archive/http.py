"""HTTP access to the archive for a patient's clinician: the readings a live view missed
(the console fills the hole a failover leaves in its trends), and the whole record as a FHIR
R4 Bundle."""

from __future__ import annotations

from aiohttp import web
from google.protobuf.json_format import MessageToDict

from core_services.archive import fhir
from core_services.archive.archive import Archive
from core_services.archive.servicer import check_export, export_pages
from core_services.auth.access import AccessPolicy
from core_services.auth.http import caller, peer, refusal
from telehealth.errors import HTTP_STATUS, DomainError, PermissionDenied
from telehealth.v1 import vitals_pb2

# Batches per answer (40 s of a 25/s stream); a longer hole is asked for again from the last.
MAX_FILL = 1_000
MAX_INT64 = 2**63 - 1  # seqs and times are signed 64-bit columns
SEQ = "a batch sequence number"
UNIX_NS = "unix time in nanoseconds"


def _int_param(request: web.Request, name: str, what: str, default: int | None = None) -> int:
    """A non-negative integer query parameter (stored as a signed 64-bit integer); absent or
    empty is `default`, or a 400 when there is none."""
    raw = request.query.get(name) or None
    if raw is None:
        if default is None:
            raise web.HTTPBadRequest(reason=f"give {name} ({what})")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(reason=f"{name} must be an integer ({what})") from None
    if not 0 <= value <= MAX_INT64:
        raise web.HTTPBadRequest(reason=f"{name} must be between 0 and {MAX_INT64}")
    return value


def add_archive_routes(app: web.Application, archive: Archive, policy: AccessPolicy) -> None:
    async def session_vitals(request: web.Request) -> web.Response:
        """GET ?after_seq=A&through_seq=B: the session's archived batches A < seq <= B in
        order (as the edge's WebSocket shows them), and the archived watermark, so a caller
        can tell "not archived yet, ask again" (watermark < B) from "refused at the edge,
        never coming" (a seq missing below the watermark)."""
        sid = request.match_info["session_id"]
        after, through = (
            _int_param(request, "after_seq", SEQ),
            _int_param(request, "through_seq", SEQ),
        )
        if through < after:
            raise web.HTTPBadRequest(reason="through_seq is before after_seq")
        try:
            patient_id = await policy.patient(sid)  # NotFound names the id
            # The same rule and audit record as ArchiveService.QueryVitals over gRPC.
            await policy.clinician_at(
                caller(request), peer(request), patient_id, "archive.query", sid
            )
        except DomainError as e:
            return refusal(HTTP_STATUS.get(e.code, 400), e.code.value, e.message)
        # The watermark first: every row at or below it is already there for the read.
        archived = await archive.archived_seq(sid)
        rows = await archive.store.session_range(sid, after, through, MAX_FILL + 1)
        batches = [
            MessageToDict(
                vitals_pb2.VitalsBatch.FromString(r.batch), preserving_proto_field_name=True
            )
            for r in rows[:MAX_FILL]
        ]
        return web.json_response(
            {
                "session_id": sid,
                "archived_seq": archived,
                "truncated": len(rows) > MAX_FILL,
                "batches": batches,
            },
            headers={"Cache-Control": "no-store"},
        )

    async def fhir_export(request: web.Request) -> web.StreamResponse:
        patient_id = request.match_info["patient_id"]
        since = _int_param(request, "from", UNIX_NS, default=0)
        until = _int_param(request, "to", UNIX_NS, default=0)
        try:
            check_export(patient_id, since, until, 0)
        except DomainError as e:
            raise web.HTTPBadRequest(reason=e.message) from None
        try:
            # The same rule and audit record as ArchiveService.ExportFhir over gRPC.
            await policy.clinician_at(caller(request), peer(request), patient_id, "archive.export")
        except PermissionDenied as e:
            return refusal(403, e.code.value, e.message)
        # One Bundle, streamed: its entries come page by page (each page validated), so a
        # long record never sits in memory whole.
        resp = web.StreamResponse(
            headers={"Content-Type": "application/fhir+json", "Cache-Control": "no-store"}
        )
        await resp.prepare(request)
        n = 0
        async for page in export_pages(archive, patient_id, since, until):
            if page.number == 1:
                head = fhir.dumps({k: v for k, v in page.bundle.items() if k != "entry"})
                await resp.write(head[:-1].encode() + b',"entry":[')
            for entry in page.bundle["entry"]:
                await resp.write((b"," if n else b"") + fhir.dumps(entry).encode())
                n += 1
        await resp.write(b"]}")
        await resp.write_eof()
        return resp

    app.router.add_get("/api/v1/sessions/{session_id}/vitals", session_vitals)
    app.router.add_get("/api/v1/patients/{patient_id}/fhir", fhir_export)
