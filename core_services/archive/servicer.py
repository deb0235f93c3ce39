"""gRPC edge of the archive: Append from edges, queries and FHIR export for readers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from core_services.archive import fhir
from core_services.archive.archive import Archive
from core_services.archive.store import StoredBatch
from telehealth.errors import InvalidArgument
from telehealth.rpc import Context
from telehealth.v1 import archive_pb2, archive_pb2_grpc, vitals_pb2

MAX_QUERY = 10_000
DEFAULT_QUERY = 1_000
MAX_APPEND = 4_096
DEFAULT_EXPORT_PAGE = 2_000
MAX_EXPORT_PAGE = 10_000


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
    ) -> AsyncIterator[archive_pb2.ExportFhirResponse]:
        pages = export_pages(
            self._archive,
            request.patient_id,
            request.from_unix_ns,
            request.to_unix_ns,
            request.page_size,
        )
        async for page in pages:
            yield archive_pb2.ExportFhirResponse(
                bundle_json=fhir.dumps(page.bundle),
                observations=len(page.bundle["entry"]),
                page=page.number,
                last=page.last,
            )

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


@dataclass(frozen=True)
class ExportPage:
    number: int
    bundle: dict[str, Any]
    last: bool


def check_export(patient_id: str, from_ns: int, to_ns: int, page_size: int) -> int:
    """Validate an export request; return the page size to use."""
    if not patient_id:
        raise InvalidArgument("patient_id must be set")
    if from_ns < 0 or to_ns < 0:
        raise InvalidArgument("the window's times cannot be negative")
    if to_ns and to_ns < from_ns:
        raise InvalidArgument("the end of the window is before its start")
    if page_size > MAX_EXPORT_PAGE:
        raise InvalidArgument(f"page_size must be at most {MAX_EXPORT_PAGE}")
    return page_size or DEFAULT_EXPORT_PAGE


async def export_pages(
    archive: Archive, patient_id: str, from_ns: int, to_ns: int, page_size: int = 0
) -> AsyncIterator[ExportPage]:
    """Shared by gRPC and HTTP: every archived reading of a patient in the window, as
    validated Bundles of at most page_size Observations, in time order. Memory stays at a
    page however long the record (a whole stay runs to millions of Observations)."""
    size = check_export(patient_id, from_ns, to_ns, page_size)
    pending: list[dict[str, Any]] = []
    number = 0
    after: tuple[int, str, int] | None = None
    while True:
        # Batches hold up to a few readings each, so a page of batches is about a page of
        # Observations; a batch's readings are never split between pages.
        rows = await archive.store.scan_patient(
            patient_id, from_ns=from_ns, to_ns=to_ns, after=after, limit=size
        )
        if rows:
            last_row = rows[-1]
            after = (last_row.device_time_unix_ns, last_row.session_id, last_row.seq)
            pending += fhir.entries(patient_id, rows)
        done = len(rows) < size
        # A full page waits until one more entry (or the end) is known, so the page that
        # carries last=True is never an empty one after a full one.
        while len(pending) > size or (done and (pending or number == 0)):
            page, pending = pending[:size], pending[size:]
            number += 1
            yield ExportPage(number, fhir.bundle_doc(page), done and not pending)
        if done:
            return
