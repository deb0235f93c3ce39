"""HTTP access to the archive: a patient's vitals as a FHIR R4 Bundle, for their clinician."""

from __future__ import annotations

from aiohttp import web

from core_services.archive import fhir
from core_services.archive.archive import Archive
from core_services.archive.servicer import check_export, export_pages
from core_services.auth.access import AccessPolicy
from core_services.auth.http import caller, peer, refusal
from telehealth.errors import DomainError, PermissionDenied


def _int_param(request: web.Request, name: str) -> int:
    raw = request.query.get(name, "0") or "0"
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(
            reason=f"{name} must be an integer (unix time in nanoseconds)"
        ) from None
    if value < 0:
        raise web.HTTPBadRequest(reason=f"{name} cannot be negative")
    return value


def add_archive_routes(app: web.Application, archive: Archive, policy: AccessPolicy) -> None:
    async def fhir_export(request: web.Request) -> web.StreamResponse:
        patient_id = request.match_info["patient_id"]
        since, until = _int_param(request, "from"), _int_param(request, "to")
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

    app.router.add_get("/api/v1/patients/{patient_id}/fhir", fhir_export)
