"""gRPC edge of the archive: Append from edges, queries and FHIR export for readers."""

from __future__ import annotations

from collections.abc import AsyncIterator

from core_services.archive import fhir
from core_services.archive.archive import Archive
from core_services.archive.store import StoredBatch
from telehealth.errors import InvalidArgument
from telehealth.rpc import Context
from telehealth.v1 import archive_pb2, archive_pb2_grpc, vitals_pb2

MAX_QUERY = 10_000
DEFAULT_QUERY = 1_000
MAX_APPEND = 4_096


def archived_pb(s: StoredBatch) -> archive_pb2.ArchivedBatch:
    return archive_pb2.ArchivedBatch(
        session_id=s.session_id,
        patient_id=s.patient_id,
        edge_id=s.edge_id,
        edge_received_unix_ns=s.edge_received_unix_ns,
        batch=vitals_pb2.VitalsBatch.FromString(s.batch),
    )


class ArchiveServicer(archive_pb2_grpc.ArchiveServiceServicer):
    def __init__(self, archive: Archive) -> None:
        self._archive = archive

    async def Append(
        self, request_iterator: AsyncIterator[archive_pb2.AppendBatchesRequest], context: Context
    ) -> AsyncIterator[archive_pb2.AppendBatchesResponse]:
        async for req in request_iterator:
            if not req.edge_id:
                raise InvalidArgument("edge_id must be set")
            if len(req.batches) > MAX_APPEND:
                raise InvalidArgument(f"at most {MAX_APPEND} batches per append request")
            for b in req.batches:
                if not b.session_id or b.batch.seq == 0:
                    raise InvalidArgument("every archived batch needs session_id and seq >= 1")
            watermarks, dups = await self._archive.append(req.edge_id, list(req.batches))
            yield archive_pb2.AppendBatchesResponse(
                journal_position=req.journal_position,
                watermarks=[
                    archive_pb2.SessionWatermark(session_id=sid, archived_seq=seq)
                    for sid, seq in watermarks.items()
                ],
                duplicates=dups,
            )

    async def QueryVitals(
        self, request: archive_pb2.QueryVitalsRequest, context: Context
    ) -> archive_pb2.QueryVitalsResponse:
        if not request.patient_id and not request.session_id:
            raise InvalidArgument("give patient_id or session_id")
        if request.limit > MAX_QUERY:
            raise InvalidArgument(f"limit must be at most {MAX_QUERY}")
        if request.to_unix_ns and request.to_unix_ns < request.from_unix_ns:
            raise InvalidArgument("to_unix_ns is before from_unix_ns")
        limit = request.limit or DEFAULT_QUERY
        rows = await self._archive.store.query(
            patient_id=request.patient_id,
            session_id=request.session_id,
            from_ns=request.from_unix_ns,
            to_ns=request.to_unix_ns,
            limit=limit + 1,
        )
        return archive_pb2.QueryVitalsResponse(
            batches=[archived_pb(r) for r in rows[:limit]], truncated=len(rows) > limit
        )

    async def ExportFhir(
        self, request: archive_pb2.ExportFhirRequest, context: Context
    ) -> archive_pb2.ExportFhirResponse:
        text, n = await export_fhir(
            self._archive, request.patient_id, request.from_unix_ns, request.to_unix_ns
        )
        return archive_pb2.ExportFhirResponse(bundle_json=text, observations=n)

    async def GetWatermark(
        self, request: archive_pb2.GetWatermarkRequest, context: Context
    ) -> archive_pb2.GetWatermarkResponse:
        if not request.session_id:
            raise InvalidArgument("session_id must be set")
        return archive_pb2.GetWatermarkResponse(
            watermark=archive_pb2.SessionWatermark(
                session_id=request.session_id,
                archived_seq=await self._archive.archived_seq(request.session_id),
            ),
            archived_batches=await self._archive.store.count(request.session_id),
        )


async def export_fhir(
    archive: Archive, patient_id: str, from_ns: int, to_ns: int
) -> tuple[str, int]:
    """Shared by gRPC and HTTP: every archived reading of a patient in the window."""
    if not patient_id:
        raise InvalidArgument("patient_id must be set")
    if to_ns and to_ns < from_ns:
        raise InvalidArgument("the end of the window is before its start")
    rows: list[StoredBatch] = []
    seen: set[tuple[str, int]] = set()
    cursor = from_ns
    while True:
        page = await archive.store.query(
            patient_id=patient_id, from_ns=cursor, to_ns=to_ns, limit=MAX_QUERY
        )
        # Pages restart at the last device time, so rows at that instant come twice.
        for r in page:
            if (r.session_id, r.seq) not in seen:
                seen.add((r.session_id, r.seq))
                rows.append(r)
        if len(page) < MAX_QUERY or page[-1].device_time_unix_ns == cursor:
            break
        cursor = page[-1].device_time_unix_ns
    return fhir.bundle(patient_id, rows)
