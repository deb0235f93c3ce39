"""HTTP access to the archive: a patient's vitals as a FHIR R4 Bundle, for their clinician."""

from __future__ import annotations

from aiohttp import web

from core_services.archive.archive import Archive
from core_services.archive.servicer import export_fhir
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
    async def fhir_export(request: web.Request) -> web.Response:
        patient_id = request.match_info["patient_id"]
        since, until = _int_param(request, "from"), _int_param(request, "to")
        try:
            # The same rule and audit record as ArchiveService.ExportFhir over gRPC.
            await policy.clinician_at(caller(request), peer(request), patient_id, "archive.export")
        except PermissionDenied as e:
            return refusal(403, e.code.value, e.message)
        try:
            text, n = await export_fhir(archive, patient_id, since, until)
        except DomainError as e:
            raise web.HTTPBadRequest(reason=e.message) from None
        return web.Response(
            text=text,
            content_type="application/fhir+json",
            headers={"X-Observation-Count": str(n), "Cache-Control": "no-store"},
        )

    app.router.add_get("/api/v1/patients/{patient_id}/fhir", fhir_export)
